"""NVIDIA AF2 release <-> ours, checked against the reference's own state dict (af2_tiny fixture): every key, alias
and dtype of `state_dict_keys.json`, values bit for bit from `state_dict.safetensors`."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from af2_jax.convert.af2_release import import_release, open_release, read_chunk_names
from af2_jax.convert.mapping import ConversionError
from af2_jax.convert.tensor_files import SafetensorsSource
from af2_jax.tokenizer import train_tiny_tokenizer

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reference(fixture_dir):
    """(manifest rows in state_dict() order, every key -> value with aliases resolved)."""
    rows = json.loads((fixture_dir / "state_dict_keys.json").read_text())
    stored = {}
    with safe_open(str(fixture_dir / "state_dict.safetensors"), framework="numpy") as f:
        for key in f.keys():
            stored[key] = f.get_tensor(key)
    values = {r["key"]: stored[r["key"]] if r["stored"] else stored[r["alias_of"]] for r in rows}
    return rows, values


def _write_release(directory, values, *, clap=None, metadata_as_list=True):
    """A release directory: the state dict in two safetensors chunks (+ an AF-CLAP .pt when `clap` is given)."""
    safe = directory / "safe_ckpt"
    safe.mkdir(parents=True)
    keys = list(values)
    chunks = {"model_chunk_0": keys[: len(keys) // 2], "model_chunk_1": keys[len(keys) // 2:]}
    for name, chunk_keys in chunks.items():
        save_file({k: np.array(values[k], order="C") for k in chunk_keys}, str(safe / f"{name}.safetensors"))
    meta = list(chunks) if metadata_as_list else {n: {"n": len(k)} for n, k in chunks.items()}
    (safe / "metadata.json").write_text(json.dumps(meta))
    if clap is not None:
        (directory / "clap_ckpt").mkdir()
        torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in clap.items()}, "epoch": 16},
                   directory / "clap_ckpt" / "epoch_16.pt")
    return directory


def _read_export(out_dir):
    meta = json.loads((out_dir / "safe_ckpt" / "metadata.json").read_text())
    assert isinstance(meta, dict), "we write metadata.json as a dict keyed by chunk name"
    source = SafetensorsSource([out_dir / "safe_ckpt" / f"{name}.safetensors" for name in read_chunk_names(
        out_dir / "safe_ckpt" / "metadata.json")])
    for name, keys in meta.items():
        with safe_open(str(out_dir / "safe_ckpt" / f"{name}.safetensors"), framework="numpy") as f:
            assert sorted(f.keys()) == sorted(keys)
    return source


def _assert_matches_reference(source, rows, values):
    assert sorted(source.keys()) == sorted(r["key"] for r in rows)
    for r in rows:
        got = source.get(r["key"])
        assert list(got.shape) == r["shape"] and got.dtype == np.dtype(r["dtype"]), r["key"]
        np.testing.assert_array_equal(got, values[r["key"]], err_msg=r["key"])


def test_release_round_trip_is_bit_exact_with_aliases_and_clap_override(tmp_path, reference):
    from af2_jax.convert.af2_release import export_release

    rows, values = reference
    # The AF-CLAP file holds the audio branch under module.audio_branch.* with DIFFERENT values (safe_ckpt must
    # win, as in the reference loader) and a text branch + optimizer-ish entries that are ignored by design.
    clap = {"module.audio_branch." + k[len("clap.nvclap."):]: v + 1 for k, v in values.items()
            if k.startswith("clap.nvclap.") and v.dtype.kind == "f"}
    clap.update({"module.text_branch.encoder.weight": np.ones((3, 2), np.float32),
                 "module.logit_scale_a": np.zeros((), np.float32)})
    release = _write_release(tmp_path / "release", values, clap=clap)
    config, params, report = import_release(release, progress=False)
    assert report["preset"] == "tiny"
    assert report["clap_checkpoint_keys_ignored"] == 2
    assert report["clap_keys_overridden_by_safe_ckpt"] == len(clap) - 2
    export_release(config, params, tmp_path / "out", max_chunk_bytes=4 << 20, progress=False)
    assert len(json.loads((tmp_path / "out" / "safe_ckpt" / "metadata.json").read_text())) > 1
    _assert_matches_reference(_read_export(tmp_path / "out"), rows, values)


def test_audio_branch_comes_from_the_clap_checkpoint_when_safe_ckpt_lacks_it(tmp_path, reference):
    rows, values = reference
    clap = {"module.audio_branch." + k[len("clap.nvclap."):]: v for k, v in values.items()
            if k.startswith("clap.nvclap.")}
    rest = {k: v for k, v in values.items() if not k.startswith("clap.nvclap.")}
    release = _write_release(tmp_path / "release", rest, clap=clap, metadata_as_list=False)
    _, params, report = import_release(release, progress=False)
    assert report["clap_keys_overridden_by_safe_ckpt"] == 0
    _, params_full, _ = import_release(_write_release(tmp_path / "full", values), progress=False)
    assert params.keys() == params_full.keys()
    for path in params:
        np.testing.assert_array_equal(params[path], params_full[path], err_msg=path)


def test_errors_name_the_offending_keys(tmp_path, reference, fixture_dir):
    _, values = reference
    bad = dict(values)
    del bad["lang_encoder.model.norm.weight"]
    bad["lang_encoder.model.unknown.weight"] = np.zeros(3, np.float32)
    alias = "lang_encoder.old_decoder_blocks.1.mlp.up_proj.weight"
    bad[alias] = bad[alias] + 1.0  # an alias that disagrees with its canonical twin
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConversionError) as err:
        import_release(tmp_path / "bad.safetensors", progress=False)
    message = str(err.value)
    for key in ("lang_encoder.model.norm.weight", "lang_encoder.model.unknown.weight", alias):
        assert key in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        open_release(tmp_path / "empty")
    # the fixture file alone (no aliases except the stored lm_head) is a complete state dict
    import_release(fixture_dir / "state_dict.safetensors", progress=False)


def test_cli_both_ways_with_tokenizer(tmp_path, reference):
    rows, values = reference
    release = _write_release(tmp_path / "release", values)
    words = [f"w{i}" for i in range(400)]
    tokenizer = train_tiny_tokenizer([" ".join(words[i:i + 7]) for i in range(0, 400, 3)], vocab_size=296)
    assert len(tokenizer) == 300, "the tiny tokenizer must fill the fixture's 300-row vocabulary"
    tokenizer.save(tmp_path / "tok")
    ours = tmp_path / "ours"
    run = [sys.executable, str(REPO / "launch" / "convert.py")]
    done = subprocess.run(run + ["af2-from-torch", str(release), str(ours), "--tokenizer", str(tmp_path / "tok"),
                                 "--no-progress"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "clap_checkpoint_keys_ignored" in done.stdout
    assert (ours / "tokenizer" / "tokenizer.json").is_file()
    config = json.loads((ours / "config.json").read_text())
    assert config["model"] == "af2" and config["config"]["eos_token_id"] == tokenizer.eos_id
    done = subprocess.run(run + ["af2-to-torch", str(ours), str(tmp_path / "back"), "--no-progress",
                                 "--with-clap-ckpt"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    _assert_matches_reference(_read_export(tmp_path / "back"), rows, values)
    # the optional AF-CLAP-style file: exactly the reference's clap.nvclap.* tensors under module.audio_branch.*
    clap = torch.load(tmp_path / "back" / "clap_ckpt" / "epoch_16.pt", weights_only=True)["state_dict"]
    expected = {k for k in values if k.startswith("clap.nvclap.")}
    assert {"clap.nvclap." + k[len("module.audio_branch."):] for k in clap} == expected
    for key in clap:
        np.testing.assert_array_equal(clap[key].numpy(), values["clap.nvclap." + key[len("module.audio_branch."):]])
    # and a release made of it reads back (its audio branch overridden by safe_ckpt, as the reference does)
    _, _, report = import_release(tmp_path / "back", progress=False)
    assert report["clap_keys_overridden_by_safe_ckpt"] == len(expected)
    failed = subprocess.run(run + ["af2-from-torch", str(tmp_path / "nowhere"), str(tmp_path / "x")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert failed.returncode != 0 and "nowhere" in failed.stderr


def _random_af2(config, seed=0):
    from flax import nnx

    from af2_jax import param_tree
    from af2_jax.models.af2 import AF2Model

    return {k: np.asarray(v) for k, v in param_tree.model_params(AF2Model(config, rngs=nnx.Rngs(seed))).items()}


def test_cli_converts_a_checkpoint_of_no_preset_size(tmp_path):
    """Sizes no preset has (LLM width 96 with 2 layers, a 4-block HTSAT, an untied head): the shapes give every
    size; the head counts and the position limit, which no shape holds, are passed with --set."""
    import dataclasses

    from af2_jax import pretrained
    from af2_jax.convert.af2_release import export_release
    from af2_jax.models.af2 import af2_preset
    from af2_jax.models.qwen2 import qwen2_preset

    base = af2_preset("tiny")
    llm = qwen2_preset("tiny", hidden_size=96, intermediate_size=160, num_layers=2, num_heads=6, num_kv_heads=2,
                       vocab_size=260, tie_word_embeddings=False)
    config = dataclasses.replace(
        base, llm=llm, xattn=dataclasses.replace(base.xattn, dim=96, heads=2),
        htsat=dataclasses.replace(base.htsat, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4)),
        audio_time_embedding=False, max_windows=5, audio_token_id=256, eoc_token_id=257, pad_token_id=258,
        sep_token_id=259, eos_token_id=255)
    params = _random_af2(config)
    export_release(config, params, tmp_path / "release", progress=False)
    run = [sys.executable, str(REPO / "launch" / "convert.py"), "af2-from-torch", str(tmp_path / "release")]
    missing = subprocess.run(run + [str(tmp_path / "x"), "--no-progress"], capture_output=True, text=True)
    assert missing.returncode == 1 and "llm.num_heads" in missing.stderr and "Traceback" not in missing.stderr
    done = subprocess.run(run + [str(tmp_path / "ours"), "--no-progress", "--set", "llm.num_heads=6",
                                 "--set", "audio_transformer.n_heads=2", "--set", "max_windows=5",
                                 "--set", "llm.max_position_embeddings=512"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    got_config, got = pretrained.load(tmp_path / "ours")
    assert got_config == config
    assert got.keys() == params.keys()
    for key, value in params.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_garbage_files_and_wrong_shapes_are_named_once(tmp_path, reference):
    _, values = reference
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    run = [sys.executable, str(REPO / "launch" / "convert.py"), "af2-from-torch"]
    done = subprocess.run(run + [str(tmp_path / "garbage.safetensors"), str(tmp_path / "x")], capture_output=True,
                          text=True)
    assert done.returncode == 1 and "not a readable safetensors file" in done.stderr
    assert "Traceback" not in done.stderr
    bad = dict(values)
    key = "lang_encoder.model.norm.weight"
    bad[key] = np.zeros(bad[key].shape[0] + 1, np.float32)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConversionError) as err:
        import_release(tmp_path / "bad.safetensors", progress=False, preset="tiny")
    assert list(err.value.problems) == ["mis-shaped keys"], err.value.problems  # not also "missing"
    assert key in str(err.value)
