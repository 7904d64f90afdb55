//! The `deepseek_v2` fixture.

use super::common::*;

#[test]
fn logits_and_generation_match_transformers() {
    let fx = load_fixture("deepseek_v2");
    check_logits_and_generation(&fx);
}
