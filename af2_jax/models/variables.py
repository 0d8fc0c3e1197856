"""Variable kinds beyond nnx.Param / nnx.BatchStat."""
from flax import nnx


class Buffer(nnx.Variable):
    """A tensor kept only so that checkpoints round-trip exactly (never trained, never read by the forward pass),
    e.g. HTSAT's unused classifier head, its fixed STFT bases, BatchNorm's num_batches_tracked."""
