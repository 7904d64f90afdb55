//! The `mamba` fixture.

use super::common::*;

#[test]
fn logits_and_generation_match_transformers() {
    let fx = load_fixture("mamba");
    check_logits_and_generation(&fx);
}
