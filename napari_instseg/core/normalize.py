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


INPUT_NORMS = ("percentile", "flatfield")


def flatfield(image: np.ndarray, sigma: float = 16.0) -> np.ndarray:
    """Divide each channel by its Gaussian blur: uneven illumination removed.

    The blur is regularised by 1 % of the channel's 99.8th percentile, so the dark
    surroundings of a well do not turn into amplified noise.

    Parameters
    ----------
    image : np.ndarray
        (C, H, W) float array.
    sigma : float
        Gaussian sigma in pixels; larger than an object's width.

    Returns
    -------
    np.ndarray
        float32 (C, H, W), about 1 on even background.
    """
    from scipy import ndimage

    out = np.empty(image.shape, np.float32)
    for c, chan in enumerate(np.asarray(image, np.float32)):
        floor = 0.01 * max(float(np.percentile(chan, 99.8)), 1e-6)
        blur = ndimage.gaussian_filter(chan, sigma, mode="reflect")
        out[c] = chan / (np.abs(blur) + floor)
    return out


def model_input(
    image: np.ndarray,
    method: str = "percentile",
    low: float = 1.0,
    high: float = 99.8,
    flatfield_sigma: float = 16.0,
) -> np.ndarray:
    """What the network sees: normalised channels, plus flat-field copies if asked.

    Parameters
    ----------
    image : np.ndarray
        (C, H, W).
    method : {"percentile", "flatfield"}
        ``"flatfield"`` appends :func:`flatfield` of every channel (each percentile
        normalised), giving 2C channels.
    low, high : float
        Percentiles for :func:`normalize_percentile`.
    flatfield_sigma : float
        Passed to :func:`flatfield`.

    Returns
    -------
    np.ndarray
        float32 (C, H, W) or (2C, H, W).
    """
    if method not in INPUT_NORMS:
        raise ValueError(f"input normalisation must be one of {INPUT_NORMS}, not {method!r}")
    image = np.asarray(image, np.float32)
    norm = normalize_percentile(image, low, high)
    if method == "percentile":
        return norm
    flat = normalize_percentile(flatfield(image, flatfield_sigma), low, high)
    return np.concatenate([norm, flat], 0)
