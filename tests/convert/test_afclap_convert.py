"""NVIDIA's AF-CLAP checkpoint <-> ours, checked against the reference's own state dict (afclap_tiny fixture): the
fixture's state dict written as the released checkpoint is (`{'state_dict': ...}`, `module.` prefix, the tied T5
embedding under both names, optimizer state beside it) imports into a model that reproduces the fixture's
embeddings, and exports back to the same keys, order, dtypes and bits; every bad key is named; any size converts;
the converted model's audio half initialises AF2's HTSAT through `init_from=htsat=`."""
from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from af2_jax import param_tree, pretrained
from af2_jax.convert.afclap_keys import state_dict_keys
from af2_jax.convert.afclap_release import export_afclap, import_afclap
from af2_jax.convert.mapping import ConversionError
from af2_jax.convert.tensor_files import UnreadableFileError
from af2_jax.models.afclap import AFCLAPModel, afclap_preset
from tests.scripts import load_script

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
TIED, SHARED = "module.text_branch.encoder.embed_tokens.weight", "module.text_branch.shared.weight"
FEATURE_TOL = dict(atol=2e-5, rtol=0)  # fixture README: projections and normalised features


@pytest.fixture(scope="module")
def reference(afclap_fixture_dir):
    """(manifest rows in state_dict() order, every key -> value with the unstored alias filled from its twin)."""
    rows = [json.loads(line) for line in (afclap_fixture_dir / "state_dict_keys.json").read_text().splitlines()
            if line]
    stored = load_file(afclap_fixture_dir / "state_dict.safetensors")
    return rows, {r["key"]: stored[r["key"]] if r["stored"] else stored[r["alias_of"]] for r in rows}


def _torch_state(values):
    return {k: torch.from_numpy(np.array(v, order="C")) for k, v in values.items()}


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory):
    """The fixture as the released epoch_16.pt holds it: both tied names, optimizer state and epoch beside it."""
    _, values = reference
    path = tmp_path_factory.mktemp("ckpt") / "epoch_16.pt"
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4)}},
                 "param_groups": [{"lr": 1e-4, "params": [0]}]}
    torch.save({"epoch": 16, "state_dict": _torch_state(values), "optimizer": optimizer}, path)
    return path


@pytest.fixture(scope="module")
def imported(checkpoint):
    return import_afclap(checkpoint, progress=False)


def _features(config, params, afclap_dir):
    """Our (audio_features, text_features) on the fixture's inputs, rebuilt as its README says."""
    inputs = dict(np.load(afclap_dir / "inputs.npz"))
    mel = np.repeat(inputs["mel"][:, None], 4, axis=1)
    for i in np.flatnonzero(inputs["longer"]):
        mel[i, 1:] = inputs[f"mel_fusion_local_{i}"]
    abstract = nnx.eval_shape(lambda: AFCLAPModel(config, rngs=nnx.Rngs(0)))
    model = param_tree.model_from_flat(abstract, {k: jnp.asarray(v) for k, v in params.items()})
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, mel, longer, ids, mask):
        m = nnx.merge(graphdef, state)
        return m.audio_embedding(mel, longer), m.text_embedding(ids, mask)

    audio, text = run(state, jnp.asarray(mel), jnp.asarray(inputs["longer"]),
                      jnp.asarray(inputs["input_ids"], jnp.int32), jnp.asarray(inputs["attention_mask"], jnp.int32))
    return np.asarray(audio), np.asarray(text)


def test_import_reproduces_the_fixture_embeddings(imported, afclap_fixture_dir):
    config, params, report = imported
    assert config == afclap_preset("tiny")  # every size from the shapes: the fixture's config
    assert report["preset"] == "tiny" and report["keys_read"] == 357 and report["parameters"] == 139
    assert report["top_level_entries_ignored"] == "2 (epoch, optimizer)"
    assert report["tied_embedding"] == "both names, equal" and report["buffers_checked"] == 18 + 8
    assert "under 'state_dict'" in report["source"] and report["module_prefix"] == "'module.' on every key"
    out = dict(np.load(afclap_fixture_dir / "outputs.npz"))
    audio, text = _features(config, params, afclap_fixture_dir)
    for name, got in (("audio_features", audio), ("text_features", text)):
        print(f"{name}: max|diff| {np.abs(got - out[name]).max():.3g}")
        np.testing.assert_allclose(got, out[name], **FEATURE_TOL, err_msg=name)


def _assert_reference_state(state, rows, values):
    """`state` (key -> torch tensor) is the reference's state dict: keys in order, dtypes, shapes, every bit."""
    assert list(state) == [r["key"] for r in rows]
    for r in rows:
        got = state[r["key"]]
        assert str(got.dtype).removeprefix("torch.") == r["dtype"] and list(got.shape) == r["shape"], r["key"]
        expected = np.array(values[r["key"]], order="C")
        assert got.numpy().tobytes() == expected.tobytes(), r["key"]


def test_export_is_the_reference_state_dict_bit_for_bit(imported, reference, tmp_path):
    rows, values = reference
    config, params, _ = imported
    assert export_afclap(config, params, tmp_path / "out.pt") == 357
    saved = torch.load(tmp_path / "out.pt", weights_only=True)  # tensors only
    assert list(saved) == ["state_dict"]
    state = saved["state_dict"]
    _assert_reference_state(state, rows, values)
    # NVIDIA's loader strips 'module.' and loads strict: both tied names, one storage as in a tied model
    assert TIED in state and SHARED in state
    assert state[TIED].untyped_storage().data_ptr() == state[SHARED].untyped_storage().data_ptr()
    assert export_afclap(config, params, tmp_path / "out.safetensors") == 357
    safe = load_file(tmp_path / "out.safetensors")
    _assert_reference_state({k: torch.from_numpy(safe[k]) for k in [r["key"] for r in rows]}, rows, values)
    assert set(safe) == set(values)


def test_every_bad_key_is_named_once(reference, tmp_path):
    """A missing, an unexpected, a mis-shaped key, a tied name unequal to its twin, a Swin mask unequal to the
    recomputed one: one error naming each, once."""
    _, values = reference
    bad = dict(values)
    missing, unexpected = "module.text_projection.2.bias", "module.audio_branch.extra.weight"
    misshaped, mask = "module.text_transform.sequential.0.weight", "module.audio_branch.layers.1.blocks.1.attn_mask"
    del bad[missing]
    bad[unexpected] = np.zeros(3, np.float32)
    bad[misshaped] = np.zeros((96, 95), np.float32)
    bad[TIED] = values[SHARED] + 1.0
    bad[mask] = values[mask] * 2.0
    save_file({k: np.array(v, order="C") for k, v in bad.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConversionError) as e:
        import_afclap(tmp_path / "bad.safetensors", progress=False)
    message = str(e.value)
    for key in (missing, unexpected, misshaped, mask):
        assert message.count(key) == 1, (key, message)
    # whichever of the tied pair is read second is the one reported
    assert len(e.value.problems["keys that differ from their twin"]) == 1
    assert e.value.problems["keys that differ from their twin"][0] in (TIED, SHARED)
    assert "got (96, 95), expected (96, 96)" in message
    assert set(e.value.problems) == {"unexpected keys", "missing keys", "mis-shaped keys",
                                     "keys that differ from their twin",
                                     "buffers that differ from the recomputed value"}
    # a pickle that is more than tensors is refused, never unpickled
    torch.save({"state_dict": _torch_state({SHARED: values[SHARED]}), "args": argparse.Namespace(lr=1e-4)},
               tmp_path / "x.pt")
    with pytest.raises(UnreadableFileError, match="x.pt"):
        import_afclap(tmp_path / "x.pt", progress=False)
    save_file({"model.embed_tokens.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConversionError, match="not an AF-CLAP checkpoint"):
        import_afclap(tmp_path / "other.safetensors", progress=False)


def test_cli_both_ways(checkpoint, reference, afclap_fixture_dir, tmp_path, capsys):
    from af2_jax.clap_tokenizer import ClapTokenizer

    rows, values = reference
    main = load_script("launch/convert.py").main
    ours = tmp_path / "afclap"
    assert main(["afclap-from-torch", str(checkpoint), str(ours), "--no-progress",
                 "--tokenizer", str(afclap_fixture_dir / "tokenizer.json")]) == 0
    printed = capsys.readouterr().out
    assert "top_level_entries_ignored: 2 (epoch, optimizer)" in printed and "keys_read: 357" in printed
    assert pretrained.read_config(ours) == ("afclap", afclap_preset("tiny"))
    texts = ["a dog barks twice and then a car passes by"]
    np.testing.assert_array_equal(ClapTokenizer.from_file(ours / "tokenizer")(texts)[0],
                                  ClapTokenizer.from_file(afclap_fixture_dir / "tokenizer.json")(texts)[0])
    assert main(["afclap-to-torch", str(ours), str(tmp_path / "back.pt")]) == 0
    assert "wrote 357 state-dict keys under 'state_dict'" in capsys.readouterr().out
    _assert_reference_state(torch.load(tmp_path / "back.pt", weights_only=True)["state_dict"], rows, values)
    # errors are one line each, exit code 1
    assert main(["afclap-to-torch", str(tmp_path / "nowhere"), str(tmp_path / "x.pt")]) == 1
    assert main(["afclap-from-torch", str(checkpoint), str(tmp_path / "t"), "--tokenizer", str(tmp_path)]) == 1
    assert "no tokenizer.json" in capsys.readouterr().err


def _random_params(config, seed):
    state = jax.jit(lambda: nnx.state(AFCLAPModel(config, rngs=nnx.Rngs(seed)), nnx.Not(nnx.RngState)))()
    return {k: np.asarray(v) for k, v in param_tree.model_params(state).items()}


def test_any_size_round_trips_exactly(tmp_path):
    """A size no preset has (other HTSAT heads and depths, T5 width/heads/d_kv/layers/d_ff/buckets, joint width):
    the config comes back from the shapes (plus the one field no shape holds), the weights bit for bit, as .pt,
    .safetensors, without 'module.', and in bf16."""
    config = afclap_preset("tiny", htsat=dict(depths=(2, 4, 2, 2), num_heads=(2, 4, 8, 8), num_classes=5),
                           t5=dict(vocab_size=40, d_model=48, d_kv=6, num_heads=4, num_layers=3, d_ff=20,
                                   relative_attention_num_buckets=12, relative_attention_max_distance=40),
                           joint_dim=24)
    params = _random_params(config, 7)
    for name, prefix in (("a.pt", "module."), ("b.safetensors", "module."), ("c.pt", "")):
        export_afclap(config, params, tmp_path / name, prefix=prefix)
        got_config, got, report = import_afclap(tmp_path / name, progress=False,
                                                t5=dict(relative_attention_max_distance=40))
        assert got_config == config, name
        assert report["preset"].startswith("none") and report["module_prefix"] == (
            "'module.' on every key" if prefix else "none")
        assert got.keys() == params.keys()
        for key, value in params.items():
            assert got[key].dtype == value.dtype and got[key].tobytes() == value.tobytes(), (name, key)
    inferred, _, _ = import_afclap(tmp_path / "a.pt", progress=False)  # no shape holds the max distance
    assert inferred.t5 == afclap_preset("tiny", t5=dict(**{f: getattr(config.t5, f) for f in (
        "vocab_size", "d_model", "d_kv", "num_heads", "num_layers", "d_ff", "relative_attention_num_buckets")})).t5
    half_config, half, _ = import_afclap(tmp_path / "a.pt", dtype="bfloat16", progress=False,
                                         t5=dict(relative_attention_max_distance=40))
    assert half["t5/embed_tokens"].dtype == jnp.bfloat16 and half_config.t5.param_dtype == jnp.bfloat16
    export_afclap(half_config, half, tmp_path / "half.pt")
    assert torch.load(tmp_path / "half.pt", weights_only=True)["state_dict"][SHARED].dtype == torch.bfloat16
    _, again, _ = import_afclap(tmp_path / "half.pt", progress=False, t5=dict(relative_attention_max_distance=40))
    for key, value in half.items():
        assert np.array_equal(np.asarray(again[key], np.float32), np.asarray(value, np.float32)), key
    # the real HTSAT-afclap + flan-t5-large checkpoint: 555 keys (afclap_reference.md section 6)
    assert len(state_dict_keys(afclap_preset("large"))) == 555


@pytest.mark.slow  # ~30 s on 2 idle cores, nearly all of it building the stage-1 train state
def test_converted_afclap_initialises_af2_htsat(tmp_path):
    """export (an AF-CLAP of the tiny curriculum's HTSAT) -> afclap-from-torch -> `init_from=llm=...,htsat=<dir>`
    of a tiny AF2 stage-1 run: AF2's HTSAT variables are exactly the AF-CLAP model's `htsat/*`, nothing else of it
    is read."""
    sys.path.insert(0, str(REPO / "tests" / "training"))
    from helpers import flat, model_config, random_batches, stage_config

    from af2_jax.models.qwen2 import Qwen2ForCausalLM
    from af2_jax.training import initialization, loop

    clap_config = afclap_preset("tiny", htsat=dict(depths=(2, 2, 2, 2)))
    clap = _random_params(clap_config, 11)
    export_afclap(clap_config, clap, tmp_path / "clap.pt")
    convert_main = load_script("launch/convert.py").main
    assert convert_main(["afclap-from-torch", str(tmp_path / "clap.pt"), str(tmp_path / "clap"),
                         "--no-progress"]) == 0
    llm_config = model_config(stage_config(1)).llm
    llm = param_tree.model_params(jax.jit(lambda: nnx.state(Qwen2ForCausalLM(llm_config, rngs=nnx.Rngs(3))))())
    pretrained.save(tmp_path / "llm", llm_config, llm)

    arrays = initialization.read_init_from(f"htsat={tmp_path / 'clap'}")
    assert set(arrays) == {k for k in clap if k.startswith("htsat/")}  # not htsat/htsat/..., no t5/

    cfg = stage_config(1, init_from=f"llm={tmp_path / 'llm'},htsat={tmp_path / 'clap'}")
    result = loop.train(cfg, tmp_path / "s1", make_iterator=random_batches(), max_steps=0)
    got = {**flat(result.state["trainable"]), **flat(result.state["batch_stats"]), **flat(result.frozen)}
    htsat = {k: v for k, v in got.items() if k.startswith("htsat/")}
    assert htsat.keys() == {k for k in clap if k.startswith("htsat/")}
    for key, value in htsat.items():
        np.testing.assert_array_equal(value, clap[key], err_msg=key)
