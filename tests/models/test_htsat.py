"""HTSAT against the golden fixture (NVIDIA's PyTorch HTSAT in fp32), plus shapes, jit and training-mode behaviour."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from af2_jax import param_tree
from af2_jax.convert import af2_keys
from af2_jax.param_tree import flatten, unflatten
from af2_jax.convert.mapping import import_tensors
from af2_jax.convert.tensor_files import PrefixView, SafetensorsSource
from af2_jax.models.htsat import HTSAT, htsat_preset
from af2_jax.models.torch_layers import BatchNorm
from af2_jax.models.variables import Buffer

TOL = dict(atol=1e-4, rtol=1e-4)  # fixture README: HTSAT stages and htsat_out


def load_reference_htsat(fixture_dir, **overrides) -> HTSAT:
    """Our HTSAT holding the fixture's weights, read through the conversion table (built abstractly: no random init)."""
    config = htsat_preset("tiny", **overrides)
    abstract = nnx.eval_shape(lambda: HTSAT(config, rngs=nnx.Rngs(0)))
    source = PrefixView(SafetensorsSource([fixture_dir / "state_dict.safetensors"]), "clap.nvclap.")
    arrays = import_tensors(af2_keys.htsat_rules(config), source, param_tree.param_targets(abstract))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, unflatten({k: jnp.asarray(v) for k, v in arrays.items()}))
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def reference_htsat(fixture_dir):
    return load_reference_htsat(fixture_dir)


def _run(model, *, train):
    """jit(state, mel, key) -> (output, intermediates, new state); rngs are always passed (eval must ignore them)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, mel, key):
        m = nnx.merge(graphdef, state)
        y = m(mel, train=train, rngs=nnx.Rngs(dropout=key))
        inter = {}
        if not train:
            b, w = mel.shape[:2]
            inter["htsat_image"] = image = m.to_image(mel)
            h = m.patch_embed(image).reshape(b * w, -1, m.config.embed_dim)
            for s, stage in enumerate(m.stages):
                inter[f"htsat_stage{s}"] = h = stage(h)
            inter["htsat_final_norm"] = m.norm(h)
        return y, inter, nnx.state(m)

    return run, state


@pytest.fixture(scope="module")
def eval_results(reference_htsat, fixture_outputs):
    run, state = _run(reference_htsat, train=False)
    return run(state, jnp.asarray(fixture_outputs["mel"]), jax.random.key(1)), state


def test_matches_fixture_stage_by_stage(eval_results, fixture_outputs):
    (y, inter, _), _ = eval_results
    out = fixture_outputs
    np.testing.assert_allclose(np.asarray(inter["htsat_image"]), out["htsat_image"], atol=1e-4)
    for name in [f"htsat_stage{s}" for s in range(4)] + ["htsat_final_norm"]:
        expected = out[name]
        np.testing.assert_allclose(np.asarray(inter[name]).reshape(expected.shape), expected, **TOL, err_msg=name)
    np.testing.assert_allclose(np.asarray(y), out["htsat_out"], **TOL)


@pytest.mark.parametrize("budget", [0, 1])
def test_window_attention_in_groups_matches_fixture(fixture_dir, fixture_outputs, budget):
    """0: every attention window at once; 1: one window per loop step at every stage (the default on CPU groups
    2**18 scores, tested above). Same outputs as the reference, and the loop's gradients are the unlooped ones."""
    mel = jnp.asarray(fixture_outputs["mel"])

    def output_loss_and_grads(budget):
        graphdef, params, rest = nnx.split(load_reference_htsat(fixture_dir, attention_chunk_scores=budget),
                                           nnx.Param, ...)
        loss = jax.jit(jax.value_and_grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(mel) ** 2) / mel.shape[0]))
        return nnx.merge(graphdef, params, rest)(mel), *loss(params)

    y, value, grads = output_loss_and_grads(budget)
    np.testing.assert_allclose(np.asarray(y), fixture_outputs["htsat_out"], **TOL)
    if budget:
        _, value0, grads0 = output_loss_and_grads(0)
        np.testing.assert_allclose(value, value0, rtol=1e-6)
        chex.assert_trees_all_close(grads, grads0, rtol=1e-4, atol=1e-4)  # grads reach ~100; float32 sums


@pytest.mark.parametrize("windows", [1, 3, 30])
def test_shapes(reference_htsat, windows):
    config = reference_htsat.config
    graphdef, state = nnx.split(reference_htsat)
    for mel_shape, out_shape in [((windows, 1001, 64), (windows, 64, config.num_features)),
                                 ((2, windows, 1001, 64), (2, windows, 64, config.num_features))]:
        mel = jax.ShapeDtypeStruct(mel_shape, jnp.float32)
        for train in (False, True):
            y = jax.eval_shape(lambda st, m: nnx.merge(graphdef, st)(m, train=train, rngs=nnx.Rngs(0)), state, mel)
            chex.assert_shape(y, out_shape)
            assert y.dtype == jnp.float32


@pytest.mark.slow
def test_training_mode_semantics(reference_htsat, eval_results, fixture_outputs):
    mel = jnp.asarray(fixture_outputs["mel"])
    (y_eval, _, state_eval), state = eval_results
    # eval ignored the rngs it was given and left every statistic as it was
    chex.assert_trees_all_equal(nnx.state(state_eval, nnx.BatchStat), nnx.state(state, nnx.BatchStat))
    chex.assert_trees_all_equal(nnx.state(state_eval, Buffer), nnx.state(state, Buffer))

    train_run, _ = _run(reference_htsat, train=True)
    y1, _, state1 = train_run(state, mel, jax.random.key(1))
    y2, _, _ = train_run(state, mel, jax.random.key(1))
    y3, _, _ = train_run(state, mel, jax.random.key(2))
    chex.assert_trees_all_equal(y1, y2)  # deterministic given rngs
    chex.assert_tree_all_finite(y1)
    assert np.abs(np.asarray(y1) - np.asarray(y3)).max() > 1e-3
    assert np.abs(np.asarray(y1) - np.asarray(y_eval)).max() > 1e-3

    # running statistics move in training (bn0 and the fusion BatchNorms), once per reference call (= per example)
    before, after = flatten(state.to_pure_dict()), flatten(state1.to_pure_dict())
    for bn in ("bn0", "patch_embed/fusion_model/local_bn1", "patch_embed/fusion_model/global_bn2"):
        assert not np.allclose(before[f"{bn}/mean"], after[f"{bn}/mean"]), bn
        assert not np.allclose(before[f"{bn}/var"], after[f"{bn}/var"]), bn
        assert int(after[f"{bn}/num_batches_tracked"]) == int(before[f"{bn}/num_batches_tracked"]) + mel.shape[0]
    # a forward pass never touches the parameters
    chex.assert_trees_all_equal(nnx.state(state1, nnx.Param), nnx.state(state, nnx.Param))
    with pytest.raises(ValueError, match="rngs"):
        reference_htsat(mel, train=True)


def test_batch_norm_matches_torch_training_and_eval():
    """Our torch-semantics BatchNorm against torch.nn.BatchNorm1d: batch statistics, running-stat update
    (momentum 0.1, unbiased variance), sequential updates for two calls, and eval mode."""
    rng = np.random.default_rng(0)
    calls = [rng.standard_normal((3, 17, 5)).astype(np.float32) * 4 + 2 for _ in range(2)]
    ours = BatchNorm(5, eps=1e-5, momentum=0.1, param_dtype=jnp.float32)
    ours.scale.value = jnp.asarray(rng.standard_normal(5).astype(np.float32))
    ours.bias.value = jnp.asarray(rng.standard_normal(5).astype(np.float32))
    theirs = torch.nn.BatchNorm1d(5)
    with torch.no_grad():
        theirs.weight.copy_(torch.tensor(np.asarray(ours.scale[...])))
        theirs.bias.copy_(torch.tensor(np.asarray(ours.bias[...])))
    theirs.train()
    expected = [theirs(torch.from_numpy(c).reshape(-1, 5)).detach().numpy().reshape(c.shape) for c in calls]
    got = ours(jnp.asarray(np.stack(calls)), train=True, call_axis=0)
    np.testing.assert_allclose(np.asarray(got), np.stack(expected), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours.mean[...]), theirs.running_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.var[...]), theirs.running_var.numpy(), rtol=1e-6)
    assert int(ours.num_batches_tracked[...]) == int(theirs.num_batches_tracked)
    theirs.eval()
    x = rng.standard_normal((4, 5)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x), train=False)),
                               theirs(torch.from_numpy(x)).detach().numpy(), atol=1e-5)


def test_bad_input_is_rejected(reference_htsat):
    model = reference_htsat
    with pytest.raises(ValueError, match="bins"):
        model(jnp.zeros((1, 1001, 32)))
    with pytest.raises(ValueError, match="frames"):
        model(jnp.zeros((1, 1100, 64)))
    with pytest.raises(ValueError, match="unknown HTSAT preset"):
        htsat_preset("huge")
    with pytest.raises(ValueError, match="even"):
        htsat_preset("tiny", depths=(2, 2, 3, 2))


def test_every_variable_has_valid_logical_axes():
    """Every parameter/statistic of HTSAT-large and the large audio transformer maps onto a mesh through the one
    rules table (unknown names or rank mismatches raise); the big matrices are actually sharded."""
    from af2_jax import sharding
    from af2_jax.models.audio_transformer import AudioTransformer, audio_transformer_preset

    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    for make in (lambda: HTSAT(htsat_preset("large"), rngs=nnx.Rngs(0)),
                 lambda: AudioTransformer(audio_transformer_preset("large"), rngs=nnx.Rngs(0))):
        state = nnx.state(nnx.eval_shape(make))
        specs = flatten(jax.tree.map(lambda s: s.spec, sharding.state_shardings(state, mesh)).to_pure_dict())
        assert specs, "no variables"
        big = [p for p, spec in specs.items() if any(axis is not None for axis in spec)]
        assert big, "nothing is sharded"
    assert specs["layers/attention/query/kernel"] == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_training_fusion_branch_matches_torch(reference_htsat):
    """The training-mode 'longer' window path (mel_conv2d over 3 local copies + AFF with batch-statistics BatchNorms
    on the duplicated window, then LayerNorm) against the same computation in torch.nn layers with the fixture's
    weights; also the BatchNorm running-statistic updates of two consecutive reference calls."""
    graphdef, state = nnx.split(reference_htsat.patch_embed)
    ours = nnx.merge(graphdef, state)  # a private copy: its statistics update without touching the shared model
    flat = {k: np.array(v) for k, v in flatten(nnx.state(ours).to_pure_dict()).items()}
    e = flat["proj/bias"].shape[0]

    def conv(name, stride=None):
        kernel = flat[f"{name}/kernel"]
        m = torch.nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[:2], stride=stride or kernel.shape[:2])
        with torch.no_grad():
            m.weight.copy_(torch.tensor(kernel.transpose(3, 2, 0, 1)))
            m.bias.copy_(torch.tensor(flat[f"{name}/bias"]))
        return m

    def bn(name):
        m = torch.nn.BatchNorm2d(flat[f"{name}/scale"].shape[0])
        with torch.no_grad():
            for ours_name, theirs in (("scale", m.weight), ("bias", m.bias), ("mean", m.running_mean),
                                      ("var", m.running_var)):
                theirs.copy_(torch.tensor(flat[f"{name}/{ours_name}"]))
        return m

    fm = "fusion_model"
    local_att = torch.nn.Sequential(conv(f"{fm}/local_conv1"), bn(f"{fm}/local_bn1"), torch.nn.ReLU(),
                                    conv(f"{fm}/local_conv2"), bn(f"{fm}/local_bn2")).train()
    global_att = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), conv(f"{fm}/global_conv1"), bn(f"{fm}/global_bn1"),
                                     torch.nn.ReLU(), conv(f"{fm}/global_conv2"), bn(f"{fm}/global_bn2")).train()
    proj, mel_conv = conv("proj"), conv("mel_conv2d")

    def torch_longer_window(image):  # image (256, 256) -> normalised tokens (4096, E)
        with torch.no_grad():
            x = torch.tensor(image)[None, None]
            glob = proj(x)  # (1, E, 64, 64)
            local = mel_conv(x.repeat(3, 1, 1, 1))  # the 3 local copies, (3, E, 64, 21)
            local = local[None].permute(0, 2, 3, 1, 4).flatten(3)  # (1, E, 64, 63)
            local = torch.cat([local, torch.zeros(1, e, 64, 64 - local.shape[-1])], dim=-1)
            xa = torch.cat([glob + local] * 2)  # the reference duplicates a batch of one
            w = torch.sigmoid(local_att(xa) + global_att(xa))
            fused = (2 * glob * w + 2 * local * (1 - w))[0]
            tokens = fused.flatten(1).T
            return torch.nn.functional.layer_norm(tokens, (e,), torch.tensor(flat["norm/scale"]),
                                                  torch.tensor(flat["norm/bias"]), 1e-5).numpy()

    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 2, 256, 256)).astype(np.float32)  # 2 calls x 2 windows
    fuse = np.array([1, 0])
    got = np.asarray(ours(jnp.asarray(images), fuse_index=jnp.asarray(fuse)))
    for call in range(2):
        expected = torch_longer_window(images[call, fuse[call]])
        np.testing.assert_allclose(got[call, fuse[call]], expected, atol=2e-5, rtol=1e-4)
    unfused = np.asarray(nnx.merge(graphdef, state)(jnp.asarray(images)))
    np.testing.assert_array_equal(got[0, 0], unfused[0, 0])  # the other windows skip the fusion branch
    after = {k: np.array(v) for k, v in flatten(nnx.state(ours).to_pure_dict()).items()}
    for name, module in (("local_bn1", local_att[1]), ("global_bn2", global_att[5])):
        np.testing.assert_allclose(after[f"{fm}/{name}/mean"], module.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(after[f"{fm}/{name}/var"], module.running_var.numpy(), rtol=1e-5, atol=1e-6)
        assert int(after[f"{fm}/{name}/num_batches_tracked"]) == int(module.num_batches_tracked)


def test_spec_augment_zeroes_bounded_stripes():
    from af2_jax.models.spec_augment import spec_augment

    x = jnp.ones((64, 1001, 64))
    y = np.asarray(spec_augment(x, jax.random.key(0), (64, 2), (8, 2)))
    zero_frames = (y == 0).all(axis=2)  # fully dropped frames, per sample
    zero_bins = (y == 0).all(axis=1)
    assert np.array_equal(y == 0, zero_frames[:, :, None] | zero_bins[:, None, :])  # only whole stripes
    assert zero_frames.sum(1).max() <= 2 * 63 and zero_bins.sum(1).max() <= 2 * 7
    assert zero_frames.any() and zero_bins.any()
    per_sample = zero_frames.sum(1)
    assert len(set(per_sample.tolist())) > 1  # drawn per sample
