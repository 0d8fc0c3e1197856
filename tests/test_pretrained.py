"""Our pretrained on-disk format: save/load round trips (fp32 and bf16 bit for bit), model rebuilding, nested
config dataclasses, sharded loading and clear errors."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import af2_jax  # noqa: F401
from af2_jax import pretrained, sharding
from af2_jax.param_tree import flatten
from af2_jax.convert.mapping import ConversionError
from af2_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM, qwen2_preset


def host_params(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flatten(nnx.state(model).to_pure_dict()).items()}


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_save_load_round_trip_is_bit_exact(tmp_path, param_dtype):
    config = qwen2_preset("tiny-untied", param_dtype=param_dtype, remat_policy="dots")
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(1))
    (tmp_path / "tokenizer.json").write_text("{}")  # other files may live beside the params
    pretrained.save(tmp_path, config, model)
    loaded_config, params = pretrained.load(tmp_path)
    assert loaded_config == config and loaded_config.param_dtype is param_dtype
    expected = host_params(model)
    assert sorted(params) == sorted(expected)
    for key, value in expected.items():
        got = np.asarray(params[key])
        assert got.dtype == value.dtype, key
        np.testing.assert_array_equal(got.view(np.uint8), value.view(np.uint8), err_msg=key)
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == {}


def test_load_model_rebuilds_the_model(tmp_path):
    config = qwen2_preset("tiny")
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(2))
    pretrained.save(tmp_path, config, host_params(model))  # a flat dict works as well as a model
    loaded = pretrained.load_model(tmp_path)
    assert isinstance(loaded, Qwen2ForCausalLM) and loaded.config == config
    ids = jnp.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    np.testing.assert_array_equal(np.asarray(loaded(ids)[0]), np.asarray(model(ids)[0]))


def test_load_on_a_mesh_shards_by_logical_axes(tmp_path):
    config = qwen2_preset("tiny")
    pretrained.save(tmp_path, config, Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    _, params = pretrained.load(tmp_path, mesh=mesh)
    kernel = params["layers/mlp/gate_proj/kernel"]  # logical ('layers', 'embed', 'mlp')
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (3, 64 // 4, 128 // 2)


def test_save_rejects_params_that_do_not_match_the_config(tmp_path):
    config = qwen2_preset("tiny")
    params = host_params(Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
    del params["norm/scale"]
    params["extra/param"] = np.zeros(3, np.float32)
    params["embed_tokens/embedding"] = params["embed_tokens/embedding"][:-1]
    with pytest.raises(ConversionError) as err:
        pretrained.save(tmp_path, config, params)
    for name in ("norm/scale", "extra/param", "embed_tokens/embedding: got (299, 64), expected (300, 64)"):
        assert name in str(err.value)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        pretrained.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": "nope", "config": {}}))
    with pytest.raises(ValueError, match="unknown model kind 'nope'"):
        pretrained.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": "qwen2", "config": {"hidden": 3}}))
    with pytest.raises(ValueError, match="unknown fields \\['hidden'\\]"):
        pretrained.load(tmp_path)


@dataclasses.dataclass(frozen=True)
class _Inner:
    width: int = 2
    kernel: tuple[int, int] = (3, 3)
    dtype: object = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Outer:
    inner: _Inner = _Inner()
    llm: Qwen2Config | None = None
    name: str = "x"
    param_dtype: object = jnp.float32


def test_nested_config_dataclasses_survive_json():
    config = _Outer(inner=_Inner(width=5, kernel=(1, 2), dtype=jnp.bfloat16),
                    llm=qwen2_preset("tiny", dtype=jnp.bfloat16, vocab_size=301), param_dtype=jnp.bfloat16)
    text = json.dumps(pretrained.config_to_dict(config))
    data = json.loads(text)
    assert data["inner"]["dtype"] == "bfloat16" and data["llm"]["vocab_size"] == 301
    restored = pretrained.config_from_dict(_Outer, data)
    assert restored == config
    assert restored.inner.kernel == (1, 2) and restored.llm.dtype is jnp.bfloat16


def test_kind_registry_resolves_lazily():
    assert pretrained.kind_of(qwen2_preset("tiny")) == "qwen2"
    with pytest.raises(KeyError, match="_Outer"):
        pretrained.kind_of(_Outer())
    config_cls, model_cls = pretrained.MODEL_KINDS["qwen2"].resolve()
    assert config_cls is Qwen2Config and model_cls is Qwen2ForCausalLM


_SAVE_ON_TWO_DEVICES = """
import sys
import jax
from flax import nnx
from af2_jax import pretrained, sharding
from af2_jax.models.qwen2 import Qwen2ForCausalLM, qwen2_preset
config = qwen2_preset("tiny")
pretrained.save(sys.argv[1] + "/plain", config, Qwen2ForCausalLM(config, rngs=nnx.Rngs(3)))
model = pretrained.load_model(sys.argv[1] + "/plain", mesh=sharding.make_mesh(fsdp=2))
assert len(model.layers.mlp.gate_proj.kernel.get_value().sharding.device_set) == 2
pretrained.save(sys.argv[1] + "/sharded", config, model)  # its arrays live on both devices
"""

_LOAD_ON_ONE_DEVICE = """
import sys
import numpy as np
import jax
from af2_jax import pretrained
assert jax.device_count() == 1
config, params = pretrained.load(sys.argv[1])
np.savez(sys.argv[2], **{k.replace("/", "|"): np.asarray(v) for k, v in params.items()})
pretrained.load_model(sys.argv[1])
"""


def _python(code: str, *args, devices: int) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""}
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=pretrained.Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_model_saved_on_any_mesh_loads_on_any_other(tmp_path):
    """A model trained on 2 devices (the README's main job) loads on 1 device, on 8, and on an 8-device mesh:
    the checkpoint's own shardings are never reused."""
    _python(_SAVE_ON_TWO_DEVICES, tmp_path, devices=2)
    _, expected = pretrained.load(tmp_path / "plain")
    _, here = pretrained.load(tmp_path / "sharded")  # this process has 8 devices
    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    _, on_mesh = pretrained.load(tmp_path / "sharded", mesh=mesh)
    _python(_LOAD_ON_ONE_DEVICE, tmp_path / "sharded", tmp_path / "one.npz", devices=1)
    one = {k.replace("|", "/"): v for k, v in np.load(tmp_path / "one.npz").items()}
    assert here.keys() == on_mesh.keys() == one.keys() == expected.keys()
    for key, value in expected.items():
        for got in (here, on_mesh, one):
            np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=key)
    assert on_mesh["layers/mlp/gate_proj/kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_one_model_directory_weights_config_and_tokenizer(tmp_path):
    from af2_jax.tokenizer import TokenizerError, train_tiny_tokenizer

    config = qwen2_preset("tiny")
    tokenizer = train_tiny_tokenizer(["a tiny corpus of words", "and some more words"], vocab_size=280)
    model_dir = tmp_path / "run" / "final"
    pretrained.save(model_dir, config, Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)), tokenizer=tokenizer)
    (tmp_path / "run" / pretrained.RUN_CONFIG_FILE).write_text(json.dumps({"tokenizer": ""}))
    for given in (model_dir, tmp_path / "run"):  # the model, or the workdir that exported it
        assert pretrained.resolve(given) == model_dir
        assert pretrained.load_tokenizer(given).encode("some words") == tokenizer.encode("some words")
    assert pretrained.load(tmp_path / "run")[0] == config
    # an unfinished workdir is named as such; a directory without a tokenizer says how to give one
    (tmp_path / "unfinished" / "checkpoints" / "3").mkdir(parents=True)
    (tmp_path / "unfinished" / pretrained.RUN_CONFIG_FILE).write_text("{}")
    with pytest.raises(FileNotFoundError, match="has not finished .*step 3"):
        pretrained.resolve(tmp_path / "unfinished")
    pretrained.save(tmp_path / "bare", config, Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
    with pytest.raises(TokenizerError, match="--tokenizer"):
        pretrained.load_tokenizer(tmp_path / "bare")


def test_legacy_workdirs_still_resolve(tmp_path):
    """Runs from before run_config.json: the run config was config.json, and final/ held no tokenizer (the run's
    `tokenizer` setting, '' = the synthetic one, says which it trained with)."""
    from af2_jax.data.synthetic import synthetic_tokenizer

    config = qwen2_preset("tiny")
    pretrained.save(tmp_path / "final", config, Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
    (tmp_path / "config.json").write_text(json.dumps({"tokenizer": "", "num_steps": 3}))
    assert pretrained.run_config_file(tmp_path) == tmp_path / "config.json"
    assert pretrained.resolve(tmp_path) == tmp_path / "final"
    assert len(pretrained.load_tokenizer(tmp_path)) == len(synthetic_tokenizer())


def test_missing_fixtures_say_where_they_belong():
    from tests.conftest import golden_fixture

    with pytest.raises(FileNotFoundError, match="AF2_JAX_FIXTURES"):
        golden_fixture("no_such_fixture")
