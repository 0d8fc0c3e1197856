"""HF Qwen2 checkpoints -> ours -> HF: bit-exact round trips (one or many shards, fp32 and bf16), loading by
transformers, errors naming bad keys, and launch/convert.py end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import af2_jax  # noqa: F401
from af2_jax.convert.mapping import ConversionError
from af2_jax.convert.qwen2_hf import export_hf, import_hf
from tests.models.qwen2_reference import make_hf_qwen2

REPO = Path(__file__).resolve().parents[2]


def read_all(directory: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                assert key not in tensors
                tensors[key] = f.get_tensor(key)
    return tensors


def assert_same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        np.testing.assert_array_equal(a[key].view(np.uint8), b[key].view(np.uint8), err_msg=key)  # bit for bit


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """HF checkpoints saved by transformers: tied fp32 in one file, untied fp32 in many shards, tied bf16."""
    import torch

    root = tmp_path_factory.mktemp("hf")
    tied, untied = make_hf_qwen2("gqa2_tied", seed=3), make_hf_qwen2("mha_untied", seed=4)
    tied.save_pretrained(root / "tied")
    untied.save_pretrained(root / "untied_sharded", max_shard_size="40KB")
    tied.to(torch.bfloat16).save_pretrained(root / "tied_bf16")
    return root


def test_single_file_round_trip_is_bit_exact_and_loads_in_transformers(hf_dirs, tmp_path):
    import torch
    import transformers

    src = hf_dirs / "tied"
    config, params = import_hf(src, progress=False)
    assert "lm_head/kernel" not in params  # tied: the head is the embedding
    export_hf(config, params, tmp_path / "out", progress=False)
    assert_same_tensors(read_all(src), read_all(tmp_path / "out"))
    reference = transformers.Qwen2ForCausalLM.from_pretrained(src, dtype=torch.float32)
    loaded, info = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.config.tie_word_embeddings and loaded.config.rope_parameters["rope_theta"] == 1e6
    for (name, p), (_, q) in zip(reference.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name


def test_sharded_round_trip_is_bit_exact(hf_dirs, tmp_path):
    import torch
    import transformers

    src = hf_dirs / "untied_sharded"
    assert (src / "model.safetensors.index.json").is_file()
    config, params = import_hf(src, progress=False)
    assert not config.tie_word_embeddings and "lm_head/kernel" in params
    files = export_hf(config, params, tmp_path / "out", max_shard_bytes=50_000, progress=False)
    assert len(files) > 1
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(read_all(src))
    assert_same_tensors(read_all(src), read_all(tmp_path / "out"))
    _, info = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                            output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_bf16_checkpoint_round_trip_keeps_bf16(hf_dirs, tmp_path):
    src = hf_dirs / "tied_bf16"
    config, params = import_hf(src, progress=False)
    assert all(str(v.dtype) == "bfloat16" for v in params.values())
    export_hf(config, params, tmp_path / "out", progress=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert_same_tensors(read_all(src), read_all(tmp_path / "out"))
    # an fp32 import of the same file, exported with the recorded HF dtype overridden back to bf16, is still exact
    config32, params32 = import_hf(src, dtype="float32", progress=False)
    assert all(v.dtype == np.float32 for v in params32.values())
    export_hf(config32, params32, tmp_path / "out32", dtype="bfloat16", progress=False)
    assert_same_tensors(read_all(src), read_all(tmp_path / "out32"))


def _rewrite(src: Path, dst: Path, edit) -> None:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = read_all(src)
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_missing_extra_and_misshaped_keys_fail_together(hf_dirs, tmp_path):
    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.0.self_attn.rotary_emb.extra"] = np.zeros(3, np.float32)
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1]

    _rewrite(hf_dirs / "tied", tmp_path / "bad", edit)
    with pytest.raises(ConversionError) as err:
        import_hf(tmp_path / "bad", progress=False)
    message = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight" in message
    assert "model.layers.0.self_attn.rotary_emb.extra" in message
    assert "model.layers.0.self_attn.k_proj.weight: got (31, 64), expected (32, 64)" in message


def test_tied_head_that_differs_from_embedding_is_an_error(hf_dirs, tmp_path):
    def edit(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"] + 1

    _rewrite(hf_dirs / "tied", tmp_path / "bad", edit)
    with pytest.raises(ConversionError, match="differ from their twin"):
        import_hf(tmp_path / "bad", progress=False)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "convert.py"), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


def test_convert_cli_both_directions(hf_dirs, tmp_path):
    src = hf_dirs / "untied_sharded"
    done = run_cli("qwen2-from-hf", str(src), str(tmp_path / "ours"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ours" / "config.json").is_file() and (tmp_path / "ours" / "params").is_dir()
    done = run_cli("qwen2-to-hf", str(tmp_path / "ours"), str(tmp_path / "back"), "--no-progress",
                   "--max-shard-bytes", "60000")
    assert done.returncode == 0, done.stderr
    assert_same_tensors(read_all(src), read_all(tmp_path / "back"))


def test_convert_cli_errors_are_one_line_with_exit_code_1(hf_dirs, tmp_path):
    done = run_cli("qwen2-from-hf", str(tmp_path / "absent"), str(tmp_path / "ours"))
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "absent" in done.stderr and "Traceback" not in done.stderr

    def edit(t):
        del t["model.norm.weight"]

    _rewrite(hf_dirs / "tied", tmp_path / "bad", edit)
    done = run_cli("qwen2-from-hf", str(tmp_path / "bad"), str(tmp_path / "ours"), "--no-progress")
    assert done.returncode == 1
    assert "model.norm.weight" in done.stderr and "Traceback" not in done.stderr
