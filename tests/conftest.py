"""Test setup: 8 simulated CPU devices (set before JAX starts), fp32, and the golden fixture's location."""
import os
import pathlib

# 8 simulated devices for sharding tests; XLA CPU backend optimisation off: the suite is dominated by compiling
# tiny programs, which this cuts by about a third (numerics are guarded by the fixture parity tests).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE_DIR = pathlib.Path(os.environ.get("AF2_FIXTURE_DIR", REPO.parent / "shared" / "fixtures" / "af2_tiny"))


@pytest.fixture(scope="session")
def fixture_dir() -> pathlib.Path:
    """The reference's golden outputs (../shared/fixtures/af2_tiny); a missing fixture is an error, not a skip."""
    if not (FIXTURE_DIR / "outputs.npz").is_file():
        raise FileNotFoundError(f"golden fixture not found at {FIXTURE_DIR} (set AF2_FIXTURE_DIR)")
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def fixture_inputs(fixture_dir):
    return dict(np.load(fixture_dir / "inputs.npz"))


@pytest.fixture(scope="session")
def fixture_outputs(fixture_dir):
    return dict(np.load(fixture_dir / "outputs.npz"))
