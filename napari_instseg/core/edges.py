"""Mask edges decided by the image's own contrast (edge refinement).

The network's foreground map places a worm's outline to within about a pixel, and at
8-10 px wide that pixel is a tenth of the worm. On BBBC010 the annotated outline follows
the raw bright-field pixels closely: one threshold of the image divided by its local
background, ``contrast = image / background``, reproduces the annotated edge better than
any threshold of the foreground map, but the threshold differs with the kind of worm.
Straight (dead) worms are annotated with their faint outer halo (contrast below about
0.98, a pixel outside the dark rim), curved (live) ones at their dark edge (about 0.90).

:func:`refine_edges` therefore keeps each instance's body as segmented and re-decides only
the pixels within ``radius`` of its outline: inside the band a pixel belongs to the mask
when its contrast is below the image's edge threshold. The threshold goes linearly from
``threshold_curved`` to ``threshold_straight`` as the median solidity (area over convex
hull area) of the image's instances goes from ``solidity_range[0]`` to ``[1]``: a
BBBC010 well holds either live or dead worms, and the median over 12-15 worms tells them
apart where one worm's shape would not. Growth never takes a pixel of another instance.

Measured on the shipped model's 18 held-out BBBC010 images (docs/benchmarks.md,
"Session 17"). Everything here is numpy and scipy; nothing imports napari or Qt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

from .shape import solidity
from .types import CroppedInstances, Instances

#: Median solidity of an image's instances at which the edge threshold is all "curved"
#: and all "straight" (BBBC010: live wells 0.47-0.67, dead wells 0.71-0.87).
DEFAULT_SOLIDITY_RANGE: tuple[float, float] = (0.62, 0.72)


def local_contrast(image: np.ndarray, block: int = 4, window: int = 11) -> np.ndarray:
    """The image divided by its local background (about 1 on background, < 1 where dark).

    The background is the median of ``block`` x ``block`` block means over ``window``
    blocks (44 px for the defaults: wider than a worm, so the median sees mostly
    background), interpolated back to full size. On BBBC010 that background places the
    annotated outlines nearly as well as a 31 px median of the pixels (88.8 vs 89.4 % of
    the pixels near them on the right side at the best threshold per image) and is about
    90 times faster (~45 ms per 520 x 696 image).

    Parameters
    ----------
    image : np.ndarray
        (H, W) raw intensities of the channel that is segmented (bright-field).
    block : int
        Side of the blocks averaged before the median.
    window : int
        Side of the median filter, in blocks.

    Returns
    -------
    np.ndarray
        (H, W) float32. Non-finite pixels give 1 (no edge information).

    Raises
    ------
    ValueError
        If ``image`` is not 2D or ``block`` / ``window`` is not positive.
    """
    img = np.asarray(image, np.float32)
    if img.ndim != 2:
        raise ValueError(f"local_contrast needs one (H, W) channel, got shape {img.shape}")
    if block < 1 or window < 1:
        raise ValueError(f"block and window must be >= 1, got {block} and {window}")
    finite = np.isfinite(img)
    if not finite.all():
        fill = float(np.median(img[finite])) if finite.any() else 1.0
        img = np.where(finite, img, fill)
    h, w = img.shape
    hb, wb = -(-h // block), -(-w // block)
    padded = np.pad(img, ((0, hb * block - h), (0, wb * block - w)), mode="edge")
    means = padded.reshape(hb, block, wb, block).mean(axis=(1, 3))
    background = ndimage.median_filter(means, size=window, mode="reflect")
    if block > 1:
        background = ndimage.zoom(background, block, order=1, mode="nearest", grid_mode=True)
    background = background[:h, :w]
    # a floor of 1 % of the bright end keeps dark corners (outside a well) from exploding
    floor = 0.01 * max(float(np.percentile(img, 99.8)), 1e-6)
    out = img / np.maximum(background, floor)
    out[~finite] = 1.0
    return out.astype(np.float32)


def edge_threshold(
    solidities: Sequence[float] | np.ndarray,
    threshold_curved: float,
    threshold_straight: float,
    solidity_range: Sequence[float] = DEFAULT_SOLIDITY_RANGE,
) -> float:
    """The contrast threshold of an image from the median solidity of its instances.

    Parameters
    ----------
    solidities : sequence of float
        Solidity of every instance in the image.
    threshold_curved, threshold_straight : float
        Thresholds for images of curved and of straight objects.
    solidity_range : pair of float
        Median solidity at or below which ``threshold_curved`` holds, and at or above
        which ``threshold_straight`` does; linear in between.

    Returns
    -------
    float
        The threshold (``threshold_curved`` when there are no instances).
    """
    lo, hi = (float(v) for v in solidity_range)
    if len(solidities) == 0:
        return float(threshold_curved)
    med = float(np.median(np.asarray(solidities, np.float64)))
    frac = 1.0 if med >= hi else 0.0 if med <= lo or hi <= lo else (med - lo) / (hi - lo)
    return float(threshold_curved + frac * (threshold_straight - threshold_curved))


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, float]:
    try:
        curved, straight = (float(v) for v in thresholds)
    except (TypeError, ValueError):
        raise ValueError(
            f"edge thresholds must be two numbers (curved, straight), got {thresholds!r}"
        ) from None
    for value in (curved, straight):
        if not 0.0 < value < 2.0 or not np.isfinite(value):
            raise ValueError(f"edge thresholds are contrast ratios in (0, 2), got {thresholds!r}")
    return curved, straight


def refine_edges(
    instances: Instances,
    contrast: np.ndarray,
    thresholds: Sequence[float],
    solidity_range: Sequence[float] = DEFAULT_SOLIDITY_RANGE,
    radius: int = 1,
) -> Instances:
    """Re-decide the pixels within ``radius`` of every mask's outline by image contrast.

    Parameters
    ----------
    instances : Instances
        Masks to refine (overlaps allowed; scores, classes, seeds and taus are kept).
    contrast : np.ndarray
        (H, W) from :func:`local_contrast` (``Prediction.contrast``).
    thresholds : pair of float
        ``(threshold_curved, threshold_straight)``, see :func:`edge_threshold`.
    solidity_range : pair of float
        See :func:`edge_threshold`.
    radius : int
        Width of the re-decided band on each side of the outline, in pixels.

    Returns
    -------
    Instances
        New masks. A mask keeps its body (pixels further than ``radius`` inside its
        outline, and its skeleton), takes band pixels darker than the threshold except
        those of other instances, and keeps only its largest connected piece. A mask whose
        outline is brighter than the background (median contrast above 1.02) stays as it was.

    Raises
    ------
    ValueError
        If ``contrast`` does not match the masks, or the thresholds or radius are invalid.
    """
    if len(instances) == 0:
        _check_refinement(instances.shape, contrast, thresholds, radius)
        return instances
    cropped = CroppedInstances.from_instances(instances)
    refined = _refine_edges_cropped(cropped, contrast, thresholds, solidity_range, radius)
    return replace(instances, masks=refined.to_instances().masks)


def _check_refinement(
    shape: tuple[int, int], contrast: np.ndarray, thresholds: Sequence[float], radius: int
) -> tuple[float, float, np.ndarray, int]:
    """Validated (curved, straight, contrast as float32, radius) of :func:`refine_edges`."""
    curved, straight = _check_thresholds(thresholds)
    contrast = np.asarray(contrast, np.float32)
    if contrast.shape != shape:
        raise ValueError(
            f"contrast is {contrast.shape} but the masks are {shape}: "
            "both must come from the same image"
        )
    if int(radius) < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    return curved, straight, contrast, int(radius)


def _refine_edges_cropped(
    instances: CroppedInstances,
    contrast: np.ndarray,
    thresholds: Sequence[float],
    solidity_range: Sequence[float] = DEFAULT_SOLIDITY_RANGE,
    radius: int = 1,
) -> CroppedInstances:
    """:func:`refine_edges` on cropped masks: each mask in its box grown by ``radius + 1``."""
    curved, straight, contrast, radius = _check_refinement(
        instances.shape, contrast, thresholds, radius
    )
    if len(instances) == 0:
        return instances
    windows = [instances.window(k, radius + 1) for k in range(len(instances))]
    threshold = edge_threshold(
        [solidity(m) for box, m in windows if m.any()],
        curved,
        straight,
        solidity_range=solidity_range,
    )
    coverage = instances.cover()
    boxes, crops = list(instances.boxes), list(instances.crops)
    for i, (box, m) in enumerate(windows):
        if not m.any():
            boxes[i], crops[i] = (0, 1, 0, 1), np.zeros((1, 1), bool)
            continue
        r0, r1, c0, c1 = box
        eroded = ndimage.binary_erosion(m, iterations=radius, border_value=1)
        ring = m & ~eroded  # empty when the mask fills its whole box (and the image)
        if ring.any() and np.median(contrast[r0:r1, c0:c1][ring]) > 1.02:
            # an outline brighter than the background (a worm at the well's rim, a
            # bright halo): the contrast says nothing about where the edge is
            continue
        # the skeleton stays: a thin stretch the band covers end to end is never cut off
        body = eroded | skeletonize(m)
        grown = ndimage.binary_dilation(m, iterations=radius)
        # the outer band never takes pixels that belong to another instance
        others = (coverage[r0:r1, c0:c1] - m) > 0
        band = (m & ~body) | (grown & ~m & ~others)
        new = body | (band & (contrast[r0:r1, c0:c1] < threshold))
        labels, n = ndimage.label(new)
        if n > 1:
            sizes = ndimage.sum_labels(new, labels, index=np.arange(1, n + 1))
            new = labels == 1 + int(np.argmax(sizes))
        if not new.any():  # nothing dark enough: keep the mask as it was
            new = m
        boxes[i], crops[i] = box, new
    return replace(instances, boxes=boxes, crops=crops)
