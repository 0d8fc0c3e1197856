"""Small audio files and manifests for the data tests (written into pytest's tmp_path)."""
import json

import numpy as np
import soundfile

RATE = 16000


def int16_tone(seconds: float, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    """An int16 signal reaching exactly +-32767 with negative samples, so the reference's peak normalisation
    of soundfile's k/32768 floats gives back k/32767 exactly: its prepared int16 form is the signal itself."""
    n = int(seconds * RATE)
    x = np.sin(2 * np.pi * freq * np.arange(n) / RATE) + 0.1 * np.random.default_rng(seed).standard_normal(n)
    x = np.rint(x / np.abs(x).max() * 32767).astype(np.int16)
    return x


def write_wav(path, samples: np.ndarray, rate: int = RATE):
    soundfile.write(str(path), samples, rate, subtype="PCM_16")
    return path


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
