"""Each stage changes exactly the reference's trainable modules (af2_reference.md section 6) of the real tiny AF2
and leaves every other parameter bitwise unchanged; BatchNorm statistics move only when HTSAT trains."""
import pytest

from helpers import run_steps

# written from the reference's list, independently of af2_jax.training.stages
REFERENCE_TRAINABLE_PREFIXES = {1: ("audio_transformer/", "xattn/", "llm/embed_tokens/"),
                                2: ("audio_transformer/", "xattn/", "llm/embed_tokens/", "htsat/")}

# HTSAT's fusion branch (AFF, global half: pool -> conv1 -> BN1 -> ReLU -> conv2 -> BN2 with per-example batch
# statistics) has exactly zero gradient for these biases, so they stay 0 (weight decay cannot move a zero): a conv
# bias right before a batch-statistics BatchNorm cancels in the mean, and BN1 over one pooled value per example
# outputs exactly its bias (0 at init), where ReLU's derivative is 0.
ZERO_GRADIENT = {f"htsat/patch_embed/fusion_model/{name}/bias" for name in ("global_conv1", "global_bn1",
                                                                             "global_conv2")}
# ... and BN2's input is then conv2(ReLU(0)) + 0 = 0 for every example, so its running mean stays exactly 0
CONSTANT_STATS = {"htsat/patch_embed/fusion_model/global_bn2/mean"}


@pytest.mark.parametrize("stage", [1, 2])
def test_only_the_stage_trainable_parameters_change(stage):
    run = run_steps(stage, (2, 2, 2))  # stage 2's is test_mesh_equivalence's (when one worker runs both)
    before, after = run["params_before"], run["params_after"]
    assert set(after) == set(before)
    assert any(p.startswith("htsat/") for p in after) and any(p.startswith("llm/layers/") for p in after)
    trainable = {p for p in after if p.startswith(REFERENCE_TRAINABLE_PREFIXES[stage])} - ZERO_GRADIENT
    assert trainable and len(trainable) < len(after)
    for path in sorted(after):
        if path in trainable:
            assert not (after[path] == before[path]).all(), f"{path} should train in stage {stage}"
        else:
            assert after[path].dtype == before[path].dtype
            assert (after[path] == before[path]).all(), f"{path} must stay frozen in stage {stage}"
    stats_before, stats_after = run["stats_before"], run["stats_after"]
    assert stats_after.keys() == stats_before.keys() and stats_before
    assert all(p.startswith("htsat/") for p in stats_before)
    changed_stats = [p for p in stats_after if not (stats_after[p] == stats_before[p]).all()]
    if stage == 2:
        assert set(changed_stats) == set(stats_after) - CONSTANT_STATS
    else:
        assert not changed_stats
