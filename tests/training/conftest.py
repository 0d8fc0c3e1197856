"""Lets the training tests import their helpers (pytest runs in importlib mode, which adds no test folder to
sys.path), and gives them a persistent XLA compilation cache, fresh for each session: runs of the same stage on the
same mesh (several loop.train calls per test, the launch/train.py subprocess) compile their steps once."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))


@pytest.fixture(scope="session")
def compilation_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(autouse=True)
def _compilation_cache(compilation_cache_dir):
    import jax
    from jax._src import compilation_cache  # reset_cache: the cache is initialised once per process otherwise

    settings = {"jax_compilation_cache_dir": str(compilation_cache_dir),
                "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    previous = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
