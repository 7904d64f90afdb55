//! Every lab in `--quick` mode: results.json, plots and report.md written and checked for
//! content (numbers present, finite, consistent), plus the labs' errors on bad input.

mod architectures;
mod context_length;
mod expert_patterns;
mod load_balancing;
mod selective_scan;
