//! The `qwen2_moe` fixture.

use super::common::*;

#[test]
fn logits_and_generation_match_transformers() {
    let fx = load_fixture("qwen2_moe");
    check_logits_and_generation(&fx);
}
