"""HTSAT's configuration and presets (a module of its own so that the layers and the converters can read it without
importing the model)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from af2_jax.models import scan as scan_lib


@dataclasses.dataclass(frozen=True)
class HTSATConfig:
    spec_size: int = 256
    patch_size: int = 4
    patch_stride: int = 4
    window_size: int = 8
    in_chans: int = 1
    mel_bins: int = 64
    embed_dim: int = 256
    depths: tuple[int, ...] = (2, 2, 12, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.1
    num_classes: int = 527
    enable_fusion: bool = True  # AFF ('aff_2d') fusion branch: parameters always exist, used in training mode only
    eps: float = 1e-5  # LayerNorm and BatchNorm
    bn_momentum: float = 0.1  # torch convention: running = (1 - m) running + m batch
    n_fft: int = 1024  # shapes of the (unused) torchlibrosa STFT / mel buffers
    spec_augment_time: tuple[int, int] = (64, 2)  # (drop width, stripes) along frames
    spec_augment_freq: tuple[int, int] = (8, 2)  # (drop width, stripes) along mel bins
    remat_policy: str = "none"  # see af2_jax.models.scan.REMAT_POLICIES
    scan_blocks: bool = True  # scan each stage over (unshifted, shifted) block pairs: compiles ~1.5x faster than
    #                           unrolled (docs/PERFORMANCE.md)
    # > 0: window attention loops over groups of attention windows holding about this many scores, so that they stay
    # in cache between the matmuls and the softmax (CPU encoder forward 1.9-2.4x faster, docs/PERFORMANCE.md); 0: all
    # windows at once, what accelerators want; None: 2**18 on the CPU backend, else 0. The results are the same.
    attention_chunk_scores: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "num_heads", tuple(self.num_heads))
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} differ in length")
        if any(d % 2 for d in self.depths):
            raise ValueError(f"every stage depth must be even (unshifted/shifted block pairs), got {self.depths}")
        if self.patch_size != self.patch_stride:
            raise ValueError("only non-overlapping patches (patch_size == patch_stride) are supported")
        if self.in_chans != 1:
            raise ValueError("HTSAT's patch embedding reads the global mel only (in_chans=1)")
        if self.spec_size % self.mel_bins or self.spec_size % (self.patch_stride << (len(self.depths) - 1)):
            raise ValueError(f"spec_size {self.spec_size} must be a multiple of mel_bins and of the total stride")
        for s, heads in enumerate(self.num_heads):
            if (self.embed_dim << s) % heads:
                raise ValueError(f"stage {s} width {self.embed_dim << s} is not divisible by {heads} heads")
        if self.remat_policy not in scan_lib.REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat_policy!r}")

    @property
    def num_features(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def freq_ratio(self) -> int:
        return self.spec_size // self.mel_bins

    @property
    def target_frames(self) -> int:
        return self.spec_size * self.freq_ratio

    @property
    def grid_size(self) -> int:
        return self.spec_size // self.patch_stride

    @property
    def tokens_per_window(self) -> int:
        return (self.grid_size >> (len(self.depths) - 1)) ** 2

    def stage_resolution(self, stage: int) -> int:
        return self.grid_size >> stage

    def stage_window(self, stage: int) -> int:
        return min(self.window_size, self.stage_resolution(stage))

    def stage_shift(self, stage: int) -> int:
        """Cyclic shift of the odd blocks; none when one window covers the whole grid."""
        return 0 if self.stage_resolution(stage) <= self.window_size else self.window_size // 2

    def drop_path_rates(self) -> np.ndarray:
        return np.linspace(0.0, self.drop_path_rate, sum(self.depths), dtype=np.float32)


_PRESETS = {
    "large": dict(embed_dim=256, depths=(2, 2, 12, 2), num_heads=(4, 8, 16, 32), num_classes=527),
    # the golden fixture af2_tiny (config.json -> htsat.constructor_args)
    "tiny": dict(embed_dim=16, depths=(2, 2, 12, 2), num_heads=(4, 8, 16, 32), num_classes=10),
}


def htsat_preset(name: str, **overrides) -> HTSATConfig:
    if name not in _PRESETS:
        raise ValueError(f"unknown HTSAT preset {name!r}; choose one of {sorted(_PRESETS)}")
    return HTSATConfig(**{**_PRESETS[name], **overrides})


