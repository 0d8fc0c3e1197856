"""bicubic_resize_axis against PyTorch's own F.interpolate(mode='bicubic', align_corners=True)."""
import numpy as np
import pytest
import torch

from af2_jax.audio.resize import bicubic_matrix, bicubic_resize_axis


def _torch_resize_rows(x: np.ndarray, out_size: int) -> np.ndarray:
    """Resize axis -2 of (N, T, F) with torch, leaving F as it is (F -> F is the identity under align_corners)."""
    t = torch.from_numpy(x)[:, None]  # (N, 1, T, F)
    out = torch.nn.functional.interpolate(t, size=(out_size, x.shape[-1]), mode="bicubic", align_corners=True)
    return out[:, 0].numpy()


@pytest.mark.parametrize("in_size,out_size,width", [(1001, 1024, 64), (7, 13, 5), (13, 7, 3), (2, 9, 4),
                                                     (100, 256, 1), (1, 5, 2)])
def test_matches_torch_bicubic(in_size, out_size, width):
    rng = np.random.default_rng(in_size * 1000 + out_size)
    x = (rng.standard_normal((3, in_size, width)) * 20.0 - 5.0).astype(np.float32)
    expected = _torch_resize_rows(x, out_size)
    ours = np.asarray(bicubic_resize_axis(x, out_size, axis=1))
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * np.abs(x).max())


def test_other_axis_and_identity():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64, 11)).astype(np.float32)  # resize the last axis this time
    expected = np.swapaxes(_torch_resize_rows(np.swapaxes(x, 1, 2), 20), 1, 2)
    np.testing.assert_allclose(np.asarray(bicubic_resize_axis(x, 20, axis=-1)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(bicubic_resize_axis(x, 64, axis=1)), x)


def test_matrix_rows_sum_to_one_and_bad_input():
    m = bicubic_matrix(1001, 1024).astype(np.float64)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="positive"):
        bicubic_matrix(0, 4)
    with pytest.raises(TypeError, match="floating"):
        bicubic_resize_axis(np.arange(10), 12, axis=0)
