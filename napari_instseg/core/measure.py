"""Per-instance measurements: size, length, width, position, intensities, live/dead.

Length is the longest path through the instance's skeleton
(:func:`skimage.morphology.skeletonize`), with steps of 1 (edge neighbours) and sqrt(2)
(corner neighbours): the pixel count of a skeleton over-counts diagonal runs by up to
41 % and counts side branches, whereas the longest path follows the worm's body from end
to end. The skeleton stops about half a body width before each tip, so the length is
slightly shorter than the worm. Width is ``area / length``. Solidity (area over convex hull
area) tells posture: near 1 for a straight worm, about 0.3-0.6 for a curled one.

Live/dead (BBBC010): dead worms take up the Sytox stain and glow in channel ``"w1"``. A worm
is called dead when its mean w1 exceeds ``dead_threshold``. The default threshold is
``median + 10 * 1.4826 * MAD`` of w1 on the background (pixels in no instance): a robust
z-score of 10. On BBBC010 live worms sit at z ~ 1-5 and stained worms at z ~ 15-140.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

from .shape import skeleton_length, solidity
from .types import Instances

__all__ = ["measure", "skeleton_length", "default_dead_threshold"]


def default_dead_threshold(channel: np.ndarray, foreground: np.ndarray, z: float = 10.0) -> float:
    """Robust background threshold: ``median + z * 1.4826 * MAD`` of the background.

    Parameters
    ----------
    channel : np.ndarray
        (H, W) stain channel (BBBC010 ``"w1"``).
    foreground : np.ndarray
        (H, W) bool, pixels in any instance (excluded from the background).
    z : float
        Robust z-score a dead worm's mean must exceed.

    Returns
    -------
    float
        Threshold in the channel's units.
    """
    ch = np.asarray(channel, np.float64)
    bg = ch[~np.asarray(foreground, bool)]
    if bg.size == 0:
        bg = ch.ravel()
    med = float(np.median(bg))
    mad = float(np.median(np.abs(bg - med))) * 1.4826
    if mad == 0:
        mad = float(bg.std()) or 1.0
    return med + z * mad


def measure(
    instances: Instances,
    image: np.ndarray | None = None,
    channels: dict[str, np.ndarray] | None = None,
    dead_threshold: float | None = None,
    dead_channel: str = "w1",
) -> pd.DataFrame:
    """Measure every instance.

    Parameters
    ----------
    instances : Instances
        Masks (overlaps allowed: each instance is measured on its whole mask).
    image : np.ndarray, optional
        (H, W) or (C, H, W) image for mean intensities.
    channels : dict of str to np.ndarray, optional
        Extra (H, W) channels, e.g. ``{"w1": sytox}``; each gives a ``mean_<name>`` column.
    dead_threshold : float, optional
        Mean ``dead_channel`` intensity above which a worm is called dead. Default: a robust
        z-score of 10 over the background (see the module docstring). Used only when
        ``channels`` has ``dead_channel``.
    dead_channel : str
        The stain channel of the live/dead call.

    Returns
    -------
    pandas.DataFrame
        One row per instance: ``label`` (i + 1, as in ``Instances.to_labels``), ``area``,
        ``length``, ``width``, ``solidity``, ``score``, ``class``, ``bbox_min_row``,
        ``bbox_min_col``, ``bbox_max_row``, ``bbox_max_col`` (max exclusive), ``centroid_row``,
        ``centroid_col``, ``mean_intensity`` (or ``mean_intensity_<c>`` per channel of a
        (C, H, W) image), ``mean_<channel>`` for each extra channel, and ``dead`` (bool)
        when the stain channel is given; ``df.attrs["dead_threshold"]`` holds the threshold.

    Raises
    ------
    ValueError
        If the image or a channel does not match the masks' (H, W).
    """
    if not isinstance(instances, Instances):
        raise ValueError(f"measure expects Instances, got {type(instances).__name__}")
    shape = instances.shape
    images: dict[str, np.ndarray] = {}
    if image is not None:
        img = np.asarray(image)
        if img.shape[-2:] != shape or img.ndim not in (2, 3):
            raise ValueError(f"image of shape {img.shape} does not match the masks' {shape}")
        if img.ndim == 2:
            images["mean_intensity"] = img
        else:
            for c in range(img.shape[0]):
                images[f"mean_intensity_{c}"] = img[c]
    for name, ch in (channels or {}).items():
        arr = np.asarray(ch)
        if arr.shape != shape:
            raise ValueError(f"channel {name!r} is {arr.shape}, the masks are {shape}")
        images[f"mean_{name}"] = arr

    n = len(instances)
    cols: dict[str, list] = {
        k: []
        for k in (
            "label area length width solidity score class bbox_min_row bbox_min_col bbox_max_row "
            "bbox_max_col centroid_row centroid_col"
        ).split()
    }
    cols.update({k: [] for k in images})
    for i in range(n):
        m = instances.masks[i]
        rr, cc = np.nonzero(m)
        area = len(rr)
        cols["label"].append(i + 1)
        cols["area"].append(area)
        cols["score"].append(float(instances.scores[i]))
        cols["class"].append(int(instances.classes[i]))
        if area == 0:
            for k in cols:
                if k not in ("label", "area", "score", "class"):
                    cols[k].append(np.nan)
            continue
        r0, r1, c0, c1 = rr.min(), rr.max() + 1, cc.min(), cc.max() + 1
        length = skeleton_length(m[r0:r1, c0:c1])
        cols["length"].append(length)
        cols["width"].append(area / length if length else np.nan)
        cols["solidity"].append(solidity(m[r0:r1, c0:c1]))
        cols["bbox_min_row"].append(int(r0))
        cols["bbox_min_col"].append(int(c0))
        cols["bbox_max_row"].append(int(r1))
        cols["bbox_max_col"].append(int(c1))
        cols["centroid_row"].append(float(rr.mean()))
        cols["centroid_col"].append(float(cc.mean()))
        for k, arr in images.items():
            cols[k].append(float(arr[rr, cc].astype(np.float64).mean()))
    df = pd.DataFrame(cols)
    stain = (channels or {}).get(dead_channel)
    if stain is not None:
        if dead_threshold is None:
            fg = instances.masks.any(axis=0) if n else np.zeros(shape, bool)
            fg = ndimage.binary_dilation(fg, iterations=2)  # keep glow halos out of the background
            dead_threshold = default_dead_threshold(stain, fg)
        df["dead"] = df[f"mean_{dead_channel}"] > float(dead_threshold)
        df.attrs["dead_threshold"] = float(dead_threshold)
    return df
