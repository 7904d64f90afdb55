//! The `mamba2` fixture.

use super::common::*;

#[test]
fn logits_and_generation_match_transformers() {
    let fx = load_fixture("mamba2");
    check_logits_and_generation(&fx);
}
