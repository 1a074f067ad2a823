"""Untangle worms that one segment holds, by the shape of the segment's skeleton.

When the boundary map has a gap where two worms cross or touch end-on, the boundary
pipeline returns one segment for both, and when the two worms' embeddings are alike the
embedding split (:func:`napari_instseg.core.instances.split_merged`) cannot part them
either. The segment's skeleton still shows what happened: a crossing is a junction with
four arms, a worm touching another one's side is a junction with three. This module reads
that graph and pairs the arms that continue each other (the most nearly opposite
directions), as a worm does not bend sharply where it meets another one.

:func:`untangle_segment` cuts the simple case: one junction (after short spurs are pruned
and junction pixels a worm width apart are merged) with three or four long arms.
:func:`untangle_clump` reads a clump with several such crossings as a graph and traces each
worm through them along the paired arms. Anything else (a crossing of five or more arms, a
loop) is left whole. Where two worms cross, both parts keep the crossing, so the masks
overlap there.

Where the boundary map cut the fourth arm of a crossing off as a segment of its own, the
rest is a three-armed junction that read alone pairs the wrong arms; :func:`join_cut_arms`
reads it together with the neighbour whose skeleton ends at the junction, as four arms.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from itertools import combinations

import numpy as np
from scipy import ndimage
from skimage.draw import line
from skimage.morphology import skeletonize

from .types import CroppedInstances, Instances

PINHOLE_AREA_WIDTHS2 = 2.0
"""Holes of a segment up to this many squared worm widths are filled before it is skeletonized."""

__all__ = [
    "cut_at_kink",
    "cut_end_to_end",
    "join_cut_arms",
    "untangle",
    "untangle_clump",
    "untangle_segment",
]

_EIGHT = np.ones((3, 3), bool)


def _crop(mask: np.ndarray) -> np.ndarray:
    """The mask cut to its bounding box (empty masks stay as they are)."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return mask
    return mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def _skeleton_parts(skeleton: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Junction pixels (>= 3 skeleton neighbours) and the branches between them, labelled."""
    neighbours = ndimage.convolve(skeleton.astype(np.int32), _EIGHT.astype(np.int32))
    neighbours = np.where(skeleton, neighbours - 1, 0)
    junction = skeleton & (neighbours >= 3)
    junction_labels, n_junctions = ndimage.label(junction, _EIGHT)
    branch_labels, n_branches = ndimage.label(skeleton & ~junction, _EIGHT)
    return junction_labels, branch_labels, n_junctions, n_branches


def _touching_junctions(branch: np.ndarray, junction_labels: np.ndarray) -> set[int]:
    ring = ndimage.binary_dilation(branch, _EIGHT)
    return set(np.unique(junction_labels[ring]).tolist()) - {0}


@dataclass
class _JunctionGraph:
    """A pruned skeleton as a graph: junction pixel clusters and the branches between them.

    ``group`` maps each junction label to its crossing (junction pixels joined by a branch
    shorter than two worm widths are one crossing); ``links`` are those short branches;
    ``touches`` maps every branch label to the junction labels it touches.
    """

    junction_labels: np.ndarray
    branch_labels: np.ndarray
    group: dict[int, int]
    touches: dict[int, set[int]]
    links: list[int]


def _junction_graph(skeleton: np.ndarray, width: float) -> _JunctionGraph | None:
    """The junction graph of a skeleton, or None when it has no junction."""
    junction_labels, branch_labels, n_junctions, n_branches = _skeleton_parts(skeleton)
    if n_junctions == 0:
        return None
    lengths = np.bincount(branch_labels.ravel(), minlength=n_branches + 1)
    parent = list(range(n_junctions + 1))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    touches = {
        b: _touching_junctions(branch_labels == b, junction_labels)
        for b in range(1, n_branches + 1)
    }
    links = []
    for b, js in touches.items():
        if len(js) == 2 and lengths[b] < 2 * width:
            a, c = sorted(js)
            parent[find(c)] = find(a)
            links.append(b)
    group = {j: find(j) for j in range(1, n_junctions + 1)}
    return _JunctionGraph(junction_labels, branch_labels, group, touches, links)


def _prune_spurs(skeleton: np.ndarray, prune_length: float, rounds: int = 4) -> np.ndarray:
    """Remove free-ended branches shorter than ``prune_length`` that hang off a junction."""
    skeleton = skeleton.copy()
    for _ in range(rounds):
        junction_labels, branch_labels, n_junctions, n_branches = _skeleton_parts(skeleton)
        if n_junctions == 0:
            break
        lengths = np.bincount(branch_labels.ravel(), minlength=n_branches + 1)
        removed = False
        for b in range(1, n_branches + 1):
            if lengths[b] >= prune_length:
                continue
            branch = branch_labels == b
            if len(_touching_junctions(branch, junction_labels)) == 1:
                skeleton &= ~branch
                removed = True
        if not removed:
            break
        skeleton = skeletonize(skeleton)
    return skeleton


def _arm_direction(coords: np.ndarray, centre: np.ndarray, near: float, far: float) -> np.ndarray:
    """Unit vector from ``centre`` along an arm, from its pixels ``near``..``far`` away."""
    offsets = coords - centre
    dist = np.hypot(offsets[:, 0], offsets[:, 1])
    keep = (dist >= near) & (dist <= far)
    if not keep.any():  # a short arm: use all of it
        keep = np.ones(len(dist), bool)
    vector = offsets[keep].mean(axis=0)
    norm = float(np.hypot(*vector))
    return vector / norm if norm > 0 else vector


def _pair_arms(directions: list[np.ndarray]) -> list[tuple[int, ...]]:
    """Group arm indices into worms: the most nearly opposite arms go together."""
    n = len(directions)
    if n == 3:
        best = min(combinations(range(3), 2), key=lambda p: directions[p[0]] @ directions[p[1]])
        (rest,) = set(range(3)) - set(best)
        return [best, (rest,)]
    pairings = [((0, 1), (2, 3)), ((0, 2), (1, 3)), ((0, 3), (1, 2))]
    best = min(pairings, key=lambda ps: sum(directions[a] @ directions[b] for a, b in ps))
    return list(best)


@dataclass
class _Skeleton:
    """A segment cropped to its box (r0, r1, c0, c1), its pruned skeleton and the worm width."""

    box: tuple[int, int, int, int]
    crop: np.ndarray
    skeleton: np.ndarray
    width: float

    @cached_property
    def path(self) -> np.ndarray | None:
        """The skeleton's pixels end to end (:func:`_path_order`), walked once per segment."""
        return _path_order(self.skeleton)


def _cropped_skeleton(mask: np.ndarray, prune_length: float | None = None) -> _Skeleton | None:
    """Crop a segment to its box and skeletonize it; None for an empty mask.

    Returns the bounding box (r0, r1, c0, c1) with a 2-px margin, the cropped mask, its
    skeleton with spurs shorter than ``prune_length`` (default 1.5 widths) pruned, and the
    worm width (area / skeleton length).
    """
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D, got shape {mask.shape}")
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    r0, r1 = max(rows.min() - 2, 0), min(rows.max() + 3, mask.shape[0])
    c0, c1 = max(cols.min() - 2, 0), min(cols.max() + 3, mask.shape[1])
    crop = mask[r0:r1, c0:c1]
    skeleton = skeletonize(crop)
    width = crop.sum() / max(int(skeleton.sum()), 1)
    # a pinhole of background where worms meet rings the skeleton into a small loop: fill
    # holes of up to PINHOLE_AREA_WIDTHS2 squared widths (a ring of worms encloses far more)
    holes, n_holes = ndimage.label(ndimage.binary_fill_holes(crop) & ~crop)
    if n_holes:
        hole_areas = np.bincount(holes.ravel())[1:]
        small = np.flatnonzero(hole_areas <= PINHOLE_AREA_WIDTHS2 * width**2) + 1
        if small.size:
            skeleton = skeletonize(crop | np.isin(holes, small))
    skeleton = _prune_spurs(skeleton, 1.5 * width if prune_length is None else prune_length)
    return _Skeleton((r0, r1, c0, c1), crop, skeleton, width)


def _path_order(skeleton: np.ndarray) -> np.ndarray | None:
    """The pixels of an unbranched skeleton from one end to the other, or None."""
    neighbours = ndimage.convolve(skeleton.astype(np.int32), _EIGHT.astype(np.int32)) - 1
    ends = np.argwhere(skeleton & (neighbours == 1))
    if len(ends) != 2 or (skeleton & (neighbours >= 3)).any():
        return None
    remaining = skeleton.copy()
    path = [tuple(ends[0])]
    remaining[path[0]] = False
    while True:
        r, c = path[-1]
        top, left = max(r - 1, 0), max(c - 1, 0)
        candidates = np.argwhere(remaining[top : r + 2, left : c + 2]) + (top, left)
        if len(candidates) == 0:
            break
        # prefer 4-neighbours, so the walk does not skip a pixel of a staircase
        steps = np.abs(candidates - (r, c)).sum(axis=1)
        point = tuple(int(v) for v in candidates[np.argmin(steps)])
        remaining[point] = False
        path.append(point)
    if remaining.any():
        return None
    return np.asarray(path)


def cut_end_to_end(
    mask: np.ndarray,
    typical_length: float,
    length_factor: float = 1.7,
    max_waist: float = 0.7,
    boundary: np.ndarray | None = None,
    min_boundary_rise: float = 0.2,
    shared: np.ndarray | None = None,
) -> list[np.ndarray] | None:
    """Cut a segment whose unbranched skeleton is much longer than a worm at its waist.

    Two worms that touch end to end make one long, unbranched segment. When the skeleton
    is longer than ``length_factor * typical_length``, it is cut within the middle 40 % of
    its length where the boundary map along it peaks at least ``min_boundary_rise`` above
    its median there (where the worms meet), or else where it narrows to at most
    ``max_waist`` times its median half-width (where two tails meet; a worm's middle is its
    thickest part). Every pixel goes to the half of the skeleton nearest to it.

    Parameters
    ----------
    mask : numpy.ndarray
        (H, W) bool segment.
    typical_length : float
        Skeleton length (pixels) of a typical worm in the image.
    length_factor : float
        How much longer than that the skeleton must be.
    max_waist : float
        The narrowest point must have at most this fraction of the median half-width.
    boundary : numpy.ndarray, optional
        (H, W) boundary probability of the image.
    min_boundary_rise : float
        How far the boundary peak must rise above the median along the skeleton.
    shared : numpy.ndarray, optional
        (H, W) bool, the pixels the segment shares with other instances (a crossing an
        earlier reading gave to both worms): never cut within half a worm width of them,
        where the boundary peaks and the body narrows although the worm goes on.

    Returns
    -------
    list of numpy.ndarray or None
        Two (H, W) bool masks, or None when the skeleton branches, is not long enough or
        has no waist (away from ``shared``).
    """
    return _cut_end_to_end(
        mask,
        _cropped_skeleton(mask),
        typical_length,
        length_factor,
        max_waist,
        boundary,
        min_boundary_rise,
        shared,
    )


def _cut_end_to_end(
    mask: np.ndarray,
    found: _Skeleton | None,
    typical_length: float,
    length_factor: float,
    max_waist: float = 0.7,
    boundary: np.ndarray | None = None,
    min_boundary_rise: float = 0.2,
    shared: np.ndarray | None = None,
) -> list[np.ndarray] | None:
    """cut_end_to_end on a precomputed :func:`_cropped_skeleton` result."""
    if found is None:
        return None
    (r0, r1, c0, c1), crop = found.box, found.crop
    mask = np.asarray(mask, bool)
    path = found.path
    if path is None or len(path) < length_factor * typical_length:
        return None
    depth = ndimage.distance_transform_edt(crop)[path[:, 0], path[:, 1]]
    lo, hi = int(0.3 * len(path)), int(0.7 * len(path))
    allowed = _off_crossings(found, shared)[lo:hi]
    if not allowed.any():
        return None
    cut = None
    if boundary is not None:
        along = np.asarray(boundary)[r0:r1, c0:c1][path[:, 0], path[:, 1]]
        peak = lo + int(np.argmax(np.where(allowed, along[lo:hi], -np.inf)))
        if along[peak] - np.median(along) >= min_boundary_rise:
            cut = peak
    if cut is None:
        cut = lo + int(np.argmin(np.where(allowed, depth[lo:hi], np.inf)))
        if depth[cut] > max_waist * np.median(depth):
            return None
    return _cut_path(mask.shape, (r0, r1, c0, c1), crop, path, cut)


def _off_crossings(found: _Skeleton, shared: np.ndarray | None) -> np.ndarray:
    """Per pixel of ``found.path``: True where a cut may go, away from a crossing.

    ``shared`` (H, W) marks the pixels the segment shares with other instances: the
    crossings an earlier reading bridged, where the boundary map peaks and the body narrows
    or bends although the worm goes on. Path pixels within half a worm width of them are
    not cut points.
    """
    path = found.path
    allowed = np.ones(len(path), bool)
    if shared is None:
        return allowed
    r0, r1, c0, c1 = found.box
    near = np.asarray(shared, bool)[r0:r1, c0:c1]
    if near.any():
        near = ndimage.distance_transform_edt(~near) <= found.width / 2 + 1
        allowed = ~near[path[:, 0], path[:, 1]]
    return allowed


def _cut_path(
    shape: tuple[int, ...],
    box: tuple[int, int, int, int],
    crop: np.ndarray,
    path: np.ndarray,
    cut: int,
) -> list[np.ndarray]:
    """Two full-size masks: every pixel of ``crop`` goes to the half of ``path`` nearest it."""
    r0, r1, c0, c1 = box
    halves = np.zeros(crop.shape, np.int32)
    halves[path[:cut, 0], path[:cut, 1]] = 1
    halves[path[cut:, 0], path[cut:, 1]] = 2
    _, (near_r, near_c) = ndimage.distance_transform_edt(halves == 0, return_indices=True)
    nearest = halves[near_r, near_c]
    parts = []
    for half in (1, 2):
        full = np.zeros(shape, bool)
        full[r0:r1, c0:c1] = crop & (nearest == half)
        parts.append(full)
    return parts


def cut_at_kink(
    mask: np.ndarray,
    min_kink_cos: float = 0.3,
    arm_widths: float = 2.0,
    shared: np.ndarray | None = None,
) -> list[np.ndarray] | None:
    """Cut a segment whose unbranched skeleton folds back sharply: two worms meeting at an angle.

    Two worms that touch end to end at an angle make one unbranched segment with a kink
    (a Λ or a V) that a single worm's body, which bends smoothly, does not make. At each
    skeleton pixel in the middle half of the skeleton, the two directions to the pixels
    ``arm_widths`` worm widths away along it are compared; the segment is cut where they
    are most nearly parallel, if the cosine of the angle between them is at least
    ``min_kink_cos`` (0.3: an angle of at most ~73 deg). Every pixel goes to the half of
    the skeleton nearest to it.

    Parameters
    ----------
    mask : numpy.ndarray
        (H, W) bool segment.
    min_kink_cos : float
        The fold must be at least this sharp (cosine of the angle between its two arms).
    arm_widths : float
        Length of the arms the angle is measured on, in worm widths.
    shared : numpy.ndarray, optional
        See :func:`cut_end_to_end`: no cut within half a worm width of these pixels.

    Returns
    -------
    list of numpy.ndarray or None
        Two (H, W) bool masks, or None when the skeleton branches or has no sharp kink
        (away from ``shared``).
    """
    return _cut_at_kink(mask, _cropped_skeleton(mask), min_kink_cos, arm_widths, shared)


def _cut_at_kink(
    mask: np.ndarray,
    found: _Skeleton | None,
    min_kink_cos: float = 0.3,
    arm_widths: float = 2.0,
    shared: np.ndarray | None = None,
) -> list[np.ndarray] | None:
    """cut_at_kink on a precomputed :func:`_cropped_skeleton` result."""
    if found is None:
        return None
    box, crop, width = found.box, found.crop, found.width
    path = found.path
    if path is None:
        return None
    step = max(int(round(arm_widths * width)), 2)
    lo = max(int(0.25 * len(path)), step)
    hi = min(int(0.75 * len(path)), len(path) - step)
    if hi <= lo:
        return None
    centre = path[lo:hi].astype(np.float64)
    back = path[lo - step : hi - step] - centre
    ahead = path[lo + step : hi + step] - centre
    cosines = (back * ahead).sum(axis=1) / (np.hypot(*back.T) * np.hypot(*ahead.T) + 1e-9)
    cosines = np.where(_off_crossings(found, shared)[lo:hi], cosines, -np.inf)
    sharpest = int(np.argmax(cosines))
    if cosines[sharpest] < min_kink_cos:
        return None
    return _cut_path(np.shape(mask), box, crop, path, lo + sharpest)


def untangle_segment(
    mask: np.ndarray,
    prune_length: float | None = None,
    max_bend_cos: float = -0.3,
) -> list[np.ndarray] | None:
    """Cut one segment into the worms its skeleton shows, or None when it is not simple.

    Parameters
    ----------
    mask : numpy.ndarray
        (H, W) bool segment.
    prune_length : float, optional
        Free-ended skeleton branches shorter than this are spurs of the outline and pruned;
        default 1.5 worm widths (width = area / skeleton length).
    max_bend_cos : float
        Two arms count as one worm only if the cosine of the angle between their outward
        directions is at most this (-1 = straight through; -0.3: bent by at most ~73 deg).

    Returns
    -------
    list of numpy.ndarray or None
        Two (H, W) bool masks (three or four arms paired into two worms); None when the
        skeleton has no single junction with three or four long arms, or the arms do not
        pair into straight-enough worms. The masks overlap around a four-armed crossing.
    """
    return _untangle_segment(mask, _cropped_skeleton(mask, prune_length), max_bend_cos)


def _untangle_segment(
    mask: np.ndarray, found: _Skeleton | None, max_bend_cos: float
) -> list[np.ndarray] | None:
    """untangle_segment on a precomputed :func:`_cropped_skeleton` result."""
    if found is None:
        return None
    (r0, r1, c0, c1), crop, width = found.box, found.crop, found.width
    mask = np.asarray(mask, bool)
    star = _one_junction(found)
    if star is None:
        return None
    centre, arm_coords = star
    directions = [_arm_direction(c, centre, width, width + 3 * width) for c in arm_coords]
    worms = _pair_arms(directions)
    for worm in worms:
        if len(worm) == 2 and directions[worm[0]] @ directions[worm[1]] > max_bend_cos:
            return None
    bridges = [
        [tuple(_end_near(arm_coords[a], centre) for a in worm)] if len(worm) == 2 else []
        for worm in worms
    ]
    return _worm_masks(mask.shape, (r0, r1, c0, c1), crop, arm_coords, worms, bridges, width)


def _one_junction(found: _Skeleton) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """Junction centre and arms' pixels (crop coordinates) of a one-junction skeleton.

    None unless the skeleton has one junction and three or four free-ended arms.
    """
    graph = _junction_graph(found.skeleton, found.width)
    if graph is None or len(set(graph.group.values())) != 1:
        return None
    touches, links, branch_labels = graph.touches, graph.links, graph.branch_labels
    arms = [b for b in touches if b not in links]
    if any(len(touches[b]) != 1 for b in arms) or len(arms) not in (3, 4):
        return None
    junction = (graph.junction_labels > 0) | np.isin(branch_labels, links)
    centre = np.argwhere(junction).mean(axis=0)
    return centre, [np.argwhere(branch_labels == b) for b in arms]


def _end_near(coords: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """The pixel of an arm nearest to a junction centre."""
    return coords[np.argmin(np.hypot(*(coords - centre).T))]


def _worm_masks(
    shape: tuple[int, ...],
    box: tuple[int, int, int, int],
    crop: np.ndarray,
    arm_coords: list[np.ndarray],
    worms: list[tuple[int, ...]],
    bridges: list[list[tuple[np.ndarray, np.ndarray]]],
    width: float,
) -> list[np.ndarray]:
    """Full-size masks of the worms made of the given arms.

    Every pixel of ``crop`` goes to the worm of its nearest arm; a worm also gets the pixels
    near the straight lines (``bridges``) that join its arms across a junction, so both
    worms of a crossing keep the crossing. Each mask is opened and cut to its largest piece.
    """
    arm_image = np.zeros(crop.shape, np.int32)
    for index, coords in enumerate(arm_coords, start=1):
        arm_image[coords[:, 0], coords[:, 1]] = index
    _, (near_r, near_c) = ndimage.distance_transform_edt(arm_image == 0, return_indices=True)
    nearest = arm_image[near_r, near_c] - 1
    r0, r1, c0, c1 = box
    parts = []
    for worm, joins in zip(worms, bridges, strict=True):
        part = crop & np.isin(nearest, worm)
        if joins:
            bridge = np.zeros(crop.shape, bool)
            for a, b in joins:
                bridge[line(*a, *b)] = True
            part |= crop & (ndimage.distance_transform_edt(~bridge) <= width / 2 + 1.5)
        part = ndimage.binary_opening(part, _EIGHT) & crop
        labels, n = ndimage.label(part, _EIGHT)
        if n > 1:  # keep the largest piece
            part = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
        full = np.zeros(shape, bool)
        full[r0:r1, c0:c1] = part
        parts.append(full)
    return parts


def untangle_clump(
    mask: np.ndarray,
    prune_length: float | None = None,
    max_bend_cos: float = -0.3,
    max_worms: int = 6,
) -> list[np.ndarray] | None:
    """Cut a clump of worms whose skeleton has several crossings into its worms.

    The skeleton is read as a graph: crossings (junction pixels a worm width apart merged)
    with three or four branches, and the branches between them or ending freely. At each
    crossing the most nearly opposite branches are paired as in :func:`untangle_segment`
    (a third, unpaired one is a worm that ends against the side of another); a worm is
    then traced from a branch end through the crossings along the pairs until it ends.

    Parameters
    ----------
    mask : numpy.ndarray
        (H, W) bool segment.
    prune_length : float, optional
        See :func:`untangle_segment`.
    max_bend_cos : float
        See :func:`untangle_segment`.
    max_worms : int
        Clumps that would give more worms than this are left whole.

    Returns
    -------
    list of numpy.ndarray or None
        The worms' (H, W) bool masks (overlapping at crossings); None when the skeleton has
        fewer than two crossings, a crossing with more than four branches, a loop, a pair
        bent beyond ``max_bend_cos``, or branches no worm runs along.
    """
    return _untangle_clump(mask, _cropped_skeleton(mask, prune_length), max_bend_cos, max_worms)


def _untangle_clump(
    mask: np.ndarray, found: _Skeleton | None, max_bend_cos: float, max_worms: int = 6
) -> list[np.ndarray] | None:
    """untangle_clump on a precomputed :func:`_cropped_skeleton` result."""
    if found is None:
        return None
    (r0, r1, c0, c1), crop, skeleton, width = found.box, found.crop, found.skeleton, found.width
    graph = _junction_graph(skeleton, width)
    if graph is None:
        return None
    crossings = sorted(set(graph.group.values()))
    if len(crossings) < 2:
        return None
    arms = [b for b in graph.touches if b not in graph.links]
    # the crossings at either end of each arm (one entry for an arm with a free end)
    ends = {b: sorted({graph.group[j] for j in graph.touches[b]}) for b in arms}
    neighbours = ndimage.convolve(skeleton.astype(np.int32), _EIGHT.astype(np.int32)) - 1
    free_end = skeleton & (neighbours == 1)
    for b in arms:  # an arm with both ends at one crossing is a loop
        if len(ends[b]) == 1 and not free_end[graph.branch_labels == b].any():
            return None
    arm_coords = [np.argwhere(graph.branch_labels == b) for b in arms]
    partner: dict[tuple[int, int], int] = {}  # (crossing, arm index) -> paired arm index
    centres: dict[int, np.ndarray] = {}
    for g in crossings:
        members = [j for j, k in graph.group.items() if k == g]
        own_links = [b for b in graph.links if graph.group[min(graph.touches[b])] == g]
        centres[g] = np.argwhere(
            np.isin(graph.junction_labels, members) | np.isin(graph.branch_labels, own_links)
        ).mean(axis=0)
        incident = [i for i, b in enumerate(arms) if g in ends[b]]
        if len(incident) == 2:
            pairs = [tuple(incident)]
        elif len(incident) in (3, 4):
            directions = [
                _arm_direction(arm_coords[i], centres[g], width, 4 * width) for i in incident
            ]
            pairs = []
            for group in _pair_arms(directions):
                if len(group) == 2:
                    if directions[group[0]] @ directions[group[1]] > max_bend_cos:
                        return None
                    pairs.append((incident[group[0]], incident[group[1]]))
        else:
            return None
        for a, b in pairs:
            partner[(g, a)], partner[(g, b)] = b, a
    # trace worms from every arm end that goes nowhere: a free end or an unpaired arm
    worms: list[tuple[int, ...]] = []
    bridges: list[list[tuple[np.ndarray, np.ndarray]]] = []
    owner: dict[int, int] = {}
    starts = [(i, None) for i, b in enumerate(arms) if len(ends[b]) <= 1]
    starts += [(i, g) for i, b in enumerate(arms) for g in ends[b] if (g, i) not in partner]
    for i, came_from in starts:
        if i in owner:
            continue
        worm, joins = [i], []
        while True:
            b = arms[i]
            onward = [g for g in ends[b] if g != came_from] if len(ends[b]) == 2 else []
            if came_from is None and len(ends[b]) == 1:
                onward = ends[b]
            if not onward or (onward[0], i) not in partner:
                break
            g = onward[0]
            j = partner[(g, i)]
            if j in worm or j in owner:
                return None  # a loop, or two worms along one branch
            joins.append(
                (_end_near(arm_coords[i], centres[g]), _end_near(arm_coords[j], centres[g]))
            )
            worm.append(j)
            i, came_from = j, g
        for k in worm:
            owner[k] = len(worms)
        worms.append(tuple(worm))
        bridges.append(joins)
    if len(owner) != len(arms) or not 2 <= len(worms) <= max_worms:
        return None
    return _worm_masks(np.shape(mask), (r0, r1, c0, c1), crop, arm_coords, worms, bridges, width)


def join_cut_arms(
    instances: Instances,
    max_bend_cos: float = -0.3,
    reach_widths: float = 2.5,
    min_area: float = 0.0,
    min_part_area: float = 0.0,
) -> Instances:
    """Re-read crossings whose fourth arm the boundary map cut off as a segment of its own.

    Where two worms cross, the boundary map sometimes cuts one arm of the crossing off: one
    segment then holds three arms around a junction (read alone, the two most nearly
    opposite arms are one worm and the third is another, which is wrong when the cut-off
    arm continues the third one), and the cut-off arm is a separate segment whose skeleton
    ends at the junction. A segment whose pruned skeleton has one junction with three
    free-ended arms (:func:`untangle_segment`'s reading) is read together with the one
    other segment that touches it and whose unbranched skeleton has a free end within
    ``reach_widths`` worm widths of the junction centre: that segment is the fourth arm,
    its outward direction measured like the others', and the four arms are paired as at a
    crossing. When both pairs are straight enough (``max_bend_cos``), the two segments are
    replaced by the two worms: the segment's two arms paired together, and the neighbour
    with the arm it continues; both are bridged through the junction, so both keep the
    crossing. A segment with no such neighbour, or more than one, is left to
    :func:`untangle`'s readings.

    Parameters
    ----------
    instances : Instances
        Segments, e.g. from the boundary pipeline.
    max_bend_cos : float
        See :func:`untangle_segment`; both pairs of arms must be at least this straight.
    reach_widths : float
        How near to the junction centre (in worm widths of the three-armed segment) the
        neighbour's skeleton must end.
    min_area : float
        Only segments of at least this many pixels are read as three-armed.
    min_part_area : float
        Both worms need at least this many pixels, or the two segments stay as they are.

    Returns
    -------
    Instances
        The same instances, each re-read pair replaced in place by its two worms: the
        three-armed segment's index gets the worm of its two paired arms (its score, class
        and tau; its seed, or the worm's most interior pixel outside the crossing when the
        seed is not in it), the neighbour's index gets the worm it continues (its own
        score, class, seed and tau). The two masks overlap at the crossing.
    """
    if len(instances) < 2:
        return instances
    cropped = CroppedInstances.from_instances(instances)
    joined = _join_cut_arms(cropped, max_bend_cos, reach_widths, min_area, min_part_area)
    return instances if joined is cropped else joined.to_instances()


def _in_image(found: _Skeleton | None, origin: tuple[int, int]) -> _Skeleton | None:
    """A skeleton of a window whose corner is ``origin``, its box moved to image coordinates."""
    if found is None:
        return None
    r0, r1, c0, c1 = found.box
    box = (r0 + origin[0], r1 + origin[0], c0 + origin[1], c1 + origin[1])
    return _Skeleton(box, found.crop, found.skeleton, found.width)


def _join_cut_arms(
    instances: CroppedInstances,
    max_bend_cos: float = -0.3,
    reach_widths: float = 2.5,
    min_area: float = 0.0,
    min_part_area: float = 0.0,
) -> CroppedInstances:
    """:func:`join_cut_arms` on cropped masks (the input itself when nothing is re-read)."""
    n = len(instances)
    if n < 2:
        return instances
    shape = instances.shape
    areas = instances.areas
    skeletons: dict[int, _Skeleton | None] = {}

    def skeleton_of(k: int) -> _Skeleton | None:
        if k not in skeletons:
            (r0, _, c0, _), window = instances.window(k, 2)
            skeletons[k] = _in_image(_cropped_skeleton(window), (r0, c0))
        return skeletons[k]

    boxes, crops = list(instances.boxes), list(instances.crops)
    seeds = None if instances.seeds is None else np.array(instances.seeds, copy=True)
    used: set[int] = set()
    for i in range(n):
        if i in used or areas[i] < min_area:
            continue
        found = skeleton_of(i)
        star = _one_junction(found) if found is not None else None
        if star is None or len(star[1]) != 3:
            continue
        offset = np.array([found.box[0], found.box[2]])
        centre = star[0] + offset
        arms = [c + offset for c in star[1]]
        fourth = _fourth_arm(instances, i, centre, reach_widths * found.width, used, skeleton_of)
        if fourth is None:
            continue
        j, end, path = fourth
        width = found.width
        directions = [_arm_direction(c, centre, width, 4 * width) for c in [*arms, path]]
        pairs = _pair_arms(directions)
        if any(directions[a] @ directions[b] > max_bend_cos for a, b in pairs):
            continue
        own, joined = (pairs[0], pairs[1]) if 3 in pairs[1] else (pairs[1], pairs[0])
        partner = joined[0] if joined[1] == 3 else joined[1]
        # one crop around both segments, the neighbour's skeleton as the fourth arm
        (a0, a1, b0, b1), _ = instances.window(i, 0)
        (d0, d1, e0, e1), _ = instances.window(j, 0)
        box = (
            max(min(a0, d0) - 2, 0),
            min(max(a1, d1) + 2, shape[0]),
            max(min(b0, e0) - 2, 0),
            min(max(b1, e1) + 2, shape[1]),
        )
        mask_i, mask_j = instances.region(i, box), instances.region(j, box)
        both = mask_i | mask_j
        corner = np.array([box[0], box[2]])
        coords = [c - corner for c in [*arms, path]]
        middle = centre - corner
        bridges = [
            [(_end_near(coords[own[0]], middle), _end_near(coords[own[1]], middle))],
            [(_end_near(coords[partner], middle), end - corner)],
        ]
        worm, other = _worm_masks(
            both.shape, (0, both.shape[0], 0, both.shape[1]), both, coords, [own, joined],
            bridges, width,
        )  # fmt: skip
        worm &= mask_i
        other |= mask_j
        if min(worm.sum(), other.sum()) < max(min_part_area, 1):
            continue
        boxes[i] = boxes[j] = box
        crops[i], crops[j] = worm, other
        used.update((i, j))
        seed = None if seeds is None else seeds[i] - corner
        if seed is not None and not (
            0 <= seed[0] < worm.shape[0]
            and 0 <= seed[1] < worm.shape[1]
            and worm[int(seed[0]), int(seed[1])]
        ):
            alone = worm & ~other
            # the box has a 2-px margin (or the image's edge): the depths are the image's
            depth = ndimage.distance_transform_edt(alone if alone.any() else worm)
            seeds[i] = np.asarray(np.unravel_index(np.argmax(depth), worm.shape)) + corner
    if not used:
        return instances
    return dataclasses.replace(instances, boxes=boxes, crops=crops, seeds=seeds)


def _fourth_arm(
    instances: CroppedInstances,
    i: int,
    centre: np.ndarray,
    reach: float,
    used: set[int],
    skeleton_of: Callable[[int], _Skeleton | None],
) -> tuple[int, np.ndarray, np.ndarray] | None:
    """The one segment that touches segment ``i`` and whose skeleton ends near ``centre``.

    Returns its index, its skeleton's end pixel nearest to ``centre`` and its skeleton's
    pixels (image coordinates), or None when no segment or more than one qualifies.
    Candidates are segments not in ``used`` with an unbranched skeleton (a worm's piece)
    that touch segment ``i`` (within 2 px) within ``reach`` + 2 px of ``centre`` and end
    within ``reach`` of it.
    """
    shape = instances.shape
    pad = int(np.ceil(reach)) + 3
    r, c = (int(round(v)) for v in centre)
    r0, r1, c0, c1 = (
        max(r - pad, 0),
        min(r + pad + 1, shape[0]),
        max(c - pad, 0),
        min(c + pad + 1, shape[1]),
    )
    yy, xx = np.ogrid[r0:r1, c0:c1]
    disc = np.hypot(yy - centre[0], xx - centre[1]) <= reach + 2
    region = (r0, r1, c0, c1)
    ring = ndimage.binary_dilation(instances.region(i, region), _EIGHT, iterations=2) & disc
    found = []
    for j, (b0, b1, b2, b3) in enumerate(instances.boxes):
        if j == i or j in used or b0 >= r1 or b1 <= r0 or b2 >= c1 or b3 <= c0:
            continue
        if not instances.region(j, region)[ring].any():
            continue
        skeleton = skeleton_of(int(j))
        path = skeleton.path if skeleton is not None else None
        if path is None:
            continue
        path = path + np.array([skeleton.box[0], skeleton.box[2]])
        ends = path[[0, -1]]
        dist = np.hypot(*(ends - centre).T)
        if dist.min() <= reach:
            found.append((int(j), ends[int(np.argmin(dist))], path))
    return found[0] if len(found) == 1 else None


def untangle(
    instances: Instances,
    factor: float = 1.3,
    min_part_fraction: float = 0.3,
    max_bend_cos: float = -0.3,
    length_factor: float = 1.4,
    boundary: np.ndarray | None = None,
    clumps: bool = True,
    min_kink_cos: float | None = 0.3,
    rounds: int = 2,
    reprune_widths: float | None = 3.0,
    join_arms: bool = True,
) -> Instances:
    """Cut segments much larger than the typical one where their skeleton shows two worms.

    Parameters
    ----------
    instances : Instances
        Segments, e.g. from the boundary pipeline after the embedding split.
    factor : float
        Segments larger than this times the median segment area are candidates.
    min_part_fraction : float
        Each part needs this fraction of the median segment area, or the segment stays whole.
    max_bend_cos : float
        See :func:`untangle_segment`.
    length_factor : float
        An unbranched candidate whose skeleton is longer than this times the median
        skeleton length is cut at its waist (:func:`cut_end_to_end`); 0 = never.
    boundary : numpy.ndarray, optional
        (H, W) boundary probability; where it peaks along such a skeleton is where it is cut.
    clumps : bool
        Also cut segments whose skeleton has several crossings (:func:`untangle_clump`).
    min_kink_cos : float or None
        Cut unbranched candidates where their skeleton folds back at least this sharply
        (:func:`cut_at_kink`); None = never.
    rounds : int
        How many times all segments are read. The typical segment is measured afresh each
        round: where many worms are merged (clumps of live worms), the first median is
        inflated by the merges, and parts that are still two worms only stand out after
        the first cuts. Stops early when a round cuts nothing.
    reprune_widths : float or None
        When no reading of a candidate's skeleton gives large enough parts, read it once
        more with free-ended spurs shorter than this many worm widths pruned (default
        pruning: 1.5 widths); None = never.
    join_arms : bool
        First re-read crossings whose fourth arm the boundary map cut off as a segment of
        its own (:func:`join_cut_arms`: three-armed segments of at least the median area,
        which hold a worm and an arm of another; both worms at least ``min_part_fraction``
        of the median area).

    Returns
    -------
    Instances
        Each cut segment replaced by its parts (same score, class and tau; the first part
        that holds the segment's seed keeps it, the others get their most interior pixel).
    """
    if len(instances) < 2 or factor <= 0:
        return instances
    cropped = CroppedInstances.from_instances(instances)
    cut = _untangle(
        cropped,
        factor,
        min_part_fraction,
        max_bend_cos,
        length_factor,
        boundary,
        clumps,
        min_kink_cos,
        rounds,
        reprune_widths,
        join_arms,
    )
    return instances if cut is cropped else cut.to_instances()


def _untangle(
    instances: CroppedInstances,
    factor: float = 1.3,
    min_part_fraction: float = 0.3,
    max_bend_cos: float = -0.3,
    length_factor: float = 1.4,
    boundary: np.ndarray | None = None,
    clumps: bool = True,
    min_kink_cos: float | None = 0.3,
    rounds: int = 2,
    reprune_widths: float | None = 3.0,
    join_arms: bool = True,
) -> CroppedInstances:
    """:func:`untangle` on cropped masks (the input itself when nothing is cut).

    Each segment is read in its bounding box with a 2-pixel margin (within the image), the
    window :func:`_cropped_skeleton` cuts it to, so every reading sees what it would see in
    the full image.
    """
    if join_arms and len(instances) >= 2 and factor > 0:
        typical = float(np.median(instances.areas))
        instances = _join_cut_arms(
            instances,
            max_bend_cos,
            min_area=typical,
            min_part_area=min_part_fraction * typical,
        )
    options = (factor, min_part_fraction, max_bend_cos, length_factor, boundary, reprune_widths)
    lengths: list[int | None] = [None] * len(instances)
    for _ in range(rounds):
        cut, lengths = _untangle_round(instances, *options, clumps, min_kink_cos, lengths)
        if cut is instances:
            break
        instances = cut
    return instances


def _read_segment(
    mask: np.ndarray,
    found: _Skeleton | None,
    typical: float,
    typical_length: float,
    min_part_fraction: float,
    max_bend_cos: float,
    length_factor: float,
    boundary: np.ndarray | None,
    clumps: bool,
    min_kink_cos: float | None,
    shared: np.ndarray | None = None,
) -> list[np.ndarray] | None:
    """The first reading of one skeleton whose parts are all large enough, or None.

    Readings in order: one crossing (:func:`untangle_segment`), a clump
    (:func:`untangle_clump`), end to end (:func:`cut_end_to_end`), a kink
    (:func:`cut_at_kink`). A reading whose smallest part is under ``min_part_fraction``
    of the typical area is passed over for the next one. ``shared``: the segment's pixels
    that other instances hold too (crossings), where neither cut goes.
    """
    readers = [lambda: _untangle_segment(mask, found, max_bend_cos)]
    if clumps:
        readers.append(lambda: _untangle_clump(mask, found, max_bend_cos))
    if length_factor > 0:
        readers.append(
            lambda: _cut_end_to_end(
                mask, found, typical_length, length_factor, boundary=boundary, shared=shared
            )
        )
    if min_kink_cos is not None:
        readers.append(lambda: _cut_at_kink(mask, found, min_kink_cos, shared=shared))
    for read in readers:
        parts = read()
        if parts is not None and min(p.sum() for p in parts) >= min_part_fraction * typical:
            return parts
    return None


def _untangle_round(
    instances: CroppedInstances,
    factor: float,
    min_part_fraction: float,
    max_bend_cos: float,
    length_factor: float,
    boundary: np.ndarray | None,
    reprune_widths: float | None,
    clumps: bool,
    min_kink_cos: float | None,
    lengths: list[int | None],
) -> tuple[CroppedInstances, list[int | None]]:
    """One reading of all segments by :func:`untangle`.

    ``lengths`` holds the segments' skeleton lengths where an earlier round measured them
    (None: not yet). Returns the instances (the input itself when nothing is cut) and the
    lengths of the returned segments (None for new parts).
    """
    n = len(instances)
    if n < 2 or factor <= 0:
        return instances, lengths
    areas = instances.areas
    typical = float(np.median(areas))
    if not (areas > factor * typical).any():
        return instances, lengths
    lengths = [
        int(skeletonize(_crop(m)).sum()) if known is None else known
        for m, known in zip(instances.crops, lengths, strict=True)
    ]
    typical_length = float(np.median(lengths))
    cover = instances.cover()  # crossings: pixels of 2+ instances
    boxes, crops, scores, classes, seeds, taus = [], [], [], [], [], []
    new_lengths: list[int | None] = []
    changed = False
    for i in range(n):
        parts = None
        if areas[i] > factor * typical:
            # the segment in its box with the 2-px margin of _cropped_skeleton: its
            # readings give the parts in this window
            box, mask = instances.window(i, 2)
            r0, r1, c0, c1 = box
            found = _cropped_skeleton(mask)  # one skeleton for all four readings
            options = (typical, typical_length, min_part_fraction, max_bend_cos)
            shared = mask & (cover[r0:r1, c0:c1] > 1)  # an earlier round's crossing: no cut
            more = (
                length_factor,
                None if boundary is None else np.asarray(boundary)[r0:r1, c0:c1],
                clumps,
                min_kink_cos,
                shared if shared.any() else None,
            )
            parts = _read_segment(mask, found, *options, *more)
            if parts is None and found is not None and reprune_widths:
                # a spur of the outline just longer than the default pruning makes a
                # three-armed "crossing" whose third worm is a stub: read again without it
                pruned = _cropped_skeleton(mask, reprune_widths * found.width)
                parts = _read_segment(mask, pruned, *options, *more)
        seed_taken = False
        for part in parts or [instances.crops[i]]:
            boxes.append(box if parts is not None else instances.boxes[i])
            crops.append(part)
            new_lengths.append(None if parts is not None else lengths[i])
            scores.append(instances.scores[i])
            classes.append(instances.classes[i])
            if instances.seeds is not None:
                seed = np.asarray(instances.seeds[i])
                if parts is not None and (seed_taken or not _holds(part, box, seed)):
                    # the segment's seed goes to the first part holding it (a seed in a
                    # crossing is in both); any other part gets its most interior pixel
                    # outside the crossing, where no other part can claim it (the window's
                    # margin, or the image's edge, makes these the image's depths)
                    own = part & ~np.any([p for p in parts if p is not part], axis=0)
                    depth = ndimage.distance_transform_edt(own if own.any() else part)
                    seed = np.asarray(np.unravel_index(np.argmax(depth), part.shape))
                    seed = seed + (box[0], box[2])
                else:
                    seed_taken = True
                seeds.append(seed.astype(np.asarray(instances.seeds).dtype))
            if instances.taus is not None:
                taus.append(instances.taus[i])
        changed |= parts is not None
    if not changed:
        return instances, lengths
    cut = CroppedInstances(
        shape=instances.shape,
        boxes=boxes,
        crops=crops,
        scores=np.asarray(scores, np.float32),
        classes=np.asarray(classes, np.int64),
        seeds=None if instances.seeds is None else np.stack(seeds),
        taus=None if instances.taus is None else np.asarray(taus, np.float32),
    )
    return cut, new_lengths


def _holds(crop: np.ndarray, box: tuple[int, int, int, int], point: np.ndarray) -> bool:
    """Whether the mask ``crop`` placed at ``box`` holds the image pixel ``point``."""
    r, c = int(point[0]) - box[0], int(point[1]) - box[2]
    return 0 <= r < crop.shape[0] and 0 <= c < crop.shape[1] and bool(crop[r, c])
