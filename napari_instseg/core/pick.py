"""Clicks that start from the automatic segments and correct them.

:func:`napari_instseg.core.grow.grow` grows a click's mask from the embeddings (Fathi et
al.). On BBBC010 the automatic segmentation's masks are better than that growth (the mask
at a worm's central pixel: mean IoU 0.85 against 0.72, docs/benchmarks.md "Session 25"), so
:func:`grow_from_segments` lets a click pick the automatic segment under it and lets the
following clicks correct it with the boundary map:

- the first positive click takes the segment it lands in (where two overlap at a
  crossing, the smaller); on no segment, the embedding growth of :func:`grow`;
- a later positive click in another segment takes the part of that segment nearer the
  click than that segment's own seed (a watershed of the boundary map from the two), so a
  worm the segmentation gave partly to a neighbour is taken back piece by piece;
- a later positive click on no segment takes the foreground pixels (probability above
  ``fg_floor``) no segment holds within ``reach`` pixels of it, connected to it;
- negative clicks inside the mask cut it: a watershed of the boundary map from the
  positive and the negative clicks, and the mask keeps the positive side. Two worms the
  segmentation merged come apart along the line between them.

The automatic segments are :func:`~napari_instseg.core.instances.segment` with the
model's tuned method and parameters, computed once per prediction (cached).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize
from skimage.segmentation import watershed

from .grow import _as_points, grow
from .types import Instances, Prediction

__all__ = [
    "MAX_SEGMENT_PIXELS",
    "add_to_mask",
    "automatic_segments",
    "cut_away",
    "grow_from_segments",
    "starts_from_segments",
]

_CACHE: list[tuple[weakref.ref, tuple[bool, str, str], Instances]] = []
_CACHE_SIZE = 4

MAX_SEGMENT_PIXELS = 4_000_000
"""Images larger than this (H x W) are not segmented for clicks: the automatic segments
are dense (N, H, W) masks, and a mosaic holds hundreds of worms."""


def starts_from_segments(prediction: Prediction) -> bool:
    """Whether clicks on ``prediction`` start from the automatic segments by default.

    True for a prediction of a model tuned for automatic segmentation (``segment_params``
    in its metadata) of an image up to :data:`MAX_SEGMENT_PIXELS`.
    """
    tuned = (getattr(prediction, "metadata", None) or {}).get("segment_params")
    h, w = prediction.shape
    return bool(tuned) and h * w <= MAX_SEGMENT_PIXELS


def automatic_segments(prediction: Prediction, refine_edges: bool = True) -> Instances:
    """The automatic segmentation of ``prediction`` (``segment(prediction)``), cached.

    Parameters
    ----------
    prediction : Prediction
        Network outputs.
    refine_edges : bool
        False: without the tuned outline refinement (``edge_thresholds=None``).

    Returns
    -------
    Instances
        The instances of the model's recommended method with its tuned parameters. The
        cache holds the last few predictions by identity, with the parameters they were
        segmented with.
    """
    from .instances import segment

    metadata = getattr(prediction, "metadata", None) or {}
    # the parameters are part of the key: a prediction re-tuned in place is segmented again
    key = (
        refine_edges,
        repr(metadata.get("segment_params")),
        repr(metadata.get("recommended_method")),
    )
    for ref, cached_key, found in _CACHE:
        if ref() is prediction and cached_key == key:
            return found
    found = segment(prediction) if refine_edges else segment(prediction, edge_thresholds=None)
    _CACHE.insert(0, (weakref.ref(prediction), key, found))
    del _CACHE[_CACHE_SIZE:]
    return found


def _box(region: np.ndarray, pad: int, shape: tuple[int, int]) -> tuple[slice, slice]:
    rows, cols = np.nonzero(region)
    return (
        slice(max(int(rows.min()) - pad, 0), min(int(rows.max()) + pad + 1, shape[0])),
        slice(max(int(cols.min()) - pad, 0), min(int(cols.max()) + pad + 1, shape[1])),
    )


def _nearer_part(
    boundary: np.ndarray,
    region: np.ndarray,
    keep: np.ndarray,
    other: np.ndarray,
    radius: int = 0,
) -> np.ndarray:
    """The pixels of ``region`` a watershed of ``boundary`` floods from ``keep``, not ``other``.

    ``keep`` and ``other`` are (K, 2) pixels; each starts the flood from the square of
    ``radius`` around it within ``region`` (where squares meet, ``other``'s win; the
    ``keep`` pixels themselves always count as ``keep``).
    """
    pts = np.concatenate([keep, other]) if len(other) else keep
    box = _box(region | _points_image(pts, region.shape), radius + 1, region.shape)
    markers = np.zeros(region.shape, np.int32)
    markers[keep[:, 0], keep[:, 1]] = 1
    if radius:
        markers = ndimage.maximum_filter(markers, size=2 * radius + 1) * region
    others = np.zeros(region.shape, bool)
    others[other[:, 0], other[:, 1]] = True
    if radius:
        others = ndimage.maximum_filter(others, size=2 * radius + 1) & region
    markers[others] = 2
    markers[keep[:, 0], keep[:, 1]] = 1
    sub = region[box] | (markers[box] > 0)
    flooded = watershed(boundary[box], markers[box], mask=sub)
    out = np.zeros(region.shape, bool)
    out[box] = flooded == 1
    return out


def _points_image(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    image = np.zeros(shape, bool)
    image[points[:, 0], points[:, 1]] = True
    return image


def grow_from_segments(
    prediction: Prediction,
    seeds: object,
    negative: object = None,
    tau: float = 0.5,
    instances: Instances | None = None,
    reach: int = 12,
    fg_floor: float = 0.05,
    edge_thresholds: Sequence[float] | str | None = "auto",
) -> np.ndarray:
    """One worm's mask from clicks, starting from the automatic segment under the first.

    Parameters
    ----------
    prediction : Prediction
        Network outputs.
    seeds : (row, col) or sequence of (row, col)
        Positive clicks on the worm, in the order they were made.
    negative : (row, col) or sequence of (row, col), optional
        Negative clicks: where the mask must not be.
    tau : float
        Similarity threshold in (0, 1) of the embedding growth, used where the first
        click is on no segment.
    instances : Instances, optional
        The segments to start from; default :func:`automatic_segments`.
    reach : int
        How far (pixels) from a later click on no segment foreground pixels are taken.
    fg_floor : float
        Foreground probability such pixels need.
    edge_thresholds : pair of float, "auto" or None
        Passed to :func:`~napari_instseg.core.grow.grow` for the embedding growth; None
        also leaves the automatic segments' outline refinement out.

    Returns
    -------
    numpy.ndarray
        (H, W) bool mask.

    Raises
    ------
    ValueError
        No positive click, clicks outside the image, tau outside (0, 1), or segments of
        another shape than the prediction.
    """
    shape = prediction.shape
    positive = _as_points(seeds, shape, "seeds")
    if len(positive) == 0:
        raise ValueError("grow_from_segments needs at least one positive seed (row, col)")
    negatives = _as_points(negative, shape, "negative seeds")
    if not 0.0 < float(tau) < 1.0:
        raise ValueError(f"tau must be in (0, 1), got {tau}")
    if instances is None:
        instances = automatic_segments(prediction, refine_edges=edge_thresholds is not None)
    masks = np.asarray(instances.masks, bool)
    if masks.shape[1:] != tuple(shape):
        raise ValueError(f"segments of shape {masks.shape[1:]} for a {tuple(shape)} prediction")
    mask = np.zeros(shape, bool)
    for k, (r, c) in enumerate(positive):
        if mask[r, c]:
            continue
        hits = np.flatnonzero(masks[:, r, c]) if len(masks) else np.zeros(0, np.int64)
        if k == 0 and hits.size == 0:
            mask |= grow(prediction, [(r, c)], tau=tau, edge_thresholds=edge_thresholds)
        elif k == 0:
            mask |= masks[min(hits, key=lambda i: int(masks[i].sum()))]  # crossing: smaller
        else:
            mask = _add_click(prediction, instances, mask, (r, c), reach, fg_floor)
    inside = negatives[mask[negatives[:, 0], negatives[:, 1]]] if len(negatives) else negatives
    if len(inside):
        boundary = np.asarray(prediction.boundary, np.float32)
        mask = _nearer_part(boundary, mask, positive, inside, radius=2) & mask
    return mask


def _add_click(
    prediction: Prediction,
    instances: Instances,
    mask: np.ndarray,
    pixel: tuple[int, int],
    reach: int,
    fg_floor: float,
) -> np.ndarray:
    """``mask`` with what a later positive click at ``pixel`` adds (see the module doc)."""
    r, c = pixel
    masks = np.asarray(instances.masks, bool)
    hits = np.flatnonzero(masks[:, r, c]) if len(masks) else np.zeros(0, np.int64)
    if hits.size == 0:
        taken = masks.any(axis=0) if len(masks) else np.zeros(mask.shape, bool)
        rr, cc = np.ogrid[: mask.shape[0], : mask.shape[1]]
        near = (rr - r) ** 2 + (cc - c) ** 2 <= reach**2
        free = near & (np.asarray(prediction.foreground) > fg_floor) & (~taken | mask)
        if not free[r, c]:
            return mask
        labels, _ = ndimage.label(free | mask)
        return mask | (labels == labels[r, c])
    index = min(hits, key=lambda i: int(masks[i].sum()))  # a crossing: the smaller
    own = _own_seed(instances, index)
    if own is None or (own[0] == r and own[1] == c):
        return mask | masks[index]
    boundary = np.asarray(prediction.boundary, np.float32)
    return mask | _nearer_part(boundary, masks[index], np.array([[r, c]]), own[None])


def add_to_mask(
    prediction: Prediction,
    mask: np.ndarray,
    seeds: object,
    instances: Instances | None = None,
    reach: int = 12,
    fg_floor: float = 0.05,
) -> np.ndarray:
    """Add what positive clicks take to an existing mask (a worm from **Segment all**).

    Each click on a pixel the mask lacks adds what a later click of
    :func:`grow_from_segments` adds: the part of the automatic segment under it nearer the
    click than that segment's seed, or the free foreground near it.

    Parameters
    ----------
    prediction : Prediction
        Network outputs.
    mask : numpy.ndarray
        (H, W) bool mask to extend.
    seeds : (row, col) or sequence of (row, col)
        Positive clicks.
    instances : Instances, optional
        The segments; default :func:`automatic_segments`.
    reach, fg_floor
        As for :func:`grow_from_segments`.

    Returns
    -------
    numpy.ndarray
        (H, W) bool: the mask and what the clicks add.
    """
    mask = np.array(mask, bool)
    if mask.shape != tuple(prediction.shape):
        raise ValueError(f"mask of shape {mask.shape} for a {tuple(prediction.shape)} prediction")
    points = _as_points(seeds, prediction.shape, "seeds")
    if instances is None:
        instances = automatic_segments(prediction)
    for r, c in points:
        if not mask[r, c]:
            mask = _add_click(prediction, instances, mask, (int(r), int(c)), reach, fg_floor)
    return mask


def _own_seed(instances: Instances, index: int) -> np.ndarray | None:
    """The seed pixel of one instance: its stored seed, else its most interior pixel."""
    if instances.seeds is not None:
        seed = np.asarray(instances.seeds[index], np.int64)
        if instances.masks[index][seed[0], seed[1]]:
            return seed
    mask = np.asarray(instances.masks[index], bool)
    if not mask.any():
        return None
    box = _box(mask, 1, mask.shape)
    depth = ndimage.distance_transform_edt(mask[box])
    r, c = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return np.array([r + box[0].start, c + box[1].start])


def cut_away(
    prediction: Prediction,
    mask: np.ndarray,
    negative: object,
    keep: object = None,
    boundary_threshold: float = 0.5,
    marker_depth: float = 1.5,
) -> np.ndarray:
    """Cut the part of a mask around negative clicks off along the boundary map.

    For a mask without seeds (an automatic segment) the side to keep is read from the
    boundary map inside the mask: its lines above ``boundary_threshold``, thinned, part
    the mask into cores (pixels deeper than ``marker_depth`` from lines and outline, as
    the boundary pipeline's markers); the cores nearest the clicks flood the cut side, the
    other cores the kept side, by a watershed of the boundary map. A mask with a single
    core keeps the side of its interior pixel farthest from the clicks. Two worms the
    segmentation merged come apart along the line between them.

    Parameters
    ----------
    prediction : Prediction
        Network outputs (its boundary map).
    mask : numpy.ndarray
        (H, W) bool mask to cut.
    negative : (row, col) or sequence of (row, col)
        Negative clicks; those outside the mask are ignored.
    keep : (row, col) or sequence of (row, col), optional
        Pixels of the side to keep (the worm's own clicks, e.g. after a split): when one
        lies inside the mask, the kept side is flooded from them instead of from cores.
    boundary_threshold : float
        Boundary probability of the lines that part the cores.
    marker_depth : float
        Distance (pixels) from lines and outline a core pixel needs.

    Returns
    -------
    numpy.ndarray
        (H, W) bool: the kept part (the mask itself when no click is inside it).
    """
    mask = np.asarray(mask, bool)
    if mask.shape != tuple(prediction.shape):
        raise ValueError(f"mask of shape {mask.shape} for a {tuple(prediction.shape)} prediction")
    points = _as_points(negative, prediction.shape, "negative seeds")
    inside = points[mask[points[:, 0], points[:, 1]]] if len(points) else points
    if len(inside) == 0:
        return mask
    boundary = np.asarray(prediction.boundary, np.float32)
    kept = _as_points(keep, prediction.shape, "seeds")
    kept = kept[mask[kept[:, 0], kept[:, 1]]] if len(kept) else kept
    if len(kept):
        return _nearer_part(boundary, mask, kept, inside, radius=2) & mask
    box = _box(mask, 1, mask.shape)
    origin = np.array([box[0].start, box[1].start])
    sub = mask[box]
    lines = skeletonize((boundary[box] > boundary_threshold) & sub)
    cores, n = ndimage.label(
        ndimage.distance_transform_edt(sub & ~lines) > marker_depth, np.ones((3, 3), bool)
    )
    if n >= 2:
        core_pixels = np.argwhere(cores > 0)
        local = inside - origin
        nearest = np.argmin(
            np.hypot(*(core_pixels[:, None, :] - local[None, :, :]).transpose(2, 0, 1)), axis=0
        )
        cut_cores = np.unique(cores[tuple(core_pixels[nearest].T)])
        cut = np.isin(cores, cut_cores)
        keep = np.argwhere((cores > 0) & ~cut) + origin
        other = np.concatenate([np.argwhere(cut) + origin, inside])
        return _nearer_part(boundary, mask, keep, other) & mask
    else:
        depth = ndimage.distance_transform_edt(sub)
        rows, cols = np.nonzero(depth >= 0.5 * depth.max())
        rows, cols = rows + origin[0], cols + origin[1]
        far = np.min(np.hypot(rows[:, None] - inside[:, 0], cols[:, None] - inside[:, 1]), axis=1)
        keep = np.array([[rows[np.argmax(far)], cols[np.argmax(far)]]])
        other = inside
    return _nearer_part(boundary, mask, keep, other, radius=2) & mask
