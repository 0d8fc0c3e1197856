"""AF-CLAP's contrastive losses against NVIDIA's/LAION's and CompA's golden outputs (afclap_tiny), against
independent numpy float64 implementations written here (values and central finite differences), and sharded over
8 simulated devices against one device."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from af2_jax import sharding
from af2_jax.training import clap_loss

# Jitted once each: one compiled program per shape instead of one per eager op.
clip_loss = jax.jit(clap_loss.clip_loss)
clip_logits = jax.jit(clap_loss.clip_logits)
_STATIC = ("num_positives", "num_negatives")
composition_loss = jax.jit(clap_loss.composition_loss, static_argnames=_STATIC)
composition_logits = jax.jit(clap_loss.composition_logits, static_argnames=_STATIC)
compa_reference_loss = jax.jit(clap_loss.compa_reference_loss, static_argnames=("num_negatives",))


@pytest.fixture(scope="module")
def out(afclap_fixture_dir):
    return dict(np.load(afclap_fixture_dir / "outputs.npz"))


# ---------------------------------------------------------------- numpy float64 references (independent)

def _np_log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _np_ce(logits):
    """Mean over rows of -log softmax, target = the diagonal."""
    return -np.mean(np.diagonal(_np_log_softmax(logits)))


def _np_clip_loss(a, t, log_s, mlp=None):
    if mlp is None:
        s = np.exp(log_s)
        return 0.5 * (_np_ce(s * a @ t.T) + _np_ce(s * t @ a.T))
    a_mlp, t_mlp, log_t = mlp
    sa, st = np.exp(log_s), np.exp(log_t)
    return 0.25 * (_np_ce(sa * a @ t_mlp.T) + _np_ce(sa * t_mlp @ a.T)
                   + _np_ce(st * a_mlp @ t.T) + _np_ce(st * t @ a_mlp.T))


def _np_composition_loss(a, t, log_s, m, n):
    """Row by row: audio i's softmax over the texts it may see; mean of -log p over its M positives. Then every
    positive caption over the audios."""
    b, k = a.shape[0], m + n
    t = t.reshape(b, k, -1)
    s = np.exp(log_s)
    audio_terms = []
    for i in range(b):
        columns = [(owner, slot) for owner in range(b) for slot in range(k) if slot < m or owner == i]
        logits = np.array([s * a[i] @ t[owner, slot] for owner, slot in columns])
        logp = _np_log_softmax(logits)
        audio_terms.append(np.mean([-logp[columns.index((i, slot))] for slot in range(m)]))
    text_terms = []
    for owner in range(b):
        for slot in range(m):
            logp = _np_log_softmax(s * a @ t[owner, slot])
            text_terms.append(-logp[owner])
    return 0.5 * (np.mean(audio_terms) + np.mean(text_terms))


def _central_differences(f, args, h=1e-6):
    """d f / d args[i] for every float64 array argument, by central differences."""
    grads = []
    for i, x in enumerate(args):
        g = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            plus = [np.array(y, copy=True) for y in args]
            minus = [np.array(y, copy=True) for y in args]
            plus[i][idx] += h
            minus[i][idx] -= h
            g[idx] = (f(*plus) - f(*minus)) / (2 * h)
        grads.append(g)
    return grads


def _normalised(rng, *shape):
    x = rng.standard_normal(shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------- LAION ClipLoss

def test_clip_logits_and_losses_match_fixture(out):
    a, t = out["audio_features"], out["text_features"]
    per_audio, per_text = clip_logits(a, t, out["logit_scale_a"])
    np.testing.assert_allclose(per_audio, out["logits_per_audio"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(per_text, out["logits_per_text"], atol=1e-4, rtol=0)
    loss = clip_loss(a, t, out["logit_scale_a"])
    assert loss.shape == () and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, out["loss"][0], atol=1e-5, rtol=0)

    a_mlp, t_mlp = out["audio_features_mlp"], out["text_features_mlp"]
    for (x, y, scale), prefix in [((a, t_mlp, out["logit_scale_a"]), "mlp_a"),
                                  ((a_mlp, t, out["logit_scale_t"]), "mlp_t")]:
        per_audio, per_text = clip_logits(x, y, scale)
        np.testing.assert_allclose(per_audio, out[f"{prefix}_logits_per_audio"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(per_text, out[f"{prefix}_logits_per_text"], atol=1e-4, rtol=0)
    mlp = clap_loss.MlpFeatures(a_mlp, t_mlp, out["logit_scale_t"])
    np.testing.assert_allclose(clip_loss(a, t, out["logit_scale_a"], mlp=mlp), out["loss_mlp"][0],
                               atol=1e-5, rtol=0)


def test_logit_scale_gradient_matches_fixture(out):
    # Comparable as it stands: logit_scale_a enters the reference loss only through s·A·Tᵀ and no feature depends
    # on it, so d(loss)/d(logit_scale_a) at the fixture's features is the model gradient the fixture recorded.
    grad = jax.grad(clip_loss, argnums=2)(out["audio_features"], out["text_features"],
                                                    jnp.float32(out["logit_scale_a"][0]))
    np.testing.assert_allclose(grad, out["grad_logit_scale_a"][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_mlp", [False, True])
def test_clip_loss_gradients_match_float64_finite_differences(out, with_mlp):
    f64 = {k: out[k].astype(np.float64) for k in ["audio_features", "text_features", "audio_features_mlp",
                                                  "text_features_mlp"]}
    args = [f64["audio_features"], f64["text_features"], np.float64(out["logit_scale_a"][0])]
    if with_mlp:
        args += [f64["audio_features_mlp"], f64["text_features_mlp"], np.float64(out["logit_scale_t"][0])]

        def ref(a, t, s, am, tm, st):
            return _np_clip_loss(a, t, s, mlp=(am, tm, st))

        def ours(a, t, s, am, tm, st):
            return clip_loss(a, t, s, mlp=clap_loss.MlpFeatures(am, tm, st))
    else:
        ref, ours = _np_clip_loss, clip_loss
    expected = _central_differences(ref, args)
    value, grads = jax.value_and_grad(ours, argnums=tuple(range(len(args))))(
        *[jnp.asarray(x, jnp.float32) for x in args])
    np.testing.assert_allclose(value, ref(*args), atol=1e-6, rtol=0)
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g, e, atol=2e-6, rtol=1e-5)


def test_single_pair_clip_loss_is_zero():
    rng = np.random.default_rng(0)
    a, t = _normalised(rng, 1, 8), _normalised(rng, 1, 8)
    assert float(clip_loss(a, t, 2.0)) == 0.0  # a softmax over one entry


# ---------------------------------------------------------------- composition-aware negatives and CompA

def test_compa_reference_reproduces_fixture(out):
    ref = compa_reference_loss(out["audio_features"], out["compa_text_features"], out["logit_scale_a"],
                                         num_negatives=3)
    np.testing.assert_array_equal(ref.mask, out["compa_mask"])
    # Masked entries are ~1e5·|z|: relative tolerance, plus the logit tolerance for the kept ones.
    np.testing.assert_allclose(ref.logits_per_audio, out["compa_logits_per_audio"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ref.logits_per_text, out["compa_logits_per_text"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(ref.loss, out["compa_loss"][0], rtol=1e-5, atol=0)


def test_composition_loss_at_one_positive_is_the_additive_mask_objective(out):
    a, t, s = out["audio_features"], out["compa_text_features"], out["logit_scale_a"]
    loss = composition_loss(a, t, s, num_positives=1, num_negatives=3)
    np.testing.assert_allclose(loss, out["derived_compa_loss_additive_mask"][0], atol=1e-5, rtol=0)
    structured = composition_loss(a, t.reshape(4, 4, -1), s, num_positives=1, num_negatives=3)
    np.testing.assert_allclose(structured, loss, atol=1e-7, rtol=0)
    # The kept logits are CompA's; the masked ones carry no probability and no gradient.
    per_audio, per_text = composition_logits(a, t, s, num_positives=1, num_negatives=3)
    kept = out["compa_mask"].T == 1
    np.testing.assert_allclose(np.asarray(per_audio)[kept], out["compa_logits_per_audio"][kept], atol=1e-4, rtol=0)
    assert np.all(np.asarray(per_audio)[~kept] < -1e30)
    np.testing.assert_allclose(per_text, out["compa_logits_per_text"], atol=1e-4, rtol=0)
    grads = jax.grad(composition_loss, argnums=(0, 1))(a, t, jnp.float32(s[0]), num_positives=1,
                                                                  num_negatives=3)
    assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("batch,m,n", [(3, 2, 3), (4, 3, 0), (1, 2, 2), (2, 1, 1)])
def test_composition_loss_matches_float64_reference(batch, m, n):
    rng = np.random.default_rng(batch * 100 + m * 10 + n)
    a, t = _normalised(rng, batch, 8), _normalised(rng, batch * (m + n), 8)
    log_s = np.float64(2.5)
    got = composition_loss(a.astype(np.float32), t.astype(np.float32), np.float32(log_s),
                                     num_positives=m, num_negatives=n)
    np.testing.assert_allclose(got, _np_composition_loss(a, t, log_s, m, n), atol=1e-5, rtol=0)


def test_composition_loss_gradients_match_float64_finite_differences():
    b, m, n = 3, 2, 2
    rng = np.random.default_rng(7)
    args = [_normalised(rng, b, 6), _normalised(rng, b * (m + n), 6), np.float64(2.2)]

    def ref(a, t, s):
        return _np_composition_loss(a, t, s, m, n)

    expected = _central_differences(ref, args)
    grads = jax.grad(composition_loss, argnums=(0, 1, 2))(
        *[jnp.asarray(x, jnp.float32) for x in args], num_positives=m, num_negatives=n)
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g, e, atol=2e-6, rtol=1e-5)


def test_multi_positive_floor_is_half_log_m():
    # Identical paraphrases, orthogonal audios and a large scale: the audio side is left with log M.
    b, m, n = 4, 3, 2
    a = np.eye(b, 8, dtype=np.float32)
    t = np.zeros((b, m + n, 8), np.float32)
    t[:, :m] = a[:, None]
    t[:, m:, -1] = 1.0  # negatives orthogonal to every audio
    loss = composition_loss(a, t, clap_loss.LOGIT_SCALE_MAX, num_positives=m, num_negatives=n)
    np.testing.assert_allclose(loss, 0.5 * math.log(m), atol=1e-4, rtol=0)


def test_inconsistent_shapes_raise_clear_errors():
    a = np.zeros((4, 8), np.float32)
    with pytest.raises(ValueError, match=r"expected \(B·\(M\+N\), J\) = \(16, 8\)"):
        composition_loss(a, np.zeros((15, 8), np.float32), 1.0, num_negatives=3)
    with pytest.raises(ValueError, match="do not match"):
        composition_loss(a, np.zeros((4, 4, 7), np.float32), 1.0, num_negatives=3)
    with pytest.raises(ValueError, match="do not match"):
        composition_loss(a, np.zeros((4, 8), np.float32), 1.0, num_positives=2, num_negatives=0)
    with pytest.raises(ValueError, match="num_positives"):
        composition_loss(a, np.zeros((4, 8), np.float32), 1.0, num_positives=0, num_negatives=1)
    with pytest.raises(ValueError, match="num_negatives"):
        composition_loss(a, np.zeros((4, 8), np.float32), 1.0, num_negatives=-1)
    with pytest.raises(ValueError, match="same"):
        clip_loss(a, np.zeros((3, 8), np.float32), 1.0)
    with pytest.raises(ValueError, match="same"):
        clip_loss(a, a, 1.0, mlp=(a, np.zeros((4, 9), np.float32), 1.0))
    with pytest.raises(ValueError, match="scalar"):
        clip_loss(a, a, np.ones(2, np.float32))
    with pytest.raises(ValueError, match="num_negatives"):
        compa_reference_loss(a, np.zeros((16, 8), np.float32), 1.0, num_negatives=None)


def test_low_precision_features_give_float32_loss(out):
    a, t = out["audio_features"], out["text_features"]
    loss = clip_loss(jnp.asarray(a, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16), out["logit_scale_a"])
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, out["loss"][0], atol=0.05, rtol=0)  # bf16 rounding of the features only


def test_clamp_logit_scale():
    x = jnp.array([-1.0, 0.0, 2.6593, math.log(100.0), 7.0])
    np.testing.assert_allclose(clap_loss.clamp_logit_scale(x), [0.0, 0.0, 2.6593, math.log(100.0), math.log(100.0)],
                               rtol=1e-7, atol=0)


# ---------------------------------------------------------------- global batch over a mesh

def test_sharded_batch_equals_single_device():
    b, j, m, n = 16, 32, 2, 3
    rng = np.random.default_rng(3)
    a, t = _normalised(rng, b, j).astype(np.float32), _normalised(rng, b, j).astype(np.float32)
    a_mlp, t_mlp = rng.standard_normal((b, j)).astype(np.float32), rng.standard_normal((b, j)).astype(np.float32)
    texts = _normalised(rng, b, m + n, j).astype(np.float32)
    scales = (np.float32(2.9), np.float32(2.3))

    def losses(a, t, a_mlp, t_mlp, texts, scales):
        plain = clip_loss(a, t, scales[0])
        mlp = clip_loss(a, t, scales[0], mlp=(a_mlp, t_mlp, scales[1]))
        structured = composition_loss(a, texts, scales[0], num_positives=m, num_negatives=n)
        flat = composition_loss(a, texts.reshape(b * (m + n), j), scales[0], num_positives=m,
                                          num_negatives=n)
        return plain, mlp, structured, flat

    def values_and_grads(*args):
        return [jax.value_and_grad(lambda *x, i=i: losses(*x)[i], argnums=(0, 1, 2, 3, 4, 5))(*args) for i in range(4)]

    args = (a, t, a_mlp, t_mlp, texts, scales)
    single = jax.jit(values_and_grads)(*jax.device_put(args, jax.devices()[0]))

    mesh = sharding.make_mesh(data=2, fsdp=4)
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    sharded_args = (*jax.device_put((a, t, a_mlp, t_mlp, texts), batch),
                    jax.device_put(scales, NamedSharding(mesh, PartitionSpec())))
    assert sharded_args[0].sharding.shard_shape(a.shape) == (2, j)  # 8 shards of the global batch
    with jax.set_mesh(mesh):
        sharded = jax.jit(values_and_grads)(*sharded_args)

    for (v1, g1), (v8, g8) in zip(single, sharded):
        np.testing.assert_allclose(v8, v1, atol=1e-6, rtol=0)
        for x1, x8 in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
            np.testing.assert_allclose(x8, x1, atol=1e-6, rtol=1e-6)  # d/d(scale) is a sum of B² terms
    # The global-batch loss is not the mean of per-shard losses (each shard sees every other shard's texts).
    local = np.mean([clip_loss(a[i:i + 2], t[i:i + 2], scales[0]) for i in range(0, b, 2)])
    assert abs(float(single[0][0]) - local) > 1e-3


def test_invalid_negatives_are_left_out_as_if_absent():
    """A row with fewer negatives than N: its padded negatives (negative_valid 0) change nothing, so the loss equals
    the loss of the batch where those slots hold any other text (here: copies pushed far away)."""
    rng = np.random.default_rng(7)
    b, m, n, j = 3, 2, 3, 8
    audio = jnp.asarray(_normalised(rng, b, j), jnp.float32)
    texts = _normalised(rng, b, m + n, j)
    valid = np.ones((b, n), bool)
    valid[1, 1:] = False  # row 1 has a single real negative
    moved = texts.copy()
    moved[1, m + 1:] = -moved[1, m + 1:]  # what the padded slots hold must not matter
    losses = [clap_loss.composition_loss(audio, jnp.asarray(t, jnp.float32), jnp.float32(2.0), num_positives=m,
                                         num_negatives=n, negative_valid=jnp.asarray(valid)) for t in (texts, moved)]
    np.testing.assert_allclose(float(losses[0]), float(losses[1]), rtol=1e-6)
    everything = clap_loss.composition_loss(audio, jnp.asarray(texts, jnp.float32), jnp.float32(2.0),
                                            num_positives=m, num_negatives=n)
    assert abs(float(everything) - float(losses[0])) > 1e-4  # and the mask does remove them
