"""PSNR and SSIM against values computed here by other means: closed forms for flat images,
and SSIM's definition evaluated window by window in NumPy."""

import numpy as np
import pytest

from fluxflow_jax.evaluation.image_metrics import SSIM_WINDOW, psnr, ssim


def _flat(value: float, shape=(1, 16, 16, 3)) -> np.ndarray:
    """An image of one grey level, given on the [0, 1] scale, as the models' [-1, 1]."""
    return np.full(shape, 2 * value - 1, np.float32)


def test_psnr_of_a_uniform_error_is_its_closed_form():
    # MSE = 0.1^2 on the [0, 1] scale: PSNR = 10 log10(1 / 0.01) = 20 dB.
    assert float(psnr(_flat(0.5), _flat(0.6))[0]) == pytest.approx(20.0, abs=1e-4)
    assert float(psnr(_flat(0.2), _flat(0.21))[0]) == pytest.approx(40.0, abs=1e-3)
    assert np.isinf(psnr(_flat(0.3), _flat(0.3))[0])


def test_ssim_of_flat_images_is_the_luminance_term():
    # No variance anywhere: SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = 0.01^2.
    a, b, c1 = 0.3, 0.7, 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    # float32: E[x^2] - E[x]^2 leaves ~1e-8 of variance, 3e-5 relative here.
    assert float(ssim(_flat(a), _flat(b))[0]) == pytest.approx(expected, rel=1e-4)


def _reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two [H, W, C] images in [0, 1] (Wang et al. 2004): at every position of an
    11x11 window weighted by a Gaussian of sigma 1.5, per channel, then the mean."""
    offsets = np.arange(11) - 5.0
    g = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 1.5**2))
    g /= g.sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for c in range(x.shape[-1]):
        for i in range(x.shape[0] - 10):
            for j in range(x.shape[1] - 10):
                p, q = x[i:i + 11, j:j + 11, c], y[i:i + 11, j:j + 11, c]
                mp, mq = (g * p).sum(), (g * q).sum()
                vp, vq = (g * (p - mp) ** 2).sum(), (g * (q - mq) ** 2).sum()
                cov = (g * (p - mp) * (q - mq)).sum()
                values.append((2 * mp * mq + c1) * (2 * cov + c2)
                              / ((mp**2 + mq**2 + c1) * (vp + vq + c2)))
    return float(np.mean(values))


def test_ssim_matches_the_definition_window_by_window():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(2, 18, 15, 3))
    y = np.clip(x + rng.normal(0, 0.15, x.shape), 0, 1)  # a noisy copy: SSIM in (0, 1)
    got = np.asarray(ssim((2 * x - 1).astype(np.float32), (2 * y - 1).astype(np.float32)))
    expected = [_reference_ssim(x[b], y[b]) for b in range(2)]
    assert got == pytest.approx(expected, abs=2e-5)
    assert 0.2 < got.min() and got.max() < 0.95
    assert np.asarray(ssim(x.astype(np.float32), x.astype(np.float32))) == \
        pytest.approx(1.0, abs=1e-6)


def test_ssim_refuses_images_smaller_than_its_window():
    small = np.zeros((1, SSIM_WINDOW - 1, 32, 3), np.float32)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(small, small)
