"""The loss against a float64 numpy reference; the optimizer's stage labels (no Adam state, zero updates for
frozen leaves) and its warmup-then-constant schedule against the closed form."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from af2_jax.training import loss, optimizer, stages


def _numpy_masked_nll(logits, ids, mask):
    logits = logits.astype(np.float64)
    total, count = 0.0, 0.0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if mask[b, t + 1]:
                row = logits[b, t]
                log_z = row.max() + np.log(np.exp(row - row.max()).sum())
                total += log_z - row[ids[b, t + 1]]
                count += 1
    return total, count


def test_loss_is_next_token_nll_over_answer_tokens_only():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 4
    ids = rng.integers(0, 11, (3, 7)).astype(np.int32)
    mask = (rng.random((3, 7)) > 0.4).astype(np.float32)
    total, count = loss.next_token_loss_sum(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    ref_total, ref_count = _numpy_masked_nll(logits, ids, mask)
    assert float(count) == ref_count
    np.testing.assert_allclose(float(total), ref_total, rtol=1e-5)


def test_bf16_logits_are_scored_in_fp32():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 9)).astype(np.float32) * 3
    ids = rng.integers(0, 9, (2, 5)).astype(np.int32)
    mask = np.ones((2, 5), np.float32)
    bf16 = jnp.asarray(logits).astype(jnp.bfloat16)
    total, _ = loss.next_token_loss_sum(bf16, jnp.asarray(ids), jnp.asarray(mask))
    assert total.dtype == jnp.float32
    ref_total, _ = _numpy_masked_nll(np.asarray(bf16.astype(jnp.float32)), ids, mask)
    np.testing.assert_allclose(float(total), ref_total, rtol=1e-5)


def _opt_config(**kw):
    base = dict(learning_rate=1e-2, warmup_steps=4, weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8, clip_grad_norm=1.0,
                schedule="constant", learning_rate_multipliers=())
    base.update(kw)
    return ml_collections.ConfigDict(base)


def test_frozen_leaves_get_no_adam_state_and_zero_updates():
    params = {"xattn": {"q": jnp.ones((3, 4))}, "llm": {"embed_tokens": {"embedding": jnp.ones((5, 4))},
                                                       "layers": {"w": jnp.ones((2, 4, 4))}},
              "htsat": {"conv": jnp.ones((6,))}}
    tx = optimizer.make_optimizer(_opt_config(), stages.STAGE1)
    state = tx.init(params)
    state_sizes = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    trainable_size = 3 * 4 + 5 * 4
    assert state_sizes == 2 * trainable_size  # mu and nu, for the trainable leaves only
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    assert not np.any(np.asarray(updates["llm"]["layers"]["w"]))
    assert not np.any(np.asarray(updates["htsat"]["conv"]))
    assert np.all(np.asarray(updates["xattn"]["q"]) == 0)  # warmup step 0 has learning rate 0
    updates, _ = tx.update(grads, _, params)
    assert np.all(np.asarray(updates["xattn"]["q"]) < 0)


def test_schedule_is_linear_warmup_then_constant():
    cfg = _opt_config(learning_rate=3e-4, warmup_steps=10)
    schedule = optimizer.learning_rate_schedule(cfg)
    for step in (0, 1, 5, 9, 10, 11, 1000):
        expected = 3e-4 * min(step, 10) / 10
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6, atol=1e-12)


def test_cosine_schedule_decays_to_zero_at_num_steps():
    cfg = _opt_config(learning_rate=2e-4, warmup_steps=10, schedule="cosine")
    schedule = optimizer.learning_rate_schedule(cfg, num_steps=110)
    for step in (0, 5, 10, 35, 60, 100, 110, 200):
        after = min(max(step - 10, 0), 100) / 100
        expected = 2e-4 * min(step, 10) / 10 if step < 10 else 2e-4 * 0.5 * (1 + np.cos(np.pi * after))
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-12)
    with pytest.raises(ValueError, match="num_steps"):
        optimizer.learning_rate_schedule(cfg)
    short = optimizer.learning_rate_schedule(cfg, num_steps=2)  # ends inside the warmup: no error
    np.testing.assert_allclose(float(short(1)), 2e-5, rtol=1e-6)
    with pytest.raises(ValueError, match="schedule"):
        optimizer.learning_rate_schedule(_opt_config(schedule="linear"), num_steps=100)


def test_stage_patterns_select_the_reference_modules():
    paths = ["htsat/patch_embed/proj/kernel", "audio_transformer/layers/attn/q/kernel", "xattn/to_q/kernel",
             "llm/embed_tokens/embedding", "llm/layers/mlp/up_proj/kernel", "llm/norm/scale", "llm/lm_head/kernel"]
    s1 = stages.PathMatcher(stages.STAGE_TRAINABLE[1])
    s2 = stages.PathMatcher(stages.STAGE_TRAINABLE[2])
    assert [s1(p) for p in paths] == [False, True, True, True, False, False, False]
    assert [s2(p) for p in paths] == [True, True, True, True, False, False, False]
    assert stages.STAGE_TRAINABLE[3] == stages.STAGE_TRAINABLE[2]


def test_learning_rate_multipliers_scale_matching_groups_like_a_torch_param_group_lr():
    params = {"llm": {"embed_tokens": {"embedding": jnp.full((3, 2), 0.5)}}, "xattn": {"q": jnp.full((2, 2), -1.0)}}
    grads = {"llm": {"embed_tokens": {"embedding": jnp.full((3, 2), 0.01)}}, "xattn": {"q": jnp.full((2, 2), -0.02)}}
    cfg = _opt_config(learning_rate=1e-2, warmup_steps=0, learning_rate_multipliers=(("llm/embed_tokens/.*", 10.0),))
    tx = optimizer.make_optimizer(cfg, stages.STAGE1)
    updates, _ = tx.update(grads, tx.init(params), params)

    def adamw_first_step(g, p, lr):  # bias-corrected moments on step 1 are g and g^2 (numpy float64)
        g, p = np.float64(g), np.float64(p)
        return -lr * (g / (abs(g) + 1e-8) + 0.1 * p)

    np.testing.assert_allclose(np.asarray(updates["llm"]["embed_tokens"]["embedding"]),
                               adamw_first_step(0.01, 0.5, 1e-1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(updates["xattn"]["q"]), adamw_first_step(-0.02, -1.0, 1e-2), rtol=1e-5)
