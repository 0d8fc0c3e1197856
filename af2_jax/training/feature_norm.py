"""Where a run keeps HTSAT's calibrated output norm (`model.calibrate_feature_norm`; the calibration itself is
af2_jax/models/htsat_calibration.py). Frozen weights are not checkpointed (they come from `init_from` on every
start), so the calibrated values are saved beside the checkpoints and a resumed run reads them back instead of
measuring again; `init_from` of the workdir reads them too."""
from __future__ import annotations

import os
import pathlib

import numpy as np

from af2_jax.models.htsat_calibration import NORM

FILE = "htsat_feature_norm.npz"


def save(directory: pathlib.Path, values: dict[str, np.ndarray]) -> None:
    """Written whole or not at all (a temporary file renamed), so a crash never leaves half a calibration."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (FILE + ".tmp.npz")
    np.savez(tmp, **values)
    os.replace(tmp, directory / FILE)


def load(directory: pathlib.Path) -> dict[str, np.ndarray]:
    with np.load(directory / FILE, allow_pickle=False) as data:
        return {name: data[name] for name in ("scale", "bias")}


def as_params(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The calibrated values under their flat parameter paths (as `init_from` arrays)."""
    return {path: values[path.rsplit("/", 1)[1]] for path in NORM}
