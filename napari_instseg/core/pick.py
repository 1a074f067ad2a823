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
model's tuned method and parameters, computed once per prediction (cached) and kept as
crops (:func:`segments_cropped`): a click reads the boxes under it, so a click on a
4160 x 5568 mosaic of 955 worms costs what it costs on one 520 x 696 image.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize
from skimage.segmentation import watershed

from .grow import _as_points, grow
from .types import CroppedInstances, Instances, Prediction

__all__ = [
    "MAX_SEGMENT_PIXELS",
    "add_to_mask",
    "automatic_segments",
    "cut_away",
    "grow_from_segments",
    "segment_all",
    "segments_cropped",
    "starts_from_segments",
]

#: (prediction, key, the segments' crops, their Instances once asked for) of the last few
_CACHE: list[list] = []
_CACHE_SIZE = 4

MAX_SEGMENT_PIXELS = 40_000_000
"""Images larger than this (H x W) are not segmented for clicks (their clicks grow from the
embeddings). The automatic segments are kept as crops (:func:`segments_cropped`); at
4160 x 5568 (23 M pixels, about 950 worms) segmenting takes under half a minute and about
2 GB, done with the prediction; twice that image's pixels stays within a few minutes."""


def starts_from_segments(prediction: Prediction) -> bool:
    """Whether clicks on ``prediction`` start from the automatic segments by default.

    True for a prediction of a model tuned for automatic segmentation (``segment_params``
    in its metadata) of an image up to :data:`MAX_SEGMENT_PIXELS`.
    """
    tuned = (getattr(prediction, "metadata", None) or {}).get("segment_params")
    h, w = prediction.shape
    return bool(tuned) and h * w <= MAX_SEGMENT_PIXELS


def _cache_entry(prediction: Prediction, refine_edges: bool) -> list:
    """The cache entry of ``prediction`` segmented with or without the edge refinement."""
    from .instances import segment_cropped

    metadata = getattr(prediction, "metadata", None) or {}
    # the parameters are part of the key: a prediction re-tuned in place is segmented again
    key = (
        refine_edges,
        repr(metadata.get("segment_params")),
        repr(metadata.get("recommended_method")),
    )
    for entry in _CACHE:
        if entry[0]() is prediction and entry[1] == key:
            return entry
    if refine_edges:
        found = segment_cropped(prediction)
    else:
        found = segment_cropped(prediction, edge_thresholds=None)
    entry = [weakref.ref(prediction), key, found, None]
    _CACHE.insert(0, entry)
    del _CACHE[_CACHE_SIZE:]
    return entry


def segments_cropped(prediction: Prediction, refine_edges: bool = True) -> CroppedInstances:
    """The automatic segmentation of ``prediction``, each segment a crop in its box; cached.

    What clicks start from: the masks of :func:`automatic_segments` without their
    (N, H, W) array (on a large image, hundreds of full-image masks).

    Parameters
    ----------
    prediction : Prediction
        Network outputs.
    refine_edges : bool
        False: without the tuned outline refinement (``edge_thresholds=None``).

    Returns
    -------
    CroppedInstances
        ``segment_cropped(prediction)``: the model's recommended method with its tuned
        parameters. The cache holds the last few predictions by identity, with the
        parameters they were segmented with.
    """
    return _cache_entry(prediction, refine_edges)[2]


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
        segmented with (the masks of :func:`segments_cropped`, made once when first asked
        for).
    """
    entry = _cache_entry(prediction, refine_edges)
    if entry[3] is None:
        entry[3] = entry[2].to_instances()
    return entry[3]


def segment_all(
    prediction: Prediction, method: str = "auto", **params: object
) -> CroppedInstances:
    """``segment_cropped(prediction, method, **params)``, from the clicks' cache when the same.

    **Segment all** with the model's own method and parameters is the segmentation the
    clicks start from (:func:`segments_cropped`, made with the prediction): that result is
    reused (the same instances), any other method or parameters are segmented anew.

    Parameters
    ----------
    prediction : Prediction
        Network outputs.
    method : str
        As for :func:`~napari_instseg.core.instances.segment`.
    **params
        As for :func:`~napari_instseg.core.instances.segment`.

    Returns
    -------
    CroppedInstances
        The instances, each a crop in its box (shared with the cache: not to be changed in
        place).
    """
    from .instances import segment_cropped

    if method == "auto" and not params:
        return segments_cropped(prediction)
    if (
        method == "auto"
        and set(params) == {"edge_thresholds"}
        and params["edge_thresholds"] is None
    ):
        return segments_cropped(prediction, refine_edges=False)
    return segment_cropped(prediction, method, **params)


def _box(region: np.ndarray, pad: int, shape: tuple[int, int]) -> tuple[slice, slice]:
    rows, cols = np.nonzero(region)
    return (
        slice(max(int(rows.min()) - pad, 0), min(int(rows.max()) + pad + 1, shape[0])),
        slice(max(int(cols.min()) - pad, 0), min(int(cols.max()) + pad + 1, shape[1])),
    )


def _bounds(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(r0, r1, c0, c1) of a 2D mask's pixels, ends exclusive; None when it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if not len(rows):
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


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
    ``keep`` pixels themselves always count as ``keep``). (H, W) in and out; the work is
    done by :func:`_nearer_window` in a window around the region and the pixels.
    """
    found = _bounds(region)
    box = found if found is not None else (0, 0, 0, 0)
    win, part = _nearer_window(
        boundary, box, region[box[0] : box[1], box[2] : box[3]], keep, other, radius
    )
    out = np.zeros(region.shape, bool)
    out[win[0] : win[1], win[2] : win[3]] = part
    return out


def _nearer_window(
    boundary: np.ndarray,
    box: tuple[int, int, int, int],
    crop: np.ndarray,
    keep: np.ndarray,
    other: np.ndarray,
    radius: int = 0,
) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """:func:`_nearer_part` of the region ``crop`` at ``box`` (empty elsewhere).

    Returns the window it worked in, (r0, r1, c0, c1), and the flooded part there. The
    window holds the region and the pixels with ``2 radius + 2`` pixels to spare on every
    side inside the image: the flood's own box (``radius + 1`` around them) and the squares
    of the markers lie inside it, so the result is the one of the whole image, pixel for
    pixel (``tests/test_pick.py`` compares the two).
    """
    shape = boundary.shape
    h, w = shape
    # negative pixels index from the end, as numpy does on the whole image
    keep = np.asarray(keep, np.int64) % np.array(shape)
    other = np.asarray(other, np.int64).reshape(-1, 2) % np.array(shape)
    pts = np.concatenate([keep, other]) if len(other) else keep
    r0, r1, c0, c1 = box
    sub = np.asarray(crop, bool)
    found = _bounds(sub)
    lo_r, hi_r = int(pts[:, 0].min()), int(pts[:, 0].max()) + 1
    lo_c, hi_c = int(pts[:, 1].min()), int(pts[:, 1].max()) + 1
    if found is not None:
        lo_r, hi_r = min(lo_r, r0 + found[0]), max(hi_r, r0 + found[1])
        lo_c, hi_c = min(lo_c, c0 + found[2]), max(hi_c, c0 + found[3])
    pad = 2 * radius + 2
    a0, a1 = max(lo_r - pad, 0), min(hi_r + pad, h)
    b0, b1 = max(lo_c - pad, 0), min(hi_c + pad, w)
    region = np.zeros((a1 - a0, b1 - b0), bool)
    i0, i1, j0, j1 = max(r0, a0), min(r1, a1), max(c0, b0), min(c1, b1)
    if i0 < i1 and j0 < j1:
        region[i0 - a0 : i1 - a0, j0 - b0 : j1 - b0] = sub[i0 - r0 : i1 - r0, j0 - c0 : j1 - c0]
    origin = np.array([a0, b0])
    keep, other, pts = keep - origin, other - origin, pts - origin
    # from here on the steps of the whole-image version, on the window
    flood = _box(region | _points_image(pts, region.shape), radius + 1, region.shape)
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
    inside = region[flood] | (markers[flood] > 0)
    bd = np.asarray(boundary[a0:a1, b0:b1], np.float32)
    flooded = watershed(bd[flood], markers[flood], mask=inside)
    out = np.zeros(region.shape, bool)
    out[flood] = flooded == 1
    return (a0, a1, b0, b1), out


def _points_image(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    image = np.zeros(shape, bool)
    image[points[:, 0], points[:, 1]] = True
    return image


def _cropped(instances: Instances | CroppedInstances, shape: tuple[int, int]) -> CroppedInstances:
    """``instances`` as crops, checked against the prediction's ``shape``."""
    if tuple(instances.shape) != tuple(shape):
        raise ValueError(
            f"segments of shape {tuple(instances.shape)} for a {tuple(shape)} prediction"
        )
    if isinstance(instances, CroppedInstances):
        return instances
    return CroppedInstances.from_instances(instances)


def _hits(segments: CroppedInstances, r: int, c: int) -> list[int]:
    """Indices of the segments holding pixel (r, c), in order."""
    if not len(segments):
        return []
    boxes = np.asarray(segments.boxes, np.int64).reshape(-1, 4)
    inside = np.flatnonzero(
        (boxes[:, 0] <= r) & (r < boxes[:, 1]) & (boxes[:, 2] <= c) & (c < boxes[:, 3])
    )
    return [int(k) for k in inside if segments.crops[k][r - boxes[k, 0], c - boxes[k, 2]]]


def _smallest(segments: CroppedInstances, hits: list[int]) -> int:
    """The hit with the fewest pixels (the first of equals): at a crossing, the smaller."""
    return min(hits, key=lambda k: int(np.count_nonzero(segments.crops[k])))


def _paste(mask: np.ndarray, segments: CroppedInstances, k: int) -> None:
    """OR segment ``k`` into the (H, W) ``mask`` in place."""
    r0, r1, c0, c1 = segments.boxes[k]
    mask[r0:r1, c0:c1] |= segments.crops[k]


def grow_from_segments(
    prediction: Prediction,
    seeds: object,
    negative: object = None,
    tau: float = 0.5,
    instances: Instances | CroppedInstances | None = None,
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
    instances : Instances or CroppedInstances, optional
        The segments to start from; default :func:`segments_cropped` (the masks of
        :func:`automatic_segments`, each read in its box).
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
        segments = segments_cropped(prediction, refine_edges=edge_thresholds is not None)
    else:
        segments = _cropped(instances, shape)
    mask = np.zeros(shape, bool)
    for k, (r, c) in enumerate(positive):
        if mask[r, c]:
            continue
        hits = _hits(segments, int(r), int(c))
        if k == 0 and not hits:
            mask |= grow(prediction, [(r, c)], tau=tau, edge_thresholds=edge_thresholds)
        elif k == 0:
            _paste(mask, segments, _smallest(segments, hits))  # crossing: the smaller
        else:
            mask = _add_click(prediction, segments, mask, (int(r), int(c)), reach, fg_floor)
    inside = negatives[mask[negatives[:, 0], negatives[:, 1]]] if len(negatives) else negatives
    if len(inside):
        boundary = np.asarray(prediction.boundary, np.float32)
        mask = _nearer_part(boundary, mask, positive, inside, radius=2) & mask
    return mask


def _add_click(
    prediction: Prediction,
    segments: CroppedInstances,
    mask: np.ndarray,
    pixel: tuple[int, int],
    reach: int,
    fg_floor: float,
) -> np.ndarray:
    """``mask`` with what a later positive click at ``pixel`` adds (see the module doc).

    Works in the click's neighbourhood, the mask's box and the segment's box, with the
    result of the same steps on the whole image.
    """
    r, c = pixel
    h, w = mask.shape
    hits = _hits(segments, r, c)
    if not hits:
        # the free foreground within ``reach`` of the click (a disc), joined to the click
        # through itself or the mask: the mask's box and the disc's hold all of it
        a0, a1 = max(r - reach, 0), min(r + reach + 1, h)
        b0, b1 = max(c - reach, 0), min(c + reach + 1, w)
        rr, cc = np.ogrid[a0:a1, b0:b1]
        near = (rr - r) ** 2 + (cc - c) ** 2 <= reach**2
        taken = np.zeros(near.shape, bool)
        for k in range(len(segments)):
            s0, s1, t0, t1 = segments.boxes[k]
            if s0 < a1 and a0 < s1 and t0 < b1 and b0 < t1:
                taken |= segments.region(k, (a0, a1, b0, b1))
        free = near & (np.asarray(prediction.foreground[a0:a1, b0:b1]) > fg_floor)
        free &= ~taken | mask[a0:a1, b0:b1]
        if not free[r - a0, c - b0]:
            return mask
        box = _bounds(mask)
        e0, e1, f0, f1 = (a0, a1, b0, b1) if box is None else box
        e0, e1, f0, f1 = min(e0, a0), max(e1, a1), min(f0, b0), max(f1, b1)
        joined = mask[e0:e1, f0:f1].copy()
        joined[a0 - e0 : a1 - e0, b0 - f0 : b1 - f0] |= free
        labels, _ = ndimage.label(joined)
        out = mask.copy()
        out[e0:e1, f0:f1] |= labels == labels[r - e0, c - f0]
        return out
    index = _smallest(segments, hits)  # a crossing: the smaller
    own = _own_seed(segments, index)
    out = mask.copy()
    if own is None or (own[0] == r and own[1] == c):
        _paste(out, segments, index)
        return out
    boundary = np.asarray(prediction.boundary, np.float32)
    win, part = _nearer_window(
        boundary, segments.boxes[index], segments.crops[index], np.array([[r, c]]), own[None]
    )
    out[win[0] : win[1], win[2] : win[3]] |= part
    return out


def add_to_mask(
    prediction: Prediction,
    mask: np.ndarray,
    seeds: object,
    instances: Instances | CroppedInstances | None = None,
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
    instances : Instances or CroppedInstances, optional
        The segments; default :func:`segments_cropped`.
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
        segments = segments_cropped(prediction)
    else:
        segments = _cropped(instances, prediction.shape)
    for r, c in points:
        if not mask[r, c]:
            mask = _add_click(prediction, segments, mask, (int(r), int(c)), reach, fg_floor)
    return mask


def _own_seed(segments: CroppedInstances, index: int) -> np.ndarray | None:
    """The seed pixel of one segment: its stored seed, else its most interior pixel."""
    h, w = segments.shape
    r0, r1, c0, c1 = segments.boxes[index]
    crop = segments.crops[index]
    if segments.seeds is not None:
        seed = np.asarray(segments.seeds[index], np.int64)
        sr, sc = int(seed[0]) % h, int(seed[1]) % w  # negative: from the end, as numpy
        if r0 <= sr < r1 and c0 <= sc < c1 and crop[sr - r0, sc - c0]:
            return seed
    box, mask = segments.window(index, 1)
    if not mask.any():
        return None
    depth = ndimage.distance_transform_edt(mask)
    r, c = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return np.array([r + box[0], c + box[2]])


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
