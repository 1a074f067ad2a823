"""Automatic instances from a :class:`~napari_instseg.core.types.Prediction`.

Three methods, all returning :class:`~napari_instseg.core.types.Instances` with overlapping
masks allowed:

``"seeds"`` (Fathi et al.)
    Pick seeds greedily by ``log S_p + alpha log D(p, picked)`` (seediness times diversity in
    embedding space), grow every seed's mask at its best threshold with one matrix product,
    drop low scores and duplicates (mask IoU, higher score wins), then refine the survivors
    with :meth:`~napari_instseg.core.grow.Grower.grow` (connectivity, crossing pixels).
``"boundary"`` (BAISeg mask extraction pipeline)
    Thin the boundary map, dilate, distance transform of the remaining foreground, threshold
    into markers, watershed, per-instance closing (5 x 5 ellipse), clip to the foreground.
    A watershed cannot produce overlaps: a crossed worm comes out in pieces. Optionally
    (``split_factor``, tuned per model) segments much larger than the image's typical one,
    which on real worms are nearly always touching or crossing worms merged by a gap in the
    boundary map, are split by embedding similarity (:func:`split_merged`); the parts may
    overlap where the worms cross. Segments still much larger than typical are then cut by
    the shape of their skeleton (``untangle_factor``, :mod:`napari_instseg.core.untangle`):
    a junction with three or four arms is two worms, paired by the arms that continue each
    other; an unbranched skeleton far longer than a worm is cut at its waist.
``"hybrid"``
    Seeds from both sources, grown by embedding similarity with the boundary as a barrier;
    boundary segments no grown mask explains are added. See :func:`segment_hybrid`.
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
from scipy import ndimage
from skimage.morphology import disk, ellipse, skeletonize
from skimage.segmentation import watershed

from .edges import DEFAULT_SOLIDITY_RANGE, _refine_edges_cropped, refine_edges
from .grow import Grower, _as_points, d2_threshold, get_grower
from .scale import at_model_scale, resize_instances
from .shape import bounding_box, elongation, solidity
from .types import CroppedInstances, Instances, Prediction
from .untangle import _untangle

__all__ = [
    "segment",
    "segment_cropped",
    "segment_settings",
    "segment_seeds",
    "segment_boundary",
    "merge_fragments",
    "weight_scores_by_size",
    "segment_hybrid",
    "sample_seeds",
    "split_merged",
    "nms",
    "METHODS",
]

METHODS = ("seeds", "boundary", "hybrid")
_EIGHT = np.ones((3, 3), bool)


def _check_prediction(prediction: Prediction) -> None:
    """Raise a ``ValueError`` that names the problem for an empty or non-finite prediction.

    The embeddings are checked by their float32 sum (about 1.5 ms at 520 x 696, no
    temporary array), and pixel by pixel only when that sum is not finite: NaN and
    infinities always make it so, finite values only when it overflows.
    """
    if not isinstance(prediction, Prediction):
        raise ValueError(f"expected a Prediction, got {type(prediction).__name__}")
    h, w = prediction.shape
    if h == 0 or w == 0:
        raise ValueError(f"prediction has an empty image size {prediction.shape}")
    for name in ("seediness", "boundary", "foreground", "class_scores"):
        if not np.isfinite(np.asarray(getattr(prediction, name))).all():
            raise ValueError(f"prediction.{name} contains NaN or infinite values")
    emb = np.asarray(prediction.embeddings)
    if emb.shape[0] == 0:
        raise ValueError(
            f"prediction has empty embeddings of shape {emb.shape}: (D, H, W) with D >= 1"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        suspicious = not np.isfinite(emb.sum(dtype=np.float32))
    if suspicious and not all(np.isfinite(channel).all() for channel in emb):
        raise ValueError("prediction embeddings contain NaN or infinite values")


def _empty(shape: tuple[int, int]) -> Instances:
    return Instances(
        masks=np.zeros((0, *shape), bool),
        scores=np.zeros(0, np.float32),
        classes=np.zeros(0, np.int64),
        seeds=np.zeros((0, 2), np.int64),
        taus=np.zeros(0, np.float32),
    )


def nms(
    masks: np.ndarray,
    scores: np.ndarray,
    iou_threshold: float = 0.5,
    containment_threshold: float = 0.8,
) -> np.ndarray:
    """Greedy duplicate removal on masks: keep the higher score.

    A mask is dropped when its IoU with an already kept (higher-scoring) mask reaches
    ``iou_threshold`` or when at least ``containment_threshold`` of its area lies inside
    one. Crossing worms share only a small part of their area, so both stay.

    Parameters
    ----------
    masks : np.ndarray
        (K, ...) bool masks (flattened or not).
    scores : np.ndarray
        (K,) scores.
    iou_threshold, containment_threshold : float
        Duplicate criteria.

    Returns
    -------
    np.ndarray
        Indices of the kept masks, by decreasing score.
    """
    k = len(masks)
    if k == 0:
        return np.zeros(0, np.int64)
    flat = masks.reshape(k, -1)
    cols = np.flatnonzero(flat.any(axis=0))  # only pixels some mask covers
    f = flat[:, cols].astype(np.float32)
    inter = f @ f.T
    area = np.diag(inter).copy()
    union = area[:, None] + area[None] - inter
    iou = inter / np.maximum(union, 1.0)
    contained = inter / np.maximum(area[:, None], 1.0)  # fraction of row i inside column j
    order = np.argsort(-np.asarray(scores), kind="stable")
    kept: list[int] = []
    for i in order:
        if area[i] == 0:
            continue
        if kept and (
            (iou[i, kept] >= iou_threshold).any()
            or (contained[i, kept] >= containment_threshold).any()
        ):
            continue
        kept.append(int(i))
    return np.asarray(kept, np.int64)


def sample_seeds(
    prediction: Prediction | Grower,
    max_seeds: int = 100,
    alpha: float = 0.3,
    min_seediness: float = 0.5,
    fg_threshold: float = 0.5,
    stride: int = 2,
    min_distance: float | None = None,
) -> np.ndarray:
    """Fathi et al.'s seed sampling: ``argmax_p [log S_p + alpha log D(p, picked)]``.

    ``D(p, picked) = min_q ||e_p - e_q||^2`` over already picked seeds q, so each new seed
    is a good seed (high seediness) far in embedding space from the previous ones.

    Parameters
    ----------
    prediction : Prediction or Grower
        Network outputs.
    max_seeds : int
        At most this many seeds (the paper: ~100 cover an image).
    alpha : float
        Weight of diversity against seediness (paper: 0.3).
    min_seediness : float
        Candidates need seediness above this (and foreground above ``fg_threshold``).
    fg_threshold : float
        Foreground probability a candidate needs.
    stride : int
        Candidates on a grid with this spacing (speed; worms are wider than 2 px).
    min_distance : float, optional
        Stop when no candidate is farther than this (squared embedding distance) from the
        picked seeds, i.e. everything is covered. Default: the distance at tau = 0.9.

    Returns
    -------
    np.ndarray
        (K, 2) int64 (row, col) seeds in picking order.
    """
    grower = get_grower(prediction)
    pred = grower.prediction
    h, w = grower.shape
    if max_seeds < 1:
        return np.zeros((0, 2), np.int64)
    seed_map = np.asarray(pred.seediness, np.float32)
    ok = (seed_map > min_seediness) & (np.asarray(pred.foreground) > fg_threshold)
    grid = np.zeros((h, w), bool)
    grid[::stride, ::stride] = True
    cand = np.flatnonzero(ok & grid)
    if len(cand) == 0:
        return np.zeros((0, 2), np.int64)
    min_distance = d2_threshold(0.9) if min_distance is None else float(min_distance)
    log_s = np.log(np.maximum(seed_map.reshape(-1)[cand], 1e-6))
    dist = np.full(len(cand), np.inf, np.float32)
    picked: list[int] = []
    score = log_s.copy()
    for _ in range(min(max_seeds, len(cand))):
        j = int(np.argmax(score))
        if picked and dist[j] < min_distance:
            break
        picked.append(j)
        d = grower.sq_dist(grower.flat[:, cand[j]][None], cand)[0]
        np.minimum(dist, d, out=dist)
        score = log_s + alpha * np.log(np.maximum(dist, 1e-6))
        score[picked] = -np.inf
    rows, cols = np.divmod(cand[picked], w)
    return np.stack([rows, cols], axis=1).astype(np.int64)


def _grow_all(
    grower: Grower, seeds: np.ndarray, taus: np.ndarray, pixels: np.ndarray
) -> np.ndarray:
    """Masks of all seeds on ``pixels`` (flat indices) at once: (K, len(pixels)) bool."""
    v = grower.vectors(seeds)
    d2 = grower.sq_dist(v, pixels)
    thr = np.array([d2_threshold(t) for t in taus], np.float32)
    return d2 <= thr[:, None]


def _seed_attributes(
    prediction: Prediction, seeds: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tau, cls, score = prediction.best_tau_class()
    r, c = seeds[:, 0], seeds[:, 1]
    return tau[r, c].astype(np.float32), cls[r, c], score[r, c].astype(np.float32)


def segment_seeds(
    prediction: Prediction,
    max_seeds: int = 100,
    alpha: float = 0.3,
    min_seediness: float = 0.5,
    min_score: float = 0.5,
    iou_threshold: float = 0.5,
    containment_threshold: float = 0.8,
    min_size: int = 30,
    fg_threshold: float = 0.5,
    boundary_barrier: float | None = None,
    extra_seeds: np.ndarray | None = None,
    extra_score_factor: float = 1.0,
) -> Instances:
    """Fathi et al.: sampled seeds grown at their best threshold, duplicates removed.

    Parameters
    ----------
    prediction : Prediction
        Network outputs.
    max_seeds, alpha, min_seediness : see :func:`sample_seeds`.
    min_score : float
        Drop seeds whose class score (at their best tau and class) is below this.
    iou_threshold, containment_threshold : float
        Duplicate removal, see :func:`nms`.
    min_size : int
        Drop masks smaller than this many pixels.
    fg_threshold : float
        Masks are grown on pixels with foreground above this.
    boundary_barrier : float, optional
        Boundary barrier for the final refinement (see :func:`~napari_instseg.core.grow.grow`).
    extra_seeds : np.ndarray, optional
        (K, 2) (row, col) more seeds to try, inside the image (the hybrid method passes
        boundary-segment centres).
    extra_score_factor : float
        Their scores are multiplied by this (ranks them after sampled seeds of equal score).

    Returns
    -------
    Instances
        Masks (overlaps kept), scores, classes, seeds, taus.

    Raises
    ------
    ValueError
        An empty or non-finite prediction, or ``extra_seeds`` that are no (row, col)
        pairs inside the image.
    """
    _check_prediction(prediction)
    grower = get_grower(prediction)
    shape = grower.shape
    extra = _as_points(extra_seeds, shape, "extra_seeds")  # (row, col) inside the image
    seeds = sample_seeds(grower, max_seeds, alpha, min_seediness, fg_threshold)
    factor = np.ones(len(seeds), np.float32)
    if len(extra):
        seeds = np.concatenate([seeds, extra])
        factor = np.concatenate([factor, np.full(len(extra), extra_score_factor, np.float32)])
    if len(seeds) == 0:
        return _empty(shape)
    taus, classes, scores = _seed_attributes(prediction, seeds)
    scores = scores * factor
    good = scores >= min_score
    seeds, taus, classes, scores = seeds[good], taus[good], classes[good], scores[good]
    if len(seeds) == 0:
        return _empty(shape)
    pixels = np.flatnonzero(np.asarray(prediction.foreground).reshape(-1) > fg_threshold)
    rough = _grow_all(grower, seeds, taus, pixels)
    keep = nms(rough, scores, iou_threshold, containment_threshold)
    masks = []
    for i in keep:
        # clipped below at this method's own threshold; crossing pixels as tuned (0.5)
        m = grower.grow(
            seeds[i], tau=float(taus[i]), boundary_barrier=boundary_barrier, connected=True,
            fg_threshold=0.5, clip_to_foreground=False,
        )  # fmt: skip
        m &= np.asarray(prediction.foreground) > fg_threshold
        masks.append(m)
    if not masks:
        return _empty(shape)
    masks_arr = np.stack(masks)
    # refinement can change masks (connectivity): remove duplicates and tiny ones again
    sizes = masks_arr.reshape(len(masks_arr), -1).sum(axis=1)
    ok = np.flatnonzero(sizes >= min_size)
    keep2 = ok[nms(masks_arr[ok], scores[keep][ok], iou_threshold, containment_threshold)]
    sel = keep[keep2]
    return Instances(
        masks=masks_arr[keep2],
        scores=scores[sel],
        classes=classes[sel],
        seeds=seeds[sel],
        taus=taus[sel],
    )


def _boundary_labels(
    prediction: Prediction,
    boundary_threshold: float,
    marker_threshold: float,
    fg_threshold: float,
    min_marker_size: int,
    dilate_iterations: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """BAISeg stages 1-3: thin, dilate, distance transform, markers, watershed.

    Returns the watershed labels (before closing) and the distance map.
    """
    boundary = np.asarray(prediction.boundary, np.float32)
    fg = np.asarray(prediction.foreground) > fg_threshold
    thin = skeletonize(boundary > boundary_threshold)  # non-maximum suppression: 1-px lines
    thick = (
        ndimage.binary_dilation(thin, iterations=dilate_iterations) if dilate_iterations else thin
    )
    dist = ndimage.distance_transform_edt(fg & ~thick)
    markers, n = ndimage.label(dist > marker_threshold, _EIGHT)
    if n and min_marker_size > 1:
        sizes = np.bincount(markers.ravel(), minlength=n + 1)
        small = sizes < min_marker_size
        small[0] = False
        markers[small[markers]] = 0
    labels = watershed(boundary, markers, mask=fg)
    return labels, dist


def merge_fragments(
    labels: np.ndarray, embeddings: np.ndarray, min_size: int, tau: float
) -> np.ndarray:
    """Merge label segments smaller than ``min_size`` into their most similar neighbour.

    Where the boundary map is high across a whole thin worm, the watershed cuts it into
    pieces that are each too small to keep: the worm would be lost. Pieces of one worm
    share an embedding, so a small segment is merged into the touching segment whose mean
    embedding is most similar, when that similarity (Fathi et al.'s
    ``sigma = 2 / (1 + exp(||e_a - e_b||^2))``) exceeds ``tau``. Greedy, most similar pair
    first, means updated after each merge; repeated until no small segment can merge.
    Segments of ``min_size`` or more are never merged with each other.

    Parameters
    ----------
    labels : np.ndarray
        (H, W) integer segments, 0 = background.
    embeddings : np.ndarray
        (D, H, W) pixel embeddings.
    min_size : int
        Segments smaller than this (in pixels) are fragments.
    tau : float
        Similarity a fragment needs with a neighbour to merge, in (0, 1).

    Returns
    -------
    np.ndarray
        Labels of the same shape; merged segments take the label of the one they joined.
    """
    max_d2 = d2_threshold(tau)
    labels = np.asarray(labels)
    n = int(labels.max(initial=0))
    if n < 2 or min_size <= 0:
        return labels
    # pairs of segments that touch (4-neighbourhood)
    a = np.concatenate([labels[:, :-1].ravel(), labels[:-1, :].ravel()])
    b = np.concatenate([labels[:, 1:].ravel(), labels[1:, :].ravel()])
    touch = (a != b) & (a > 0) & (b > 0)
    if not touch.any():
        return labels
    pairs = np.unique(np.sort(np.stack([a[touch], b[touch]], axis=1), axis=1), axis=0)
    flat = labels.ravel()
    size = np.bincount(flat, minlength=n + 1).astype(np.float64)
    inside = np.flatnonzero(flat)  # background pixels add to no sum that is used
    segment_of = flat[inside]
    sums = np.stack(
        [
            np.bincount(segment_of, weights=e.ravel()[inside], minlength=n + 1)
            for e in np.asarray(embeddings)
        ],
        axis=1,
    )
    root = np.arange(n + 1)
    while len(pairs):
        p, q = root[pairs[:, 0]], root[pairs[:, 1]]
        keep = p != q
        pairs, p, q = pairs[keep], p[keep], q[keep]
        small = np.minimum(size[p], size[q]) < min_size
        if not small.any():
            break
        p, q = p[small], q[small]
        mean_p = sums[p] / size[p, None]
        mean_q = sums[q] / size[q, None]
        d2 = ((mean_p - mean_q) ** 2).sum(axis=1)
        best = int(np.argmin(d2))
        if d2[best] >= max_d2:  # similarity <= tau
            break
        keep_label, gone = int(p[best]), int(q[best])
        root[root == gone] = keep_label
        size[keep_label] += size[gone]
        sums[keep_label] += sums[gone]
    root[0] = 0
    return root[labels]


def segment_boundary(
    prediction: Prediction,
    boundary_threshold: float = 0.5,
    marker_threshold: float = 0.5,
    fg_threshold: float = 0.5,
    min_marker_size: int = 5,
    min_size: int = 30,
    closing_size: int = 5,
    dilate_iterations: int = 1,
    split_factor: float = 0.0,
    split_tau: float = 0.3,
    untangle_factor: float = 1.3,
    merge_tau: float = 0.3,
    size_weight: float = 1.0,
    join_arms: bool = True,
) -> Instances:
    """BAISeg's mask extraction pipeline on the boundary and foreground maps.

    Steps: skeletonize the thresholded boundary (thin lines), dilate them
    ``dilate_iterations`` times (BAISeg: 2; 1 by default here: two erase the interior of
    the 7-11 px wide BBBC010 worms), Euclidean
    distance transform of the foreground outside the dilated lines, threshold it into
    markers (connected components), watershed of the boundary map from the markers inside
    the foreground, closing of every instance with a ``closing_size`` elliptical element,
    and keep only foreground pixels. Score = mean seediness inside the instance. Before the
    closing, watershed segments smaller than ``min_size`` (pieces of a thin worm the
    boundary map covers end to end) are merged into their most similar neighbour by
    embedding (:func:`merge_fragments`).

    Parameters
    ----------
    prediction : Prediction
        Network outputs.
    boundary_threshold : float
        Boundary probability above which a pixel is a boundary before thinning.
    marker_threshold : float
        Distance (pixels) from the boundary / background a marker pixel needs.
    fg_threshold : float
        Foreground probability threshold.
    min_marker_size : int
        Markers smaller than this are dropped (noise).
    min_size : int
        Instances smaller than this are dropped.
    closing_size : int
        Size of the elliptical closing element (BAISeg: 5).
    dilate_iterations : int
        Dilations of the thinned boundary lines before the distance transform (BAISeg: 2).
    split_factor : float
        When > 0, segments larger than ``split_factor`` times the median segment area are
        split by embedding similarity at ``split_tau`` (:func:`split_merged`); 0 = off.
    split_tau : float
        Similarity threshold of the split.
    untangle_factor : float
        When > 0, segments (after the split) larger than this times the median segment
        area are cut where their skeleton shows two worms crossing, touching side-on or
        end to end (:func:`napari_instseg.core.untangle.untangle`); 0 = off.
    merge_tau : float
        Embedding similarity a segment smaller than ``min_size`` needs with a touching
        segment to merge into it (:func:`merge_fragments`) instead of being dropped; 0 = off.
    size_weight : float
        Scores are weighted by how typical each segment's size is
        (:func:`weight_scores_by_size`); 0 = off.
    join_arms : bool
        With the untangling, first re-read a three-armed segment together with the
        neighbouring segment whose skeleton ends at its junction as a crossing of four
        arms (the boundary map cut one arm off;
        :func:`napari_instseg.core.untangle.join_cut_arms`).

    Returns
    -------
    Instances
        Masks (overlaps only through the closing, or between the parts of a split or
        untangled segment where worms cross), scores from the seediness (weighted by
        size), classes from the
        class scores, seeds at each instance's deepest pixel (a split part: its seed).
    """
    _check_prediction(prediction)
    return _segment_boundary_cropped(
        prediction,
        boundary_threshold,
        marker_threshold,
        fg_threshold,
        min_marker_size,
        min_size,
        closing_size,
        dilate_iterations,
        split_factor,
        split_tau,
        untangle_factor,
        merge_tau,
        size_weight,
        join_arms,
    ).to_instances()


def _segment_boundary_cropped(
    prediction: Prediction,
    boundary_threshold: float = 0.5,
    marker_threshold: float = 0.5,
    fg_threshold: float = 0.5,
    min_marker_size: int = 5,
    min_size: int = 30,
    closing_size: int = 5,
    dilate_iterations: int = 1,
    split_factor: float = 0.0,
    split_tau: float = 0.3,
    untangle_factor: float = 1.3,
    merge_tau: float = 0.3,
    size_weight: float = 1.0,
    join_arms: bool = True,
) -> CroppedInstances:
    """:func:`segment_boundary` with every instance kept in its box (no full-image masks)."""
    shape = prediction.shape
    labels, dist = _boundary_labels(
        prediction,
        boundary_threshold,
        marker_threshold,
        fg_threshold,
        min_marker_size,
        dilate_iterations,
    )
    if merge_tau > 0:
        labels = merge_fragments(labels, prediction.embeddings, min_size, merge_tau)
    fg = np.asarray(prediction.foreground) > fg_threshold
    selem = ellipse(closing_size // 2, closing_size // 2).astype(bool)
    if selem.shape != (closing_size, closing_size):  # even sizes: fall back to a disk
        selem = disk(closing_size // 2).astype(bool)
    pad = closing_size
    _, cls_map, _ = prediction.best_tau_class()
    seed_map = np.asarray(prediction.seediness, np.float32)
    boxes, masks, scores, classes, seeds = [], [], [], [], []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        r0, r1 = max(sl[0].start - pad, 0), min(sl[0].stop + pad, shape[0])
        c0, c1 = max(sl[1].start - pad, 0), min(sl[1].stop + pad, shape[1])
        crop = labels[r0:r1, c0:c1] == i
        closed = ndimage.binary_closing(crop, selem) | crop
        closed &= fg[r0:r1, c0:c1]
        if closed.sum() < min_size:
            continue
        d = np.where(closed, dist[r0:r1, c0:c1], -1)
        sr, sc = np.unravel_index(int(np.argmax(d)), d.shape)
        boxes.append((r0, r1, c0, c1))
        masks.append(closed)
        scores.append(float(seed_map[r0:r1, c0:c1][closed].mean()))
        classes.append(int(np.bincount(cls_map[r0:r1, c0:c1][closed]).argmax()))
        seeds.append((sr + r0, sc + c0))
    if not masks:
        return CroppedInstances.from_instances(_empty(shape))
    segments = CroppedInstances(
        shape=shape,
        boxes=boxes,
        crops=masks,
        scores=np.asarray(scores, np.float32),
        classes=np.asarray(classes, np.int64),
        seeds=np.asarray(seeds, np.int64),
        taus=None,
    )
    if split_factor > 0:
        segments = _split_merged(get_grower(prediction), segments, split_factor, split_tau)
    if untangle_factor > 0:
        segments = _untangle(
            segments, factor=untangle_factor, boundary=prediction.boundary, join_arms=join_arms
        )
    return weight_scores_by_size(segments, size_weight)


def weight_scores_by_size(
    instances: Instances | CroppedInstances, power: float = 1.0
) -> Instances | CroppedInstances:
    """Scale each score by how close its instance's area is to the image's median area.

    Score times ``min(a / m, m / a) ** power`` (``a``: the instance's area, ``m``: the
    median area of the image's instances). Two worms left merged are about twice the
    typical size and a piece of a worm is smaller; ranking them below whole worms raises
    average precision (masks are unchanged, so the DSB accuracy is too). Assumes the
    objects of one image are of similar size, as worms of one population are.

    Parameters
    ----------
    instances : Instances
        Instances with scores.
    power : float
        Strength of the weighting; 0 = scores unchanged.

    Returns
    -------
    Instances
        The same masks, classes, seeds and taus with weighted scores (the input itself
        when ``power`` is 0 or there are fewer than two instances).
    """
    if power < 0:
        raise ValueError(f"power must be >= 0, got {power}")
    n = len(instances)
    if power == 0 or n < 2:
        return instances
    areas = instances.areas.astype(np.float64)
    ratio = np.maximum(areas, 1.0) / max(float(np.median(areas)), 1.0)
    weight = np.minimum(ratio, 1.0 / ratio) ** power
    return dataclasses.replace(instances, scores=(instances.scores * weight).astype(np.float32))


def drop_blobs(
    instances: Instances, max_elongation: float = 2.5, min_solidity: float = 0.8
) -> Instances:
    """Remove compact convex instances (debris clumps, bubbles) from elongated objects.

    An instance is dropped when it is both short and wide for its size (``elongation``
    below ``max_elongation``) and convex (``solidity`` above ``min_solidity``): a curled
    worm is compact but not convex, a straight one convex but long. Of BBBC010's
    training-half annotations (A01-B24: 48 images, 681 worms) none meets both at (2.5, 0.8).
    Instances touching the image's edge are kept: a worm cut off by the edge (or by a
    batch window's) can look like a blob.

    Parameters
    ----------
    instances : Instances
        Instances to filter.
    max_elongation : float
        Major over minor axis below which an instance counts as compact (> 1).
    min_solidity : float
        Area over convex hull area above which it counts as convex, in (0, 1).

    Returns
    -------
    Instances
        The instances that are not blobs (the input itself when none is dropped).

    Raises
    ------
    ValueError
        If a limit is out of range.
    """
    _check_blob_limits(max_elongation, min_solidity)
    keep = [
        i
        for i, mask in enumerate(instances.masks)
        if not _is_blob(mask, (0, 0, 0, 0), max_elongation, min_solidity)
    ]
    if len(keep) == len(instances):
        return instances
    idx = np.asarray(keep, np.int64)
    return Instances(
        masks=instances.masks[idx],
        scores=instances.scores[idx],
        classes=instances.classes[idx],
        seeds=None if instances.seeds is None else instances.seeds[idx],
        taus=None if instances.taus is None else instances.taus[idx],
    )


def _check_blob_limits(max_elongation: float, min_solidity: float) -> None:
    if not max_elongation > 1.0 or not 0.0 < min_solidity < 1.0:
        raise ValueError(
            "a blob needs max_elongation > 1 and min_solidity in (0, 1), got "
            f"{max_elongation} and {min_solidity}"
        )


def _is_blob(
    crop: np.ndarray,
    box: tuple[int, int, int, int],
    max_elongation: float,
    min_solidity: float,
    shape: tuple[int, int] | None = None,
) -> bool:
    """Whether a mask (``crop`` at ``box`` of an image of ``shape``) is a blob (drop_blobs).

    ``shape`` defaults to the crop's own (the crop is the whole image).
    """
    h, w = crop.shape if shape is None else shape
    tight = bounding_box(crop)
    if tight is None:
        return False
    r0, r1 = tight[0] + box[0], tight[1] + box[0]
    c0, c1 = tight[2] + box[2], tight[3] + box[2]
    # an object cut by the image's (or a batch window's) edge cannot be judged by shape
    if r0 == 0 or c0 == 0 or r1 == h or c1 == w:
        return False
    crop = crop[tight[0] : tight[1], tight[2] : tight[3]]
    return elongation(crop) < max_elongation and solidity(crop) > min_solidity


def _drop_blobs_cropped(
    instances: CroppedInstances, max_elongation: float, min_solidity: float
) -> CroppedInstances:
    """:func:`drop_blobs` on cropped masks (the input itself when none is dropped)."""
    keep = [
        i
        for i, (box, crop) in enumerate(zip(instances.boxes, instances.crops, strict=True))
        if not _is_blob(crop, box, max_elongation, min_solidity, instances.shape)
    ]
    if len(keep) == len(instances):
        return instances
    idx = np.asarray(keep, np.int64)
    return dataclasses.replace(
        instances,
        boxes=[instances.boxes[i] for i in keep],
        crops=[instances.crops[i] for i in keep],
        scores=instances.scores[idx],
        classes=instances.classes[idx],
        seeds=None if instances.seeds is None else instances.seeds[idx],
        taus=None if instances.taus is None else instances.taus[idx],
    )


def split_merged(
    prediction: Prediction | Grower,
    instances: Instances,
    factor: float = 1.5,
    tau: float = 0.3,
    iterations: int = 1,
    min_part_fraction: float = 0.3,
    max_parts: int = 4,
    bridge_radius: int = 5,
) -> Instances:
    """Split segments much larger than the typical one into parts by embedding similarity.

    A gap in the boundary map merges touching or crossing worms into one watershed
    segment about twice the size of a worm. For each segment larger than ``factor`` times
    the median segment area: take its seediest pixel not yet explained, grow it over the
    segment by embedding similarity at ``tau`` (``iterations`` times re-centred on the
    part's mean embedding, Fathi et al.'s mean-shift-like refinement), keep the connected
    part around the seed (pieces within ``2 * bridge_radius`` joined) if it has at least
    ``min_part_fraction`` times the median area, and repeat on what is left. With two or
    more parts the segment is replaced by them; pixels no part reached go to the part whose
    mean embedding is nearest, and a closing inside the segment gives each part back the
    pixels a crossing worm took. Parts may overlap, which keeps both worms whole where
    they cross.

    Parameters
    ----------
    prediction : Prediction or Grower
        Network outputs (embeddings and seediness are used).
    instances : Instances
        Segments, e.g. from the boundary pipeline.
    factor : float
        Segments larger than this times the median area are candidates (> 1).
    tau : float
        Similarity threshold in (0, 1) for growing a part.
    iterations : int
        Re-centring steps on the part's mean embedding.
    min_part_fraction : float
        A part needs this fraction of the median segment area.
    max_parts : int
        At most this many parts per segment.
    bridge_radius : int
        Pieces of a part closer than about twice this (pixels) count as connected, and a
        closing with a disk of this radius inside the segment gives a part back the
        pixels where another worm crosses it (0: neither).

    Returns
    -------
    Instances
        The instances with each split segment replaced by its parts (same score and class;
        the parts' seeds, ``taus`` = ``tau`` where the input had taus).

    Raises
    ------
    ValueError
        If ``tau`` is outside (0, 1) or the masks do not match the prediction's shape.
    """
    if not 0.0 < tau < 1.0:
        raise ValueError(f"tau must be in (0, 1), got {tau}")
    grower = get_grower(prediction)
    n = len(instances)
    if n and instances.masks.shape[1:] != grower.shape:
        raise ValueError(
            f"masks of shape {instances.masks.shape[1:]} do not match the prediction "
            f"{grower.shape}"
        )
    if n < 2 or factor <= 0:
        return instances
    cropped = CroppedInstances.from_instances(instances)
    split = _split_merged(
        grower, cropped, factor, tau, iterations, min_part_fraction, max_parts, bridge_radius
    )
    return instances if split is cropped else split.to_instances()


def _split_merged(
    grower: Grower,
    instances: CroppedInstances,
    factor: float = 1.5,
    tau: float = 0.3,
    iterations: int = 1,
    min_part_fraction: float = 0.3,
    max_parts: int = 4,
    bridge_radius: int = 5,
) -> CroppedInstances:
    """:func:`split_merged` on cropped masks (the input itself when nothing is split)."""
    n = len(instances)
    if n < 2 or factor <= 0:
        return instances
    areas = instances.areas
    typical = float(np.median(areas))
    big = set(np.flatnonzero(areas > factor * typical).tolist())
    if not big:
        return instances
    seed_map = np.asarray(grower.prediction.seediness, np.float32).reshape(-1)
    h, w = grower.shape
    min_part = max(min_part_fraction * typical, 1.0)
    if instances.seeds is not None:
        seeds = np.asarray(instances.seeds, np.int64).reshape(n, 2)
    else:  # the seediest pixel of each segment (the image's first pixel for an empty one)
        seeds = np.zeros((n, 2), np.int64)
        for k, ((r0, r1, c0, c1), crop) in enumerate(
            zip(instances.boxes, instances.crops, strict=True)
        ):
            if crop.any():
                local = seed_map.reshape(h, w)[r0:r1, c0:c1]
                best = np.where(crop, local, -1.0).argmax()
                seeds[k] = np.divmod(best, crop.shape[1]) + np.array([r0, c0])
    out: dict[str, list] = {
        "boxes": [], "crops": [], "scores": [], "classes": [], "seeds": [], "taus": []
    }  # fmt: skip
    for i in range(n):
        parts = []
        if i in big:
            rows, cols = np.nonzero(instances.crops[i])
            rows, cols = rows + instances.boxes[i][0], cols + instances.boxes[i][2]
            parts = _split_segment(
                grower, rows, cols, seed_map, tau, iterations, min_part, max_parts, bridge_radius
            )
        if len(parts) < 2:
            parts = [(instances.boxes[i], instances.crops[i], seeds[i])]
        for box, mask, seed in parts:
            out["boxes"].append(box)
            out["crops"].append(mask)
            out["scores"].append(instances.scores[i])
            out["classes"].append(instances.classes[i])
            out["seeds"].append(seed)
            out["taus"].append(instances.taus[i] if instances.taus is not None else tau)
    return CroppedInstances(
        shape=instances.shape,
        boxes=out["boxes"],
        crops=out["crops"],
        scores=np.asarray(out["scores"], np.float32),
        classes=np.asarray(out["classes"], np.int64),
        seeds=np.asarray(out["seeds"], np.int64).reshape(-1, 2),
        taus=np.asarray(out["taus"], np.float32) if instances.taus is not None else None,
    )


def _split_segment(
    grower: Grower,
    rows: np.ndarray,
    cols: np.ndarray,
    seed_map: np.ndarray,
    tau: float,
    iterations: int,
    min_part: float,
    max_parts: int,
    bridge_radius: int,
) -> list[tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]]:
    """Parts of one segment (its pixels ``rows``, ``cols`` in the image) as (box, mask, seed).

    Each part's mask is cut to the segment's bounding box ``box``; fewer than two parts
    means "do not split".
    """
    h, w = grower.shape
    box = (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1)
    pad = bridge_radius + 1
    r0, c0 = rows.min() - pad, cols.min() - pad  # local frame, padded for the morphology
    local_shape = (rows.max() - r0 + 1 + pad, cols.max() - c0 + 1 + pad)
    lr, lc = rows - r0, cols - c0
    bridge = disk(bridge_radius).astype(bool) if bridge_radius > 0 else None
    idx = rows * w + cols  # flat indices of the segment's pixels
    threshold = d2_threshold(tau)
    remaining = np.ones(len(idx), bool)
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(2 * max_parts + 4):  # a bounded number of tries
        if len(parts) >= max_parts or remaining.sum() < min_part:
            break
        candidates = np.flatnonzero(remaining)
        j = candidates[np.argmax(seed_map[idx[candidates]])]
        vector = grower.flat[:, idx[j]][None]
        for _ in range(iterations):
            member = grower.sq_dist(vector, idx)[0] <= threshold
            if not member.any():
                break
            vector = grower.flat[:, idx[member]].mean(axis=1)[None]
        member = grower.sq_dist(vector, idx)[0] <= threshold
        local = np.zeros(local_shape, bool)
        local[lr[member], lc[member]] = True
        # the part is the seed's connected piece; with a bridge, pieces of one worm cut
        # apart by a crossing worm (whose pixels look like the other worm) stay together
        reach = ndimage.binary_dilation(local, bridge) if bridge is not None else local
        labels, _ = ndimage.label(reach, structure=_EIGHT)
        own = labels[lr[j], lc[j]]
        part = member & (labels[lr, lc] == own) if own else np.zeros(len(idx), bool)
        part[j] = True
        remaining &= ~part
        if part.sum() >= min_part:
            parts.append((part, vector))
    if len(parts) < 2:
        return []
    vectors = np.concatenate([v for _, v in parts])
    nearest = grower.sq_dist(vectors, idx).argmin(axis=0)
    result = []
    for k, (part, _) in enumerate(parts):
        full = part | (nearest == k)
        if bridge is not None:  # fill the crossing: both worms keep the shared pixels
            local = np.zeros(local_shape, bool)
            local[lr[full], lc[full]] = True
            full |= ndimage.binary_closing(local, bridge)[lr, lc]
        m = np.zeros((box[1] - box[0], box[3] - box[2]), bool)
        m[rows[full] - box[0], cols[full] - box[2]] = True
        seed_pos = np.flatnonzero(part)[np.argmax(seed_map[idx[part]])]
        result.append((box, m, np.array([rows[seed_pos], cols[seed_pos]], np.int64)))
    return result


def segment_hybrid(
    prediction: Prediction,
    max_seeds: int = 100,
    alpha: float = 0.3,
    min_seediness: float = 0.5,
    min_score: float = 0.5,
    iou_threshold: float = 0.5,
    containment_threshold: float = 0.8,
    min_size: int = 30,
    fg_threshold: float = 0.5,
    boundary_barrier: float | None = 0.5,
    boundary_threshold: float = 0.5,
    marker_threshold: float = 0.5,
    dilate_iterations: int = 1,
    cover_threshold: float = 0.5,
    boundary_score_factor: float = 0.9,
    untangle_factor: float = 1.3,
    merge_tau: float = 0.3,
    primary: str = "seeds",
    split_factor: float = 0.0,
    split_tau: float = 0.3,
    size_weight: float = 1.0,
    join_arms: bool = True,
) -> Instances:
    """Seeds, boundaries and similarity together.

    Which source leads is ``primary``, chosen per model on validation images: the grown
    masks where the embeddings separate worms well (``"seeds"``, below), the boundary
    pipeline's segments where the boundary map is the stronger output (``"boundary"``:
    every segment of :func:`segment_boundary`, with its splitting, untangling and size
    weighting, is kept, and a grown mask is added only where at least ``cover_threshold``
    of it, and ``min_size`` pixels, lie outside every segment (dilated by 2 px): worms the
    watershed lost; their scores times ``boundary_score_factor``).

    With ``primary="seeds"``:

    1. The BAISeg pipeline (:func:`segment_boundary`) gives segments; each segment's deepest
       pixel joins Fathi's sampled seeds as an extra seed (recall: a worm the sampler
       missed still gets a seed).
    2. Every seed grows by embedding similarity at its best tau, refined with the boundary
       map as a barrier (touching worms whose embeddings are close stay apart) while
       crossing pixels are bridged, so crossed worms stay whole and overlaps are kept
       (which the watershed alone cannot do).
    3. Duplicates are removed (:func:`nms`); boundary segments covered less than
       ``cover_threshold`` by the grown masks are added with their score times
       ``boundary_score_factor`` (recall where embeddings fail).

    Parameters
    ----------
    prediction : Prediction
        Network outputs.
    max_seeds, alpha, min_seediness, min_score, iou_threshold, containment_threshold,
    min_size, fg_threshold :
        As in :func:`segment_seeds`.
    boundary_barrier : float or None
        Barrier for growing (None: no barrier).
    boundary_threshold, marker_threshold :
        As in :func:`segment_boundary`.
    cover_threshold : float
        A boundary segment is added when less than this fraction of it is covered.
    boundary_score_factor : float
        Score multiplier for seeds from boundary segments and for added segments.
    untangle_factor, merge_tau : float
        As in :func:`segment_boundary` (for the boundary segments).
    join_arms : bool
        As in :func:`segment_boundary`.
    primary : {"seeds", "boundary"}
        Which source leads (see above).
    split_factor, split_tau, size_weight : float
        As in :func:`segment_boundary`; only with ``primary="boundary"``.

    Returns
    -------
    Instances
        Overlapping masks with scores, classes, seeds and taus (NaN for added segments).
    """
    _check_prediction(prediction)
    if primary not in ("seeds", "boundary"):
        raise ValueError(f"primary must be 'seeds' or 'boundary', got {primary!r}")
    shape = prediction.shape
    boundary_first = primary == "boundary"
    segs = segment_boundary(
        prediction,
        boundary_threshold=boundary_threshold,
        marker_threshold=marker_threshold,
        fg_threshold=fg_threshold,
        min_size=min_size,
        dilate_iterations=dilate_iterations,
        untangle_factor=untangle_factor,
        merge_tau=merge_tau,
        join_arms=join_arms,
        split_factor=split_factor if boundary_first else 0.0,
        split_tau=split_tau,
        # seeds first: the added segments' scores stay comparable to the grown ones
        size_weight=size_weight if boundary_first else 0.0,
    )
    seed_params = {
        "max_seeds": max_seeds,
        "alpha": alpha,
        "min_seediness": min_seediness,
        "min_score": min_score,
        "iou_threshold": iou_threshold,
        "containment_threshold": containment_threshold,
        "min_size": min_size,
        "fg_threshold": fg_threshold,
        "boundary_barrier": boundary_barrier,
    }
    if boundary_first:
        # seeds only where no segment is: nothing left there, nothing to grow
        covered = ndimage.binary_dilation(segs.masks.any(axis=0), iterations=2)
        open_fg = (np.asarray(prediction.foreground) > fg_threshold) & ~covered
        if int(open_fg.sum()) < min_size:
            return segs
        seediness = np.where(open_fg, prediction.seediness, 0.0).astype(np.float32)
        grown = segment_seeds(dataclasses.replace(prediction, seediness=seediness), **seed_params)
        return _add_uncovered(segs, grown, cover_threshold, min_size, boundary_score_factor)
    grown = segment_seeds(
        prediction,
        extra_seeds=segs.seeds,
        extra_score_factor=boundary_score_factor,
        **seed_params,  # type: ignore[arg-type]
    )
    if len(segs) == 0:
        return grown
    covered = grown.masks.any(axis=0) if len(grown) else np.zeros(shape, bool)
    seg_area = segs.areas
    seg_cov = (segs.masks & covered).reshape(len(segs), -1).sum(axis=1) / np.maximum(seg_area, 1)
    add = np.flatnonzero((seg_cov < cover_threshold) & (segs.scores >= min_score))
    if len(add) == 0:
        return grown
    masks = np.concatenate([grown.masks, segs.masks[add]])
    scores = np.concatenate([grown.scores, segs.scores[add] * boundary_score_factor])
    classes = np.concatenate([grown.classes, segs.classes[add]])
    seeds = np.concatenate([grown.seeds.reshape(-1, 2), segs.seeds[add]])
    taus = np.concatenate([grown.taus, np.full(len(add), np.nan, np.float32)])
    return Instances(masks=masks, scores=scores, classes=classes, seeds=seeds, taus=taus)


def _add_uncovered(
    segments: Instances, grown: Instances, share: float, min_size: int, score_factor: float
) -> Instances:
    """``segments`` plus the grown masks lying mostly (``share``) outside all of them."""
    if len(grown) == 0:
        return segments
    if len(segments) == 0:
        return grown
    covered = ndimage.binary_dilation(segments.masks.any(axis=0), iterations=2)
    outside = (grown.masks & ~covered).reshape(len(grown), -1).sum(axis=1)
    add = np.flatnonzero((outside >= share * grown.areas) & (outside >= min_size))
    if len(add) == 0:
        return segments
    n = len(segments)
    return Instances(
        masks=np.concatenate([segments.masks, grown.masks[add]]),
        scores=np.concatenate([segments.scores, grown.scores[add] * score_factor]),
        classes=np.concatenate([segments.classes, grown.classes[add]]),
        seeds=np.concatenate([segments.seeds.reshape(-1, 2), grown.seeds[add].reshape(-1, 2)])
        if segments.seeds is not None and grown.seeds is not None
        else None,
        taus=np.concatenate(
            [np.full(n, np.nan, np.float32), np.asarray(grown.taus, np.float32)[add]]
        )
        if grown.taus is not None
        else None,
    )


def segment(prediction: Prediction, method: str = "auto", **params: object) -> Instances:
    """Segment all instances of a prediction automatically.

    Parameters
    ----------
    prediction : Prediction
        Network outputs for one image.
    method : {"auto", "seeds", "boundary", "hybrid"}
        ``"seeds"``: :func:`segment_seeds` (Fathi et al.); ``"boundary"``:
        :func:`segment_boundary` (BAISeg); ``"hybrid"``: :func:`segment_hybrid`.
        ``"auto"``: the method recommended in the model's metadata (chosen on its
        validation wells, copied into ``prediction.metadata["recommended_method"]`` by
        ``predict``), else ``"hybrid"``.
    **params
        Keyword arguments of the chosen method. They override the parameters tuned for the
        model (``prediction.metadata["segment_params"][method]``), which override the
        method's own defaults. Three more apply to every method:
        ``blob_filter=(max_elongation, min_solidity)`` first drops compact convex
        instances (:func:`drop_blobs`; None: off, the default unless the model was tuned
        with it); ``edge_thresholds=(curved, straight)`` then re-decides each mask's
        outline pixels by the image contrast
        (:func:`~napari_instseg.core.edges.refine_edges`; None: off, the default unless
        tuned) and ``edge_solidity`` sets its solidity range. The refinement needs
        ``prediction.contrast`` (filled in by ``predict``): asked for explicitly without
        it, it raises; a tuned refinement is skipped without it.

        A prediction made at another scale (``predict(..., scale=s)``, recorded in
        ``prediction.metadata["scale"]``) is segmented on the network's own maps
        (``prediction.model_grid``, or the maps resized to the model's scale when it has
        none), so that every size and distance above is in the model's pixels; the masks
        come back on the image's pixels, where the edge refinement then re-decides their
        outline with the image's own contrast.

    Returns
    -------
    Instances
        Per-instance masks (overlaps kept except for ``"boundary"``) with scores and classes.

    Raises
    ------
    ValueError
        An unknown method, or ``params`` the chosen method does not take (the message
        names the method, also the one ``"auto"`` chose, and the parameters it accepts).
    """
    found = _segment(prediction, method, params)
    return found.to_instances() if isinstance(found, CroppedInstances) else found


def segment_cropped(
    prediction: Prediction, method: str = "auto", **params: object
) -> CroppedInstances:
    """:func:`segment` with each instance kept as a crop in its box.

    The same instances, scores, classes, seeds and taus as :func:`segment`, mask for mask,
    without the (N, H, W) allocation of :class:`~napari_instseg.core.types.Instances`: on a
    large image (4160 x 5568, about 950 worms: 21 GB of masks, mostly never written) a
    caller that reads each worm in its box (clicks picking the segment under them, a label
    image, areas) does not pay for the whole image per worm. ``crops[k]`` may be larger
    than mask ``k``'s bounding box.

    Parameters
    ----------
    prediction : Prediction
        Network outputs for one image.
    method : {"auto", "seeds", "boundary", "hybrid"}
        As for :func:`segment`.
    **params
        As for :func:`segment`.

    Returns
    -------
    CroppedInstances
        The instances of :func:`segment`;
        :meth:`~napari_instseg.core.types.CroppedInstances.to_instances` gives its result.
    """
    found = _segment(prediction, method, params)
    if isinstance(found, CroppedInstances):
        return found
    return CroppedInstances.from_instances(found)


#: the automatic segmentation methods by name
_METHOD_FUNCS = {"seeds": segment_seeds, "boundary": segment_boundary, "hybrid": segment_hybrid}


def _resolve_method(
    prediction: Prediction, method: str, params: dict[str, object]
) -> tuple[str, dict[str, object]]:
    """The method ``"auto"`` stands for, and the model's tuned parameters under ``params``."""
    metadata = getattr(prediction, "metadata", None) or {}
    chosen = ""
    if method == "auto":
        method = str(metadata.get("recommended_method") or "hybrid")
        chosen = " (what method='auto' chose for this model)"
    if method not in _METHOD_FUNCS:
        raise ValueError(f"unknown method {method!r}; choose one of auto, {', '.join(METHODS)}")
    accepted = [*inspect.signature(_METHOD_FUNCS[method]).parameters][1:]  # after prediction
    accepted += ["blob_filter", "edge_thresholds", "edge_solidity"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"method {method!r}{chosen} does not take {', '.join(unknown)}; it accepts "
            f"{', '.join(accepted)}"
        )
    tuned = dict((metadata.get("segment_params") or {}).get(method, {}))
    return method, {**tuned, **params}


def segment_settings(
    prediction: Prediction, method: str = "auto", **params: object
) -> tuple[str, dict[str, object]]:
    """The method and every parameter :func:`segment` uses with these arguments.

    For provenance (an export records them): ``"auto"`` resolved to the model's
    recommended method; the method's defaults, overridden by the parameters tuned for the
    model, overridden by ``params``; ``blob_filter``, ``edge_thresholds`` and
    ``edge_solidity`` included (``edge_thresholds`` None when no outline refinement is
    made: a tuned one is skipped for a prediction without the image contrast).

    Parameters
    ----------
    prediction : Prediction
        As for :func:`segment` (only its metadata and ``contrast`` are read).
    method : str
        As for :func:`segment`.
    **params
        As for :func:`segment`.

    Returns
    -------
    (str, dict)
        The method run and its parameters.

    Raises
    ------
    ValueError
        For an unknown method or a parameter the method does not take, as :func:`segment`.
    """
    method, merged = _resolve_method(prediction, method, params)
    used: dict[str, object] = {
        name: p.default
        for name, p in list(inspect.signature(_METHOD_FUNCS[method]).parameters.items())[1:]
        if p.default is not inspect.Parameter.empty
    }
    used.update(blob_filter=None, edge_thresholds=None, edge_solidity=DEFAULT_SOLIDITY_RANGE)
    used.update(merged)
    if getattr(prediction, "contrast", None) is None and "edge_thresholds" not in params:
        used["edge_thresholds"] = None  # a tuned refinement needs the image: none is made
    return method, used


def _segment(
    prediction: Prediction, method: str, params: dict[str, object]
) -> Instances | CroppedInstances:
    """:func:`segment` before the (N, H, W) masks: the boundary pipeline's crops as they are."""
    funcs = _METHOD_FUNCS
    metadata = getattr(prediction, "metadata", None) or {}
    scale = float(metadata.get("scale") or 1.0)
    method, merged = _resolve_method(prediction, method, params)
    edge_thresholds = merged.pop("edge_thresholds", None)
    edge_solidity = merged.pop("edge_solidity", DEFAULT_SOLIDITY_RANGE)
    blob_filter = merged.pop("blob_filter", None)
    if scale != 1.0:
        # segmented in the model's pixels; the outline is then decided on the image's own
        # pixels (below), where the annotation convention the thresholds follow lives
        on_model_grid = at_model_scale(prediction)
        found = segment(
            on_model_grid, method, **merged, blob_filter=blob_filter, edge_thresholds=None
        )
        found = resize_instances(found, prediction.shape)
        blob_filter = None
    elif method == "boundary":
        # each instance stays in its box until the end: one (N, H, W) allocation, made last
        _check_prediction(prediction)
        found = _segment_boundary_cropped(prediction, **merged)  # type: ignore[arg-type]
    else:
        found = funcs[method](prediction, **merged)  # type: ignore[arg-type]
    if blob_filter is not None:
        try:
            max_elongation, min_solidity = (float(v) for v in blob_filter)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ValueError(
                f"blob_filter must be (max_elongation, min_solidity) or None, got {blob_filter!r}"
            ) from None
        if isinstance(found, CroppedInstances):
            _check_blob_limits(max_elongation, min_solidity)
            found = _drop_blobs_cropped(found, max_elongation, min_solidity)
        else:
            found = drop_blobs(found, max_elongation, min_solidity)
    contrast = getattr(prediction, "contrast", None)
    if edge_thresholds is not None and contrast is None and "edge_thresholds" in params:
        raise ValueError(
            "edge_thresholds needs the image contrast (prediction.contrast), which "
            "predict() fills in; this prediction has none"
        )
    # the model's tuned refinement is skipped where the image is unknown
    if edge_thresholds is not None and contrast is not None:
        if isinstance(found, CroppedInstances):
            found = _refine_edges_cropped(
                found, contrast, edge_thresholds, solidity_range=edge_solidity
            )
        else:
            found = refine_edges(found, contrast, edge_thresholds, solidity_range=edge_solidity)
    return found
