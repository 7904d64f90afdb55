//! Every lab in `--quick` mode: results.json, plots and report.md written and checked for
//! content (numbers present, finite, consistent), plus the labs' errors on bad input.

// The counting allocator, so that the labs measure peak memory in the tests as in `moeba lab`.
#[global_allocator]
static ALLOC: moeba_lab::alloc::CountingAlloc = moeba_lab::alloc::CountingAlloc;

mod architectures;
mod context_length;
mod expert_patterns;
mod load_balancing;
mod selective_scan;
