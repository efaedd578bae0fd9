"""The VAE's image-statistics regularisers (the 0.8.1 PyTorch trainer's), as pure functions.

Each compares the decoded images with the originals (NHWC, values about [-1, 1]) through a
statistic of the whole batch rather than pixel by pixel: colour statistics (per-channel mean
and std), the per-channel value histogram, contrast (std ratios), and coarseness (the
distribution of local patch variances). The formulas are the trainer's; the one deliberate
difference is the histogram's, whose hard bin counts have no gradient (see
``histogram_matching``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Weights with which the 0.8.1 trainer adds each term to the VAE loss (fixed, not balanced).
WEIGHTS = {"colorstats": 0.05, "histogram": 0.02, "contrast": 0.1, "coarseness": 0.02}


def _channels(images: jax.Array) -> list[jax.Array]:
    """Each colour channel's values over the batch, flattened (the trainer reads three)."""
    return [images[..., c].reshape(-1) for c in range(3)]


def colour_statistics(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over R, G, B of (mean_p - mean_t)^2 + (std_p - std_t)^2, statistics over the
    batch's pixels (std unbiased)."""
    total = jnp.zeros([], pred.dtype)
    for p, t in zip(_channels(pred), _channels(target)):
        total += (p.mean() - t.mean()) ** 2 + (p.std(ddof=1) - t.std(ddof=1)) ** 2
    return total / 3.0


def contrast(pred: jax.Array, target: jax.Array) -> jax.Array:
    """[sum over R, G, B of (std_p / (std_t + 1e-8) - 1)^2 + MSE of the per-image stds] / 4:
    global contrast per channel plus each image's contrast (stds unbiased)."""
    total = jnp.zeros([], pred.dtype)
    for p, t in zip(_channels(pred), _channels(target)):
        total += (p.std(ddof=1) / (t.std(ddof=1) + 1e-8) - 1.0) ** 2
    per_image = lambda x: x.reshape(x.shape[0], -1).std(axis=1, ddof=1)
    total += jnp.mean((per_image(pred) - per_image(target)) ** 2)
    return total / 4.0


def _cdf_distance(pred_histogram: jax.Array, target_histogram: jax.Array) -> jax.Array:
    """Mean |CDF_p - CDF_t| of two histograms, each normalised to sum 1 (1-Wasserstein
    distance in bin units, divided by the bin count)."""
    cdf = lambda h: jnp.cumsum(h / (h.sum() + 1e-8))
    return jnp.mean(jnp.abs(cdf(pred_histogram) - cdf(target_histogram)))


def value_histogram(values: jax.Array, bins: int = 64, soft: bool = True) -> jax.Array:
    """Counts of ``values`` in ``bins`` equal bins over [-1, 1]; values outside are left out
    (as ``torch.histc``). ``soft``: each value is shared linearly between the two bins whose
    centres enclose it (all of it in the first or last bin beyond their centres), so the
    counts are piecewise linear in the values and have a gradient; at a bin's centre the
    value counts in that bin alone, as a hard count. Not ``soft``: ``torch.histc``'s hard
    counts (ties on bin edges aside), which have no gradient."""
    inside = (values >= -1.0) & (values <= 1.0)
    position = (values + 1.0) * (bins / 2.0)  # in bin widths from -1
    if not soft:
        index = jnp.clip(jnp.floor(position), 0, bins - 1).astype(jnp.int32)
        return jax.lax.stop_gradient(
            jnp.zeros(bins, values.dtype).at[index].add(inside.astype(values.dtype)))
    centred = jnp.clip(position - 0.5, -1.0, bins - 0.5)  # bin k's centre at k
    lower = jnp.floor(centred)
    upper_share = centred - lower
    index = lower.astype(jnp.int32) + 1  # slot 0: a spare bin below the first
    counts = jnp.zeros(bins + 2, values.dtype)  # spare slots each side, folded in below
    counts = counts.at[index].add(jnp.where(inside, 1.0 - upper_share, 0.0))
    counts = counts.at[index + 1].add(jnp.where(inside, upper_share, 0.0))
    # Shares beyond the outer centres belong to the outer bins.
    return (counts[1:-1].at[0].add(counts[0])
            .at[-1].add(counts[-1]))


def histogram_matching(pred: jax.Array, target: jax.Array, bins: int = 64,
                       soft: bool = True) -> jax.Array:
    """Mean over R, G, B of the mean |CDF_p - CDF_t| of the ``bins``-bin value histograms on
    [-1, 1] (``value_histogram``).

    The 0.8.1 trainer counts with ``torch.histc``, which has no gradient: its term changes
    the reported loss and trains nothing. ``soft`` (the default here) makes the same distance
    differentiable, so the term does what it is for: it pulls the decoded values' per-channel
    distribution towards the originals'. ``soft=False`` is the trainer's term exactly.
    """
    total = jnp.zeros([], pred.dtype)
    for p, t in zip(_channels(pred), _channels(target)):
        total += _cdf_distance(value_histogram(p, bins, soft), value_histogram(t, bins, soft))
    return total / 3.0


def coarseness(pred: jax.Array, target: jax.Array, patch: int = 16,
               bins: int = 32) -> jax.Array:
    """Mean over R, G, B of the mean |CDF_p - CDF_t| of the distributions of local variance:
    each channel is cut into ``patch`` x ``patch`` tiles (a partial tile at the right or
    bottom edge is left out), each tile's variance (biased) clipped to [0, 1] and spread over
    ``bins`` centres on [0, 1] by a Gaussian of one bin spacing. 0 for images smaller than
    one tile."""
    height, width = pred.shape[1:3]
    if height < patch or width < patch:
        return jnp.zeros([], pred.dtype)
    rows, cols = height // patch, width // patch
    centres = jnp.linspace(0.0, 1.0, bins, dtype=pred.dtype)
    sigma = 1.0 / max(bins - 1, 1)

    def variance_histogram(images: jax.Array, channel: int) -> jax.Array:
        tiles = images[:, :rows * patch, :cols * patch, channel].reshape(
            images.shape[0], rows, patch, cols, patch)
        variances = jnp.clip(tiles.var(axis=(2, 4)).reshape(-1), 0.0, 1.0)
        return jnp.exp(-0.5 * ((variances[:, None] - centres[None, :]) / sigma) ** 2).sum(0)

    total = jnp.zeros([], pred.dtype)
    for c in range(3):
        total += _cdf_distance(variance_histogram(pred, c), variance_histogram(target, c))
    return total / 3.0
