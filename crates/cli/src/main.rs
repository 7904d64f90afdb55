//! The `moeba` command.
fn main() {}
