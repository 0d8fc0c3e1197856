"""The gated cross-attention block with AF1's media-location mask against AF1's own block (xattn_media_tiny fixture:
every array, fp32) and a float64 NumPy re-derivation (the all-padded uniform rows, and the decode step, where we
deliberately differ from AF1: the new token sees every audio up to it, not only the first)."""
import functools
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from af2_jax.models.attention import attention_logits
from af2_jax.models.xattn import GatedCrossAttentionBlock, XAttnConfig, allowed_keys, attention_probs, visible_slots

CONFIG = XAttnConfig(dim=64, dim_audio=32, heads=8, dim_head=64, ff_mult=4)  # the fixture's constructor
W = 3  # max_window_per_audio: keys per audio slot
AUDIO_ID = 50
ATOL_PROBS, ATOL, RTOL = 1e-6, 1e-5, 1e-5  # the fixture README's thresholds for a float32 port


@pytest.fixture(scope="module")
def fx(xattn_media_fixture_dir):
    inputs = dict(np.load(xattn_media_fixture_dir / "inputs.npz"))
    outputs = dict(np.load(xattn_media_fixture_dir / "outputs.npz"))
    weights = load_file(str(xattn_media_fixture_dir / "state_dict.safetensors"))
    return inputs, outputs, weights


@pytest.fixture(scope="module")
def block(fx):
    """Our block with the fixture's torch weights, laid out by hand (Linear (out, in) -> (in, out); to_kv's rows
    are [k | v], ours (dim_audio, 2, inner))."""
    _, _, w = fx
    blk = GatedCrossAttentionBlock(CONFIG, rngs=nnx.Rngs(0))
    inner = CONFIG.inner_dim
    values = {
        "attn_gate": w["attn_gate"], "ff_gate": w["ff_gate"],
        "attn_norm/scale": w["attn.norm.weight"], "attn_norm/bias": w["attn.norm.bias"],
        "to_q/kernel": w["attn.to_q.weight"].T, "to_out/kernel": w["attn.to_out.weight"].T,
        "to_kv": w["attn.to_kv.weight"].reshape(2, inner, CONFIG.dim_audio).transpose(2, 0, 1),
        "ff_norm/scale": w["ff.0.weight"], "ff_norm/bias": w["ff.0.bias"],
        "ff_in/kernel": w["ff.1.weight"].T, "ff_out/kernel": w["ff.3.weight"].T}
    for name, value in values.items():
        param = functools.reduce(getattr, name.split("/"), blk)
        assert param[...].shape == value.shape, name
        param[...] = jnp.asarray(value)
    return blk


def _arrays(fx):
    i, _, _ = fx
    return (jnp.asarray(i["x"]), jnp.asarray(i["media"][:, :, 0]), jnp.asarray(i["media_mask"][..., 0]),
            jnp.asarray(i["input_ids"]))


# ---- an independent float64 NumPy implementation of AF1's rule (segment walk, -FLT_MAX, max subtraction) -------

def _af1_allowed(ids: np.ndarray, num_keys: int, query_len: int | None = None) -> np.ndarray:
    """(B, T, L) bool by AF1's segment walk: segment -1 (text before the first <audio>) sees slot 0, segment i
    ([p_i, p_{i+1})) sees slots 0..i. `query_len` given: every query gets the mask of row position T-1's segment
    (what a correct decode step needs), built from the same walk."""
    b, t = ids.shape
    allowed = np.zeros((b, t, num_keys), bool)
    for row in range(b):
        locations = [p for p in range(t) if ids[row, p] == AUDIO_ID]
        bounds = [0] + locations + [t]
        for segment in range(-1, len(locations)):
            start, stop = bounds[segment + 1], bounds[segment + 2]
            allowed[row, start:stop, :(max(segment, 0) + 1) * W] = True
    if query_len is not None:
        allowed = np.repeat(allowed[:, -1:], query_len, axis=1)
    return allowed


def _np_block(w, x, media, media_mask, allowed):
    """float64 block output and probabilities; allowed (B, T, L) bool or None (window mask only)."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    x, media = x.astype(np.float64), media.astype(np.float64)
    erf = np.vectorize(math.erf)

    def ln(h, g, b):
        return (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5) * g + b

    b, t, _ = x.shape
    q = (ln(x, w["attn.norm.weight"], w["attn.norm.bias"]) @ w["attn.to_q.weight"].T)
    q = q.reshape(b, t, 8, 64).transpose(0, 2, 1, 3) * 64 ** -0.5
    k, v = (a.reshape(b, -1, 8, 64).transpose(0, 2, 1, 3)
            for a in np.split(media @ w["attn.to_kv.weight"].T, 2, axis=-1))
    sim = np.einsum("bhtd,bhsd->bhts", q, k)
    flt_max = float(np.finfo(np.float32).max)
    keep = np.broadcast_to(media_mask[:, None, None, :] > 0, sim.shape)
    if allowed is not None:
        keep = keep & allowed[:, None]
    sim = np.where(keep, sim, -flt_max)
    probs = np.exp(sim - sim.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhts,bhsd->bhtd", probs, v).transpose(0, 2, 1, 3).reshape(b, t, 512) @ w["attn.to_out.weight"].T
    h = x + np.tanh(w["attn_gate"]) * out
    f = ln(h, w["ff.0.weight"], w["ff.0.bias"]) @ w["ff.1.weight"].T
    f = 0.5 * f * (1 + erf(f / np.sqrt(2))) @ w["ff.3.weight"].T
    return h + np.tanh(w["ff_gate"]) * f, probs


def _report(name, got, want):
    diff = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
    print(f"{name}: max |ours - AF1| = {diff:.2e}")
    return diff


# ---- fixture parity ----------------------------------------------------------------------------------------

def test_visible_slots_follow_af1s_segments(fx):
    i, o, _ = fx
    ids = i["input_ids"]
    ours = np.asarray(allowed_keys(jnp.ones((4, 12)), visible_slots(jnp.asarray(ids), AUDIO_ID), W))
    np.testing.assert_array_equal(ours, _af1_allowed(ids, 12))
    # with the window mask: exactly the fixture's derived mask, and the support of AF1's probabilities
    ours = np.asarray(allowed_keys(jnp.asarray(i["media_mask"][..., 0]), visible_slots(jnp.asarray(ids), AUDIO_ID),
                                   W))
    np.testing.assert_array_equal(ours, o["derived_allowed_mask"])
    np.testing.assert_array_equal(np.broadcast_to(ours[:, None], o["attn_probs"].shape), o["attn_probs"] > 0)
    # every allowed set of the fixture holds a valid window: no uniform rows there (tested below on our own case)
    np.testing.assert_array_equal(~ours.any(-1), o["derived_uniform_rows"])


def test_logits_and_probabilities_match_af1(fx, block):
    _, o, _ = fx
    x, media, mask, ids = _arrays(fx)
    q, (k, _) = block.queries(x), block.audio_kv(media)
    sim = attention_logits(q, k)
    np.testing.assert_allclose(sim, o["sim_raw"], atol=ATOL, rtol=RTOL)
    probs = np.asarray(attention_probs(q, k, allowed_keys(mask, visible_slots(ids, AUDIO_ID), W)))
    np.testing.assert_allclose(probs, o["attn_probs"], atol=ATOL_PROBS, rtol=0)
    assert np.all(probs[o["attn_probs"] == 0] == 0.0)  # masked probabilities are exactly 0
    _report("sim_raw", sim, o["sim_raw"])
    _report("attn_probs", probs, o["attn_probs"])


def test_block_stages_match_af1(fx, block):
    _, o, _ = fx
    x, media, mask, ids = _arrays(fx)
    kv = block.audio_kv(media)
    visible = visible_slots(ids, AUDIO_ID)
    attn_out = block.attend(x, *kv, mask, visible, W)
    after_attn = x + jnp.tanh(block.attn_gate[...]) * attn_out
    ff = block.feed_forward(after_attn)
    out = block(x, kv, mask, visible, W)
    np.testing.assert_allclose(jnp.tanh(block.attn_gate[...]), o["attn_gate_tanh"], atol=1e-7)
    np.testing.assert_allclose(jnp.tanh(block.ff_gate[...]), o["ff_gate_tanh"], atol=1e-7)
    for name, got in (("xattn_attn_out", attn_out), ("after_attn_residual", after_attn), ("ff_out", ff),
                      ("block_out", out)):
        np.testing.assert_allclose(got, o[name], atol=ATOL, rtol=RTOL, err_msg=name)
        _report(name, got, o[name])


def test_off_by_default_is_the_window_mask_alone(fx, block):
    """No `visible`: AF1's media_locations=None call; a visible count covering every slot is the same, bit for bit."""
    _, o, _ = fx
    x, media, mask, _ = _arrays(fx)
    kv = block.audio_kv(media)
    out = block(x, kv, mask)
    np.testing.assert_allclose(out, o["block_out_no_media_locations"], atol=ATOL, rtol=RTOL)
    probs = attention_probs(block.queries(x), kv[0], allowed_keys(mask))
    np.testing.assert_allclose(probs, o["attn_probs_no_media_locations"], atol=ATOL_PROBS, rtol=0)
    _report("block_out_no_media_locations", out, o["block_out_no_media_locations"])
    everything = jnp.full(x.shape[:2], 4, jnp.int32)
    np.testing.assert_array_equal(block(x, kv, mask, everything, W), out)
    # and the mask matters on this data: with it, the output differs
    assert float(jnp.max(jnp.abs(out - o["block_out"]))) > 1e-2


def test_numpy_reference_reproduces_the_fixture(fx):
    """The float64 re-derivation used below is itself checked against AF1 (README: within 1.5e-6)."""
    i, o, w = fx
    out, probs = _np_block(w, i["x"], i["media"][:, :, 0], i["media_mask"][..., 0], _af1_allowed(i["input_ids"], 12))
    np.testing.assert_allclose(out, o["block_out"], atol=5e-6, rtol=0)
    np.testing.assert_allclose(probs, o["attn_probs"], atol=1e-6, rtol=0)


def test_all_padded_allowed_windows_give_the_uniform_softmax(fx, block):
    """AF1's -FLT_MAX semantics: when every window a position may see is padded, all L logits are -FLT_MAX and the
    softmax is uniform over all L windows (other audios' and padded ones included). Our own case: row 1's and row
    3's first audio all padded, so their text before the second `<audio>` has no valid window."""
    i, _, w = fx
    media_mask = i["media_mask"][..., 0].copy()
    media_mask[1, 0:3] = 0.0
    media_mask[3, 0:3] = 0.0
    x, media, _, ids = _arrays(fx)
    visible = visible_slots(ids, AUDIO_ID)
    allowed = np.asarray(allowed_keys(jnp.asarray(media_mask), visible, W))
    uniform = ~allowed.any(-1)
    assert uniform[1, :13].all() and not uniform[1, 13:].any() and uniform[3, :5].all() and uniform.sum() == 18
    probs = np.asarray(attention_probs(block.queries(x), block.audio_kv(media)[0], jnp.asarray(allowed)))
    np.testing.assert_allclose(probs.transpose(0, 2, 1, 3)[uniform], 1.0 / 12, atol=1e-7, rtol=0)
    out = block(x, block.audio_kv(media), jnp.asarray(media_mask), visible, W)
    ref_out, ref_probs = _np_block(w, i["x"], i["media"][:, :, 0], media_mask, _af1_allowed(i["input_ids"], 12))
    np.testing.assert_allclose(probs, ref_probs, atol=ATOL_PROBS, rtol=0)
    np.testing.assert_allclose(out, ref_out, atol=ATOL, rtol=RTOL)
    assert np.all(np.isfinite(np.asarray(out)))


# ---- the decode step: AF1's bug, and our fix ----------------------------------------------------------------

def _decode_visible(ids):
    """The new token's visible slots: the `<audio>` count of the whole prompt (it is not itself an `<audio>`)."""
    seen = jnp.sum(jnp.asarray(ids) == AUDIO_ID, axis=-1)
    return visible_slots(jnp.zeros((ids.shape[0], 1), jnp.int32), AUDIO_ID, seen)


def test_af1_decode_step_sees_only_the_first_audio(fx, block):
    """The fixture's decode arrays are AF1's bug; we reproduce them only by asking for it (visible = 1 slot)."""
    _, o, _ = fx
    _, media, mask, _ = _arrays(fx)
    kv = block.audio_kv(media)
    dx = jnp.asarray(o["decode_x"])
    buggy = block(dx, kv, mask, jnp.ones((4, 1), jnp.int32), W)
    np.testing.assert_allclose(buggy, o["decode_block_out"], atol=ATOL, rtol=RTOL)
    probs = attention_probs(block.queries(dx), kv[0], allowed_keys(mask, jnp.ones((4, 1), jnp.int32), W))
    np.testing.assert_allclose(probs, o["decode_attn_probs"], atol=ATOL_PROBS, rtol=0)
    _report("decode_block_out (AF1's bug, reproduced on request)", buggy, o["decode_block_out"])


def test_our_decode_step_is_the_full_forward_at_that_position(fx, block):
    """Our decode step gives the new token the mask of the last position (every audio at or before it): equal to
    the full forward over prompt + token at that position and to the float64 rule, and unlike AF1's decode output
    on every row with more than one audio."""
    i, o, w = fx
    x, media, mask, ids = _arrays(fx)
    kv = block.audio_kv(media)
    dx = jnp.asarray(o["decode_x"])
    ours = np.asarray(block(dx, kv, mask, _decode_visible(ids), W))
    full_ids = jnp.concatenate([ids, jnp.full((4, 1), 7, ids.dtype)], axis=1)  # 7: any non-<audio> token
    full = block(jnp.concatenate([x, dx], axis=1), kv, mask, visible_slots(full_ids, AUDIO_ID), W)
    np.testing.assert_allclose(ours[:, 0], np.asarray(full)[:, -1], atol=1e-6, rtol=0)
    ref, _ = _np_block(w, o["decode_x"], i["media"][:, :, 0], i["media_mask"][..., 0],
                       _af1_allowed(i["input_ids"], 12, query_len=1))
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=RTOL)
    differs = np.abs(ours - o["decode_block_out"]).max(axis=(1, 2))
    print("our decode step vs AF1's, max |diff| per row:", np.array2string(differs, precision=3))
    assert differs[0] < ATOL  # one audio: AF1's bug is harmless
    assert np.all(differs[1:] > 1e-2)  # rows with 2, 3, 4 audios: AF1's new token misses the later audios
