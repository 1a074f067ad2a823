"""Intensity normalisation applied before the network."""

from __future__ import annotations

import numpy as np


def normalize_percentile(
    image: np.ndarray, low: float = 1.0, high: float = 99.8, eps: float = 1e-6
) -> np.ndarray:
    """Scale each channel so its ``low`` and ``high`` percentiles map to 0 and 1.

    Parameters
    ----------
    image : np.ndarray
        (H, W) or (C, H, W).
    low, high : float
        Percentiles, 0..100.
    eps : float
        Guards against division by zero on flat images.

    Returns
    -------
    np.ndarray
        float32 array of the same shape (values may fall outside [0, 1]).
    """
    image = np.asarray(image, dtype=np.float32)
    if not np.all(np.isfinite(image)):
        raise ValueError("image contains NaN or infinite values")
    squeeze = image.ndim == 2
    chans = image[None] if squeeze else image
    out = np.empty_like(chans)
    for c, chan in enumerate(chans):
        lo, hi = np.percentile(chan, [low, high])
        out[c] = (chan - lo) / max(hi - lo, eps)
    return out[0] if squeeze else out
