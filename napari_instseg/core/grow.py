"""Click-to-grow: masks from seed pixels and embedding similarity (Fathi et al.).

Similarity of two pixels is ``sigma(p, q) = 2 / (1 + exp(||e_p - e_q||^2))`` on
``Prediction.embeddings``. The mask grown from seed ``p`` at threshold ``tau`` is
``{q : sigma(p, q) >= tau}``, i.e. ``||e_p - e_q||^2 <= log(2 / tau - 1)``: the code compares
squared distances with that threshold and never evaluates ``exp`` per pixel. Squared distances
come from ``||a||^2 + ||b||^2 - 2 a.b`` with the pixels' squared norms computed once per
prediction and kept in a :class:`Grower`, so a click costs about one (H*W x D) matrix-vector
product plus work on the bounding box of the mask.

Crossing worms: where two worms overlap, a well-trained embedding sits between the two
instances' embeddings (the loss pulls it to both; the oracle uses their mean), so the overlap
pixels are *not* similar to either seed and would cut a crossed worm in two. :meth:`Grower.grow`
therefore adds "overlap" pixels ``q`` (foreground, near the mask) whose reflection
``2 e_q - e_seed`` is similar to the embedding of another foreground pixel nearby: ``q`` is
then the midpoint between this worm and another one, exactly what a shared pixel looks like.
Both worms keep their crossing pixels, and the worm stays connected through them.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from .edges import refine_edges
from .scale import at_model_scale, move_points, resize_mask
from .shape import bounding_box
from .types import Instances, Prediction

__all__ = [
    "FG_FLOOR",
    "BackgroundSeedWarning",
    "Grower",
    "WormSeeds",
    "d2_threshold",
    "get_grower",
    "grow",
    "grow_instances",
    "similarity",
]

_EIGHT = np.ones((3, 3), bool)

FG_FLOOR = 0.05
"""Foreground probability below which a pixel is background to every click: a click's mask
never takes such pixels, and a click on one grows nothing (the seed alone). On BBBC010
every annotated worm's central pixel is above 0.5 for the shipped model, while the
embeddings of the background are all alike: a click there used to flood the whole
background (~340,000 of the 362,000 pixels, docs/benchmarks.md "Session 26")."""


ANCHOR_REACH = 512
"""How far (pixels, chessboard) from the tested pixels' box a crossing's anchors are taken
(:meth:`Grower.grow`): a BBBC010 image (520 x 696) lies within it whole, so clicks there
grow what they grew from anchors anywhere in the image; on a large image the anchors of
look-alike worms far away are no longer read (a 4160 x 5568 mosaic: ~64 -> ~20 ms a
growth from the embeddings; docs/benchmarks.md "Session 29: growing from the embeddings
on large images")."""


class BackgroundSeedWarning(UserWarning):
    """A seed lies on plain background (foreground below :data:`FG_FLOOR`) and was left out."""


def background_seeds(
    foreground: np.ndarray, seeds: Sequence[Sequence[int]], fg_floor: float | None = None
) -> list[tuple[int, int]]:
    """The seeds that lie on plain background, where a click grows nothing.

    Parameters
    ----------
    foreground : (H, W) array
        Foreground probability of the image.
    seeds : sequence of (row, col)
        Seed pixels; those outside the image are not background (``grow`` refuses them).
    fg_floor : float, optional
        Foreground probability below which a pixel is background to every click;
        default :data:`FG_FLOOR`.

    Returns
    -------
    list of (row, col)
        The seeds, in their order, whose foreground probability is below ``fg_floor``.
    """
    floor = FG_FLOOR if fg_floor is None else fg_floor
    height, width = foreground.shape[-2:]
    return [
        (int(r), int(c))
        for r, c in seeds
        if 0 <= r < height and 0 <= c < width and foreground[r, c] < floor
    ]


def d2_threshold(tau: float) -> float:
    """Squared embedding distance at which the similarity equals ``tau``.

    ``sigma = 2 / (1 + exp(d2)) >= tau``  <=>  ``d2 <= log(2 / tau - 1)``.

    Parameters
    ----------
    tau : float
        Similarity threshold in (0, 1).

    Returns
    -------
    float
        The squared-distance threshold.

    Raises
    ------
    ValueError
        If ``tau`` is not a number strictly between 0 and 1.
    """
    try:
        value = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"tau must be a number strictly between 0 and 1, got {tau!r}") from None
    if not (0.0 < value < 1.0) or math.isnan(value):
        raise ValueError(f"tau must be strictly between 0 and 1, got {value}")
    return math.log(2.0 / value - 1.0)


def _as_points(points: object, shape: tuple[int, int], what: str) -> np.ndarray:
    """Validate (row, col) points: one pair or a sequence of pairs -> (K, 2) int64."""
    if points is None:
        return np.zeros((0, 2), np.int64)
    arr = np.asarray(points, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 2), np.int64)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{what} must be (row, col) pairs, got an array of shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contain NaN or infinite coordinates: {arr.tolist()}")
    pts = np.round(arr).astype(np.int64)
    h, w = shape
    bad = (pts[:, 0] < 0) | (pts[:, 0] >= h) | (pts[:, 1] < 0) | (pts[:, 1] >= w)
    if bad.any():
        raise ValueError(
            f"{what} {pts[bad].tolist()} lie outside the image ({h} rows x {w} columns)"
        )
    return pts


def _tuned_boundary_params(prediction: Prediction) -> dict[str, Any]:
    """The boundary pipeline's tuned parameters in the model's metadata (may be empty)."""
    metadata = getattr(prediction, "metadata", None) or {}
    return (metadata.get("segment_params") or {}).get("boundary") or {}


def _tuned_edge_thresholds(prediction: Prediction) -> tuple[float, float] | None:
    """The boundary pipeline's tuned edge thresholds from the model's metadata, or None."""
    value = _tuned_boundary_params(prediction).get("edge_thresholds")
    try:
        curved, straight = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return curved, straight


def _tuned_fg_threshold(prediction: Prediction) -> float:
    """The boundary pipeline's tuned foreground threshold from the model's metadata, or 0.5."""
    value = _tuned_boundary_params(prediction).get("fg_threshold", 0.5)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.5
    return value if 0.0 <= value < 1.0 else 0.5


class Grower:
    """Cache for fast growing: flattened embeddings and their squared norms.

    Build one per prediction and keep it between clicks (the plugin does);
    :func:`grow` and :func:`similarity` also keep the last one automatically.

    Parameters
    ----------
    prediction : Prediction
        The network's outputs for one image.

    Raises
    ------
    ValueError
        If the prediction is empty or contains NaN / infinite embeddings.
    """

    def __init__(self, prediction: Prediction) -> None:
        emb = np.asarray(prediction.embeddings)
        if emb.ndim != 3 or min(emb.shape) == 0:
            raise ValueError(f"prediction has empty embeddings of shape {emb.shape}")
        d, h, w = emb.shape
        #: (D, H*W) float32 embeddings (the layout with the fastest matrix-vector product):
        #: a view of the prediction's own array when it is float32 and C-ordered (no copy:
        #: at 4160 x 5568 the embeddings take 1.4 GB)
        self.flat = np.ascontiguousarray(emb.reshape(d, h * w), dtype=np.float32)
        #: (H*W,) half the squared norm of every pixel's embedding
        self.half_sq = np.einsum("dn,dn->n", self.flat, self.flat)
        self.half_sq *= 0.5
        # a norm is finite when every component is (or overflows: then distances fail too)
        if not np.isfinite(self.half_sq).all() and not np.isfinite(self.flat).all():
            raise ValueError("prediction embeddings contain NaN or infinite values")
        self.prediction = prediction
        self.shape: tuple[int, int] = (h, w)
        self.dim = d
        fg = np.asarray(prediction.foreground, np.float32)
        bd = np.asarray(prediction.boundary, np.float32)
        #: the foreground and boundary maps, NaN read as background and as boundary (the
        #: prediction's own arrays when they have none)
        self.foreground = _without_nan(fg, 0.0)
        self.boundary = _without_nan(bd, 1.0)
        #: foreground threshold used when none is given: the model's tuned one for the
        #: boundary pipeline (``segment_params`` in its metadata), else 0.5
        self.default_fg_threshold = _tuned_fg_threshold(prediction)
        # the foreground pixels of the last threshold used and their augmented embeddings
        self._foreground_subset: tuple[float, np.ndarray, np.ndarray] | None = None

    def foreground_pixels(self, fg_threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Foreground pixels at a threshold and their columns of the augmented embeddings.

        Flat indices of the pixels with foreground >= ``fg_threshold``, kept for the last
        threshold asked for. A click clipped to the foreground compares only these pixels,
        a fraction of the image for worms on a plate.

        Parameters
        ----------
        fg_threshold : float
            The foreground threshold.

        Returns
        -------
        np.ndarray
            (N,) int64 sorted flat indices.
        np.ndarray
            (D + 1, N) float32, the matching columns of the augmented embeddings.
        """
        kept = self._foreground_subset
        if kept is None or kept[0] != fg_threshold:
            index = np.flatnonzero(self.foreground.reshape(-1) >= fg_threshold)
            kept = (fg_threshold, index, self.augmented(index))
            self._foreground_subset = kept
        return kept[1], kept[2]

    def augmented(self, index: np.ndarray | slice) -> np.ndarray:
        """The embeddings of some pixels with minus half their squared norm as a last row.

        One matrix product of ``(v, 1)`` with these columns gives ``v.e_q - |e_q|^2 / 2``
        for every pixel q: the test ``|v - e_q|^2 <= thr`` as one comparison per pixel.

        Parameters
        ----------
        index : np.ndarray or slice
            Flat pixel indices (or a slice of them).

        Returns
        -------
        np.ndarray
            (D + 1, N) float32, C-ordered.
        """
        columns = self.half_sq[index]
        out = np.empty((self.dim + 1, len(columns)), np.float32)
        out[: self.dim] = self.flat[:, index]
        np.negative(columns, out=out[self.dim])
        return out

    # ------------------------------------------------------------------ basics
    def vectors(self, points: np.ndarray) -> np.ndarray:
        """Embeddings of (K, 2) (row, col) pixels, (K, D) float32."""
        idx = points[:, 0] * self.shape[1] + points[:, 1]
        return self.flat[:, idx].T.copy()

    def sq_dist(self, vectors: np.ndarray, index: np.ndarray | slice | None = None) -> np.ndarray:
        """Squared distances from (K, D) vectors to every pixel (or the pixels in ``index``).

        Parameters
        ----------
        vectors : np.ndarray
            (K, D) embeddings.
        index : np.ndarray or slice, optional
            Flat pixel indices (or a slice of them) to restrict to.

        Returns
        -------
        np.ndarray
            (K, H*W) or (K, number of pixels in ``index``) float32, clipped at 0.
        """
        flat = self.flat if index is None else self.flat[:, index]
        half = self.half_sq if index is None else self.half_sq[index]
        v = np.asarray(vectors, np.float32)
        d2 = v @ flat
        d2 -= half
        d2 *= -2.0
        d2 += (v * v).sum(axis=1)[:, None]
        return np.maximum(d2, 0.0, out=d2)

    def similarity(self, pixel: Sequence[int]) -> np.ndarray:
        """Similarity ``2 / (1 + exp(||e_p - e_q||^2))`` of every pixel q to ``pixel``.

        Parameters
        ----------
        pixel : (int, int)
            (row, col) of p.

        Returns
        -------
        np.ndarray
            (H, W) float32 in (0, 1].
        """
        pts = _as_points(pixel, self.shape, "pixel")
        if len(pts) != 1:
            raise ValueError(f"similarity takes one (row, col) pixel, got {len(pts)}")
        return _sigma(self.sq_dist(self.vectors(pts))[0]).reshape(self.shape)

    def similarity_window(
        self, pixel: Sequence[int], box: tuple[int, int, int, int], step: int = 1
    ) -> np.ndarray:
        """:meth:`similarity` on every ``step``-th pixel of a window only.

        The live preview shows what the canvas shows: the visible part of the image, one
        value per screen pixel when zoomed out, instead of the whole image.

        Parameters
        ----------
        pixel : (int, int)
            (row, col) of p.
        box : (int, int, int, int)
            (row0, row1, col0, col1), ends exclusive, clipped to the image.
        step : int
            Take every ``step``-th row and column from (row0, col0).

        Returns
        -------
        np.ndarray
            ``similarity(pixel)[row0:row1:step, col0:col1:step]`` (float32; the same values
            up to float32 rounding: the dot products are summed in another order).
        """
        pts = _as_points(pixel, self.shape, "pixel")
        if len(pts) != 1:
            raise ValueError(f"similarity takes one (row, col) pixel, got {len(pts)}")
        if step < 1:
            raise ValueError(f"step must be at least 1, got {step}")
        h, w = self.shape
        r0, r1, c0, c1 = (int(v) for v in box)
        r0, r1, c0, c1 = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
        if step == 1 and w <= 6 * (c1 - c0):
            # whole rows are a view of the embeddings: a pixel of them costs about a
            # sixth of a gathered one (0.004 vs 0.03 us), so they are computed, then
            # cropped to the window's columns
            r1, c1 = max(r1, r0), max(c1, c0)
            d2 = self.sq_dist(self.vectors(pts), slice(r0 * w, r1 * w))[0]
            return _sigma(d2).reshape(r1 - r0, w)[:, c0:c1]
        rows = np.arange(r0, max(r1, r0), step)
        cols = np.arange(c0, max(c1, c0), step)
        index = (rows[:, None] * w + cols[None, :]).reshape(-1)
        d2 = self.sq_dist(self.vectors(pts), index)[0]
        return _sigma(d2).reshape(len(rows), len(cols))

    # ------------------------------------------------------------------ grow
    def grow(
        self,
        seeds: object,
        tau: float = 0.5,
        negative: object = None,
        boundary_barrier: float | None = None,
        connected: bool = True,
        bridge_overlaps: bool = True,
        overlap_radius: int = 12,
        fg_threshold: float | None = None,
        min_island: int = 50,
        clip_to_foreground: bool = True,
        fg_floor: float = FG_FLOOR,
    ) -> np.ndarray:
        """Grow one mask from positive seeds; see :func:`grow` for the parameters."""
        h, w = self.shape
        pos = _as_points(seeds, self.shape, "seeds")
        if len(pos) == 0:
            raise ValueError("grow needs at least one positive seed (row, col)")
        neg = _as_points(negative, self.shape, "negative seeds")
        thr = d2_threshold(tau)
        if fg_threshold is None:
            fg_threshold = self.default_fg_threshold
        if not 0.0 <= fg_threshold < 1.0:
            raise ValueError(f"fg_threshold must be in [0, 1), got {fg_threshold}")
        if not 0.0 <= fg_floor < 1.0:
            raise ValueError(f"fg_floor must be in [0, 1), got {fg_floor}")
        if boundary_barrier is not None and not np.isfinite(boundary_barrier):
            raise ValueError(f"boundary_barrier must be a finite number, got {boundary_barrier}")
        vp = self.vectors(pos)

        # union over positive seeds of {q : d2(seed, q) <= thr}, as one comparison per seed
        # d2 <= thr  <=>  v.e_q - |e_q|^2/2 >= (|v|^2 - thr)/2
        va = np.concatenate([vp, np.ones((len(pos), 1), np.float32)], axis=1)
        limit = (0.5 * ((vp * vp).sum(axis=1) - thr)).astype(np.float32)
        clicked = pos[:, 0] * w + pos[:, 1]
        # the foreground map's edges are sharper than the embeddings'; but where the model
        # missed the object (the clicked pixels are background to it) there is nothing to clip to
        seed_fg = float(self.foreground.reshape(-1)[clicked].max())
        if clip_to_foreground and seed_fg >= fg_threshold:  # only foreground pixels compared
            candidates, aug = self.foreground_pixels(fg_threshold)
        elif clip_to_foreground:  # a faint object: clipped to the floor (the background's
            candidates, aug = self.foreground_pixels(min(fg_floor, fg_threshold))  # alike)
        else:
            candidates, aug = None, None
        if aug is None:  # every pixel, a block of augmented columns at a time
            n = h * w
            keep = np.empty(n, bool)
            for start in range(0, n, _BLOCK):
                block = slice(start, min(start + _BLOCK, n))
                keep[block] = _passes(va, self.augmented(block), limit)
        else:
            keep = _passes(va, aug, limit)
        if candidates is None:
            keep[clicked] = True
            idx = np.flatnonzero(keep)
        else:  # the clicked pixels always belong to the mask
            idx = _with_pixels(candidates[keep], clicked)

        if len(neg) and len(idx):
            # remove pixels closer to a negative seed than to every positive seed
            vn = self.vectors(neg)
            d_pos = self.sq_dist(vp, idx).min(axis=0)
            d_neg = self.sq_dist(vn, idx).min(axis=0)
            is_seed = np.isin(idx, clicked)
            idx = idx[(d_neg >= d_pos) | is_seed]
        if not connected and not bridge_overlaps:
            out = np.zeros(h * w, bool)
            out[idx] = True
            return out.reshape(h, w)

        rows, cols = np.divmod(idx, w)
        margin = overlap_radius + 2 if bridge_overlaps else 2
        r0, r1 = max(int(rows.min()) - margin, 0), min(int(rows.max()) + margin + 1, h)
        c0, c1 = max(int(cols.min()) - margin, 0), min(int(cols.max()) + margin + 1, w)
        mask = np.zeros((r1 - r0, c1 - c0), bool)
        mask[rows - r0, cols - c0] = True
        # crossing pixels lie within ``overlap_radius`` of the mask; so does the whole
        # connected result: it lies in the seeds' part of that neighbourhood (``reach``).
        # ``near`` dilates the windows read from it only (the mask of look-alike worms
        # spans a large image: its whole dilation cost ~50 ms a click at 4160 x 5568)
        near = _NearMask(mask, overlap_radius if bridge_overlaps else 0)
        reach = None
        part = (0, r1 - r0, 0, c1 - c0)  # the box's part the rest runs on
        if connected:  # the seeds' part only: the same result
            reach, part = seed_components(near, pos[:, 0] - r0, pos[:, 1] - c0)
        a0, a1, b0, b1 = part
        if bridge_overlaps:
            overlap = self._overlaps(
                mask, (r0, r1, c0, c1), vp, thr, fg_threshold, near, reach, part,
                anchor_radius=ANCHOR_REACH,
            )  # fmt: skip
        else:
            overlap = np.zeros((a1 - a0, b1 - b0), bool)
        if reach is not None:
            mask = mask[a0:a1, b0:b1]
            r0, r1, c0, c1 = r0 + a0, r0 + a1, c0 + b0, c0 + b1
        allowed = mask | overlap
        if connected:
            passable = allowed
            if boundary_barrier is not None:
                block = self.boundary[r0:r1, c0:c1] > boundary_barrier
                if overlap.any():  # contours of a crossing worm do not cut this one
                    block &= ~chessboard_dilation(overlap, 2)
                passable = allowed & ~block
                passable[pos[:, 0] - r0, pos[:, 1] - c0] = True
            labels, _ = ndimage.label(passable, _EIGHT)
            ids = np.unique(labels[pos[:, 0] - r0, pos[:, 1] - c0])
            ids = ids[ids > 0]
            region = labels == ids[0] if len(ids) == 1 else np.isin(labels, ids)
            if boundary_barrier is not None and (allowed & ~region).any():
                # Barrier pixels and small cut-off islands (worm tips lie entirely on the
                # boundary) join whichever large part of the mask floods them first along
                # the boundary map: a watershed from the seeds' part and every other part of
                # at least ``min_island`` pixels, so a contact line splits between its sides.
                sizes = np.bincount(labels.ravel())
                markers = np.where(sizes[labels] >= min_island, 2, 0).astype(np.int32)
                markers[labels == 0] = 0
                markers[region] = 1
                flooded = watershed(self.boundary[r0:r1, c0:c1], markers, mask=allowed)
                region = flooded == 1
            allowed = region
        out = np.zeros((h, w), bool)
        out[r0:r1, c0:c1] = allowed
        if not connected:
            out.reshape(-1)[idx] = True
        return out

    def _overlaps(
        self,
        mask: np.ndarray,
        box: tuple[int, int, int, int],
        vp: np.ndarray,
        thr: float,
        fg_threshold: float,
        near: np.ndarray | _NearMask,
        reach: np.ndarray | None = None,
        part: tuple[int, int, int, int] | None = None,
        anchor_radius: int | None = None,
    ) -> np.ndarray:
        """Pixels of a crossing: midpoints between the seed and another nearby instance.

        Candidates are foreground pixels ``near`` the mask (within the crossing radius);
        anchors, pixels of the other instance, are taken from them at every second row and
        column of the box, within ``anchor_radius`` (pixels, chessboard) of the tested
        pixels' box (None: the whole box), the midpoints tested only within ``reach`` when
        given.
        ``part`` (row0, row1, col0, col1 in the box, default all of it) is the window
        ``reach`` covers and the result's extent.
        """
        r0, r1, c0, c1 = box
        w = self.shape[1]
        t0, t1, u0, u1 = (0, r1 - r0, 0, c1 - c0) if part is None else part
        tested = self.foreground[r0 + t0 : r0 + t1, c0 + u0 : c0 + u1] > fg_threshold
        tested &= near[t0:t1, u0:u1]
        tested &= ~mask[t0:t1, u0:u1]
        if reach is not None:
            tested &= reach
        bw = c1 - c0
        qr, qc = np.divmod(np.flatnonzero(tested), u1 - u0)
        out = np.zeros(tested.shape, bool)
        if len(qr) == 0:
            return out
        q_idx = (qr + r0 + t0) * w + (qc + c0 + u0)  # row-major, as over the whole box
        # anchors: other foreground pixels near the mask, every second row and column of
        # the box, within ``anchor_radius`` of the tested pixels (the box of look-alike
        # worms spans a large image; a crossing worm's pixels may lie outside ``part``, and
        # on BBBC010 midpoints are often explained by anchors more than a worm's width away)
        if anchor_radius is None:
            g0, g1, h0, h1 = 0, r1 - r0, 0, bw
        else:
            g0 = max(t0 + int(qr.min()) - anchor_radius, 0)
            g1 = min(t0 + int(qr.max()) + anchor_radius + 1, r1 - r0)
            h0 = max(u0 + int(qc.min()) - anchor_radius, 0)
            h1 = min(u0 + int(qc.max()) + anchor_radius + 1, bw)
        g0 += g0 % 2  # every second row and column of the box, as over all of it
        h0 += h0 % 2
        grid = self.foreground[r0 + g0 : r0 + g1 : 2, c0 + h0 : c0 + h1 : 2] > fg_threshold
        grid &= near[g0:g1:2, h0:h1:2]
        grid &= ~mask[g0:g1:2, h0:h1:2]
        ar, ac = np.divmod(np.flatnonzero(grid), grid.shape[1])
        a_idx = (2 * ar + r0 + g0) * w + (2 * ac + c0 + h0)
        # an anchor must belong to another instance: for an exact midpoint q between the
        # seed and anchor a, d2(seed, a) = 4 d2(seed, q) > 4 thr; requiring > 2 thr stops
        # the test from creeping along smooth embedding gradients next to the mask
        far = self.sq_dist(vp, a_idx).min(axis=0) > 2.0 * thr
        a_idx = a_idx[far]
        if len(a_idx) == 0:
            return out
        # each candidate's reflection 2 e_q - e_seed, with a last column of ones: (nq, D + 1)
        d = self.dim
        refl = np.ones((len(q_idx), d + 1), np.float32)
        refl[:, :d] = self.flat[:, q_idx].T
        refl[:, :d] *= 2.0
        if len(vp) > 1:
            refl[:, :d] -= vp[self.sq_dist(vp, q_idx).argmin(axis=0)]
        else:
            refl[:, :d] -= vp[0]
        # |refl - e_a|^2 <= thr  <=>  refl.e_a - |e_a|^2 / 2 >= (|refl|^2 - thr) / 2; the
        # augmented anchors' last row holds -|e_a|^2 / 2, and row blocks keep the product
        # in cache
        anchors = self.augmented(a_idx)  # (D + 1, na)
        closest = np.empty(len(q_idx), np.float32)
        for start in range(0, len(q_idx), 256):
            closest[start : start + 256] = (refl[start : start + 256] @ anchors).max(axis=1)
        norms = np.einsum("nd,nd->n", refl[:, :d], refl[:, :d])
        hit = closest >= 0.5 * (norms - thr)
        out[qr[hit], qc[hit]] = True
        return out


class _NearMask:
    """``chessboard_dilation(mask, radius)``, computed for the windows read from it only.

    ``near[a0:a1, b0:b1]`` (or ``near[a0:a1:2, b0:b1:2]``) dilates that window (with the
    ``radius`` margin of the mask it needs), ``near[::2, ::2]`` every second row and column
    of the whole mask (:func:`grid_dilation`): the same values as slicing the whole
    dilation.
    """

    def __init__(self, mask: np.ndarray, radius: int) -> None:
        self.mask = mask
        self.radius = radius
        self.shape = mask.shape

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        h, w = self.shape
        a0, a1, step = rows.indices(h)
        b0, b1, col_step = cols.indices(w)
        if step != col_step or step not in (1, 2):
            raise ValueError(f"_NearMask reads windows at steps 1 or 2, not {key}")
        if step == 2 and (a0, a1, b0, b1) == (0, h, 0, w):
            return grid_dilation(self.mask, self.radius)
        rad = self.radius
        e0, e1 = max(a0 - rad, 0), min(a1 + rad, h)
        f0, f1 = max(b0 - rad, 0), min(b1 + rad, w)
        grown = chessboard_dilation(self.mask[e0:e1, f0:f1], rad)
        return grown[a0 - e0 : a1 - e0 : step, b0 - f0 : b1 - f0 : step]


def _window_or_even(a: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """``out[j] = a[2j - radius : 2j + radius + 1].any()`` along ``axis`` (zeros outside)."""
    n = a.shape[axis]
    half = (n + 1) // 2

    def along(part: slice) -> tuple[slice, ...]:
        return (part, slice(None)) if axis == 0 else (slice(None), part)

    # padded p: p[i + radius] = a[i]; the window of j is p[2j : 2j + 2 radius + 1]: the
    # pairs j .. j + radius - 1 and the even entry 2 (j + radius)
    shape = list(a.shape)
    shape[axis] = 2 * (half + radius)
    padded = np.zeros(shape, bool)
    padded[along(slice(radius, radius + n))] = a
    pairs = padded[along(slice(0, None, 2))] | padded[along(slice(1, None, 2))]
    width = 1
    while width < radius:  # pairs[j] = OR of pairs[j .. j + width - 1]
        step = min(width, radius - width)
        pairs[along(slice(0, -step))] |= pairs[along(slice(step, None))]
        width += step
    out = padded[along(slice(2 * radius, 2 * radius + 2 * half, 2))].copy()
    if radius:
        out |= pairs[along(slice(0, half))]
    return out


def grid_dilation(mask: np.ndarray, radius: int) -> np.ndarray:
    """``chessboard_dilation(mask, radius)[::2, ::2]``, without dilating every pixel.

    Each axis in turn: pixels paired, the windows of ``radius`` pairs OR-ed at half the
    resolution, plus the window's last pixel; a quarter of the work of the whole dilation.

    Parameters
    ----------
    mask : np.ndarray
        (H, W) bool.
    radius : int
        Non-negative half-width of the square.

    Returns
    -------
    np.ndarray
        (ceil(H / 2), ceil(W / 2)) bool.
    """
    out = np.asarray(mask, bool)
    for axis in (0, 1):
        out = _window_or_even(out, radius, axis)
    return np.ascontiguousarray(out)


def _without_nan(values: np.ndarray, nan: float) -> np.ndarray:
    """``np.nan_to_num(values, nan=nan)``, without a copy when nothing is NaN or infinite."""
    return values if np.isfinite(values).all() else np.nan_to_num(values, nan=nan)


_BLOCK = 1 << 18  # pixels of augmented embeddings made at a time (~18 MB for D = 16)


def _passes(va: np.ndarray, aug: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """Which columns of ``aug`` pass ``va[k] . aug >= limit[k]`` for some seed k."""
    if len(va) == 1:
        return (va[0] @ aug) >= limit[0]
    dots = va @ aug
    dots -= limit[:, None]
    return dots.max(axis=0) >= 0


def _sigma(d2: np.ndarray) -> np.ndarray:
    """``2 / (1 + exp(d2))`` in place, float32 (no copies of the image)."""
    np.minimum(d2, 80.0, out=d2)  # exp overflow guard; sigma ~ 0 there anyway
    np.exp(d2, out=d2)
    d2 += 1.0
    np.divide(2.0, d2, out=d2)
    return d2


def _with_pixels(index: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """``np.union1d(index, pixels)`` for a sorted, unique ``index`` and a few ``pixels``.

    Only the pixels missing from ``index`` are sorted in (``union1d`` sorts everything: a
    few milliseconds per click on a large image's foreground).
    """
    pos = np.searchsorted(index, pixels)
    found = pos < len(index)
    found[found] = index[pos[found]] == pixels[found]
    missing = np.unique(pixels[~found])
    if not len(missing):
        return index
    return np.insert(index, np.searchsorted(index, missing), missing)


def seed_components(
    near: np.ndarray, rows: np.ndarray, cols: np.ndarray, start: int = 64
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The 8-connected components of ``near`` holding the seed pixels, and their box.

    The same components as labelling all of ``near``, found in a window around the seeds
    that doubles until the components touch none of its sides inside the array: a
    component that stays off the window's inner sides has no neighbour outside it, so it
    is whole. On a large image with look-alike worms far away (their pixels make
    ``near``'s extent the whole image) this labels a few hundred pixels square instead.

    Parameters
    ----------
    near : np.ndarray
        (H, W) bool.
    rows, cols : np.ndarray
        The seed pixels (all in ``near``).
    start : int
        Half-size of the first window around the seeds' box.

    Returns
    -------
    np.ndarray
        The components, cropped to their bounding box.
    (int, int, int, int)
        That box (row0, row1, col0, col1), ends exclusive, in ``near``'s pixels.
    """
    h, w = near.shape
    size = start
    while True:
        a0, a1 = max(int(rows.min()) - size, 0), min(int(rows.max()) + size + 1, h)
        b0, b1 = max(int(cols.min()) - size, 0), min(int(cols.max()) + size + 1, w)
        parts, _ = ndimage.label(near[a0:a1, b0:b1], _EIGHT)
        ids = np.unique(parts[rows - a0, cols - b0])
        found = parts == ids[0] if len(ids) == 1 else np.isin(parts, ids)
        if (a0, a1, b0, b1) == (0, h, 0, w) or not (
            (a0 > 0 and found[0].any())
            or (a1 < h and found[-1].any())
            or (b0 > 0 and found[:, 0].any())
            or (b1 < w and found[:, -1].any())
        ):
            break
        size *= 2
    in_rows = np.flatnonzero(found.any(axis=1))
    in_cols = np.flatnonzero(found.any(axis=0))
    e0, e1 = int(in_rows[0]), int(in_rows[-1]) + 1
    f0, f1 = int(in_cols[0]), int(in_cols[-1]) + 1
    return found[e0:e1, f0:f1], (a0 + e0, a0 + e1, b0 + f0, b0 + f1)


def chessboard_dilation(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within ``radius`` (chessboard distance) of a 2D mask.

    The same as ``scipy.ndimage.maximum_filter(mask, size=2 * radius + 1, mode="constant")``
    on a bool mask, five to seven times faster: per axis, windows doubled by shifted ORs.

    Parameters
    ----------
    mask : np.ndarray
        (H, W) bool.
    radius : int
        Non-negative half-width of the square.

    Returns
    -------
    np.ndarray
        (H, W) bool.
    """
    out = np.asarray(mask, bool)
    if radius <= 0:
        return out.copy()
    span = 2 * radius + 1
    for axis in (0, 1):
        n = out.shape[axis]
        # padded by ``radius`` on both sides: entry i gathers i .. i + 2 radius, which is
        # the window centred on the unpadded pixel i (numpy buffers the overlapping ORs)
        if axis == 0:
            padded = np.zeros((n + 2 * radius, out.shape[1]), bool)
            padded[radius : radius + n] = out
        else:
            padded = np.zeros((out.shape[0], n + 2 * radius), bool)
            padded[:, radius : radius + n] = out
        width = 1
        while width < span:
            step = min(width, span - width)
            if axis == 0:
                padded[:-step] |= padded[step:]
            else:
                padded[:, :-step] |= padded[:, step:]
            width += step
        out = padded[:n] if axis == 0 else padded[:, :n]
    return np.ascontiguousarray(out)


# one cached Grower per live prediction object (the last few), so repeated clicks are cheap
_CACHE: list[tuple[weakref.ref, int, Grower]] = []
_CACHE_SIZE = 4


def get_grower(prediction: Prediction | Grower) -> Grower:
    """Return a :class:`Grower` for ``prediction``, reusing a cached one when possible.

    The cache is keyed by the prediction object and its embeddings array; replace
    ``prediction.embeddings`` (do not modify it in place) to invalidate it.

    Parameters
    ----------
    prediction : Prediction or Grower
        The prediction (or a grower, returned as is).

    Returns
    -------
    Grower
        The cached or new grower.
    """
    if isinstance(prediction, Grower):
        return prediction
    if not isinstance(prediction, Prediction):
        raise ValueError(f"expected a Prediction, got {type(prediction).__name__}")
    for ref, emb_id, grower in _CACHE:
        if ref() is prediction and emb_id == id(prediction.embeddings):
            return grower
    grower = Grower(prediction)
    _CACHE.insert(0, (weakref.ref(prediction), id(prediction.embeddings), grower))
    del _CACHE[_CACHE_SIZE:]
    return grower


def similarity(prediction: Prediction | Grower, pixel: Sequence[int]) -> np.ndarray:
    """Similarity of every pixel to one pixel: ``2 / (1 + exp(||e_p - e_q||^2))``.

    Parameters
    ----------
    prediction : Prediction or Grower
        The network outputs (a :class:`Grower` avoids recomputing norms).
    pixel : (int, int)
        (row, col) of the reference pixel p.

    Returns
    -------
    np.ndarray
        (H, W) float32 similarity in (0, 1], 1 at ``pixel``.
    """
    return get_grower(prediction).similarity(pixel)


def grow(
    prediction: Prediction | Grower,
    seeds: object,
    tau: float = 0.5,
    negative: object = None,
    boundary_barrier: float | None = None,
    connected: bool = True,
    bridge_overlaps: bool = True,
    overlap_radius: int = 12,
    fg_threshold: float | None = None,
    min_island: int = 50,
    clip_to_foreground: bool = True,
    edge_thresholds: Sequence[float] | str | None = "auto",
    fg_floor: float = FG_FLOOR,
) -> np.ndarray:
    """Grow one instance mask from clicked seed pixels.

    Parameters
    ----------
    prediction : Prediction or Grower
        The network outputs (keep a :class:`Grower` between clicks for speed).
    seeds : (row, col) or sequence of (row, col)
        Positive seeds, all on the same object. The mask is the *union* of the seeds'
        masks ``{q : sigma(seed, q) >= tau}``: on a long worm whose embedding drifts along
        the body, each click adds the part near it (a mean embedding would instead shrink
        the mask to what all seeds agree on).
    tau : float
        Similarity threshold in (0, 1); higher gives tighter masks.
    negative : (row, col) or sequence of (row, col), optional
        Negative seeds: pixels more similar to a negative seed than to every positive seed
        are removed (so a click on a neighbour stops a leak into it).
    boundary_barrier : float, optional
        When given (e.g. 0.5), pixels whose boundary probability exceeds it do not
        propagate: only parts connected to the seeds through non-barrier pixels are kept
        (barrier pixels and small cut-off parts are flooded back, see ``min_island``).
        Contours of a crossing worm are exempt, so a crossed worm is not cut there.
    connected : bool
        Keep only the part connected (8-neighbourhood) to the seeds.
    bridge_overlaps : bool
        Add crossing pixels (midpoints between this and another instance's embedding,
        see the module docstring), so both crossing worms keep the shared pixels.
    overlap_radius : int
        How far (pixels) from the similarity mask crossing pixels are looked for; about the
        width of the widest worm.
    fg_threshold : float, optional
        Foreground probability from which a pixel counts as worm: the mask is clipped to
        it (``clip_to_foreground``) and only such pixels may be crossing pixels. Default:
        the model's tuned threshold of the boundary pipeline (``segment_params`` in the
        prediction's metadata), else 0.5.
    min_island : int
        With a barrier: parts of the similarity mask cut off from the seeds by the barrier
        that are smaller than this (pixels) are flooded back in (worm tips), larger ones
        (a look-alike neighbour) compete for the barrier pixels in a watershed.
    clip_to_foreground : bool
        Drop pixels below ``fg_threshold`` from the similarity mask (the seeds stay), unless
        every positive seed lies below it (a faint object the model half missed: clipped to
        ``fg_floor`` instead). The
        embeddings say which worm a pixel belongs to, the foreground map where the worm
        ends; on BBBC010 (shipped model, one click on each worm's most central pixel,
        tau 0.5) clipping raises the mean IoU from 0.63 to 0.71.
    fg_floor : float
        With ``clip_to_foreground``, pixels below this foreground probability never join
        the mask (:data:`FG_FLOOR`): a click on the background, whose embeddings are all
        alike, gives the seed pixels alone instead of the whole background.
    edge_thresholds : pair of float, "auto" or None
        Re-decide the mask's outline pixels by the image contrast
        (:func:`~napari_instseg.core.edges.refine_edges`, the threshold from this mask's
        own solidity). ``"auto"`` (default): the model's tuned thresholds of the boundary
        pipeline when it has them and the prediction carries ``contrast``; None: off. On
        BBBC010 (shipped model, one click on each worm's most central pixel, tau 0.5) the
        mean IoU goes from 0.617 to 0.623 on live worms and 0.758 to 0.775 on dead ones.

    Returns
    -------
    np.ndarray
        (H, W) bool mask (the seed pixels are always in it). A prediction made at another
        scale that keeps the network's own maps (``prediction.model_grid``) is grown on
        them, in the model's pixels, the mask brought back and its outline refined on the
        image's pixels (worms 2x BBBC010's width, one click each, tau 0.5: mean IoU 0.708
        grown on the image's grid, 0.716 this way).

    Raises
    ------
    ValueError
        Seeds outside the image, no seeds, tau outside (0, 1), empty or NaN embeddings.
    """
    options = {
        "tau": tau,
        "boundary_barrier": boundary_barrier,
        "connected": connected,
        "bridge_overlaps": bridge_overlaps,
        "overlap_radius": overlap_radius,
        "fg_threshold": fg_threshold,
        "min_island": min_island,
        "clip_to_foreground": clip_to_foreground,
        "edge_thresholds": edge_thresholds,
        "fg_floor": fg_floor,
    }
    shown = prediction.prediction if isinstance(prediction, Grower) else prediction
    kept = getattr(shown, "model_grid", None)
    if kept is not None and at_model_scale(shown) is kept:  # (a stale grid is not used)
        return _grow_on_network_grid(shown, kept, seeds, negative, options)
    grower = get_grower(prediction)
    mask = grower.grow(
        seeds,
        tau=tau,
        negative=negative,
        boundary_barrier=boundary_barrier,
        connected=connected,
        bridge_overlaps=bridge_overlaps,
        overlap_radius=overlap_radius,
        fg_threshold=fg_threshold,
        min_island=min_island,
        clip_to_foreground=clip_to_foreground,
        fg_floor=fg_floor,
    )
    return _refine_click(
        grower.prediction, mask, _as_points(seeds, grower.shape, "seeds"), edge_thresholds
    )


def _refine_click(
    prediction: Prediction,
    mask: np.ndarray,
    pos: np.ndarray,
    edge_thresholds: Sequence[float] | str | None,
) -> np.ndarray:
    """A grown mask's outline re-decided by the image contrast (see :func:`grow`)."""
    contrast = getattr(prediction, "contrast", None)
    if isinstance(edge_thresholds, str):
        if edge_thresholds != "auto":
            raise ValueError(
                f"edge_thresholds must be a pair, 'auto' or None, not {edge_thresholds!r}"
            )
        edge_thresholds = _tuned_edge_thresholds(prediction)
    elif edge_thresholds is not None and contrast is None:
        raise ValueError(
            "edge_thresholds needs the image contrast (prediction.contrast), which "
            "predict() fills in; this prediction has none"
        )
    if edge_thresholds is None or contrast is None or not mask.any():
        return mask
    # only the mask's box (and a margin for the band) is refined: a click stays cheap
    r0, r1, c0, c1 = bounding_box(mask, 4)  # type: ignore[misc]
    crop = refine_edges(
        Instances(masks=mask[None, r0:r1, c0:c1]), contrast[r0:r1, c0:c1], edge_thresholds
    ).masks[0]
    refined = np.zeros_like(mask)
    refined[r0:r1, c0:c1] = crop
    refined[pos[:, 0], pos[:, 1]] = True  # the clicked pixels always belong to the mask
    return refined


def _grow_on_network_grid(
    shown: Prediction,
    network: Prediction,
    seeds: object,
    negative: object,
    options: dict[str, Any],
) -> np.ndarray:
    """:func:`grow` of a prediction made at another scale, on the network's own grid.

    The clicks move to the network's pixels, the mask grows there (so every pixel size
    of the options, the crossing search and the outline band, means what it was tuned
    for) and comes back on the image's pixels; the clicked pixels always belong to it.
    """
    pos = _as_points(seeds, shown.shape, "seeds")
    neg = _as_points(negative, shown.shape, "negative seeds")
    small = grow(
        network,
        move_points(pos, shown.shape, network.shape),
        negative=move_points(neg, shown.shape, network.shape) if len(neg) else None,
        **{**options, "edge_thresholds": None},
    )
    mask = resize_mask(small, shown.shape)
    mask[pos[:, 0], pos[:, 1]] = True
    # the outline is re-decided on the image's own pixels, as segment() does
    return _refine_click(shown, mask, pos, options["edge_thresholds"])


@dataclass(frozen=True)
class WormSeeds:
    """The clicks of one worm: positive seeds (at least one), negative seeds, its own tau.

    ``tau`` None: the threshold given to :func:`grow_instances`.
    """

    positive: tuple[tuple[int, int], ...]
    negative: tuple[tuple[int, int], ...] = ()
    tau: float | None = None


def grow_instances(
    prediction: Prediction | Grower,
    worms: Sequence[WormSeeds],
    tau: float = 0.5,
    from_segments: bool = False,
    **grow_options: Any,
) -> Instances:
    """Grow one instance per worm from its seeds, as the plugin's clicks do.

    Parameters
    ----------
    prediction : Prediction or Grower
        The network outputs of the image.
    worms : sequence of WormSeeds
        Per worm its positive and negative seeds, (row, col) pixels.
    tau : float
        Similarity threshold in (0, 1) of the worms without their own.
    from_segments : bool
        Each worm starts from the automatic segment under its first seed and its other
        seeds correct it (:func:`napari_instseg.core.pick.grow_from_segments`, the
        plugin's clicks for a model tuned for automatic segmentation); only
        ``edge_thresholds`` of ``grow_options`` applies then.
    **grow_options
        Passed to :func:`grow` (``boundary_barrier``, ``clip_to_foreground``,
        ``edge_thresholds``, ``fg_floor``, ...).

    Returns
    -------
    Instances
        One mask per worm, in the given order (overlaps kept); score and class from the
        class head at the worm's first positive seed (Fathi et al.), its seed that one,
        ``taus`` the thresholds used. Positive seeds on plain background (foreground below
        ``fg_floor``, :data:`FG_FLOOR` by default; :func:`background_seeds`) are left out
        with a :class:`BackgroundSeedWarning`, as the plugin and ``napari-instseg grow``
        do, unless ``clip_to_foreground=False`` asks for unclipped masks; a worm with no
        seed left gets an empty mask and score 0.

    Warns
    -----
    BackgroundSeedWarning
        For each worm that had seeds on plain background.

    Raises
    ------
    ValueError
        A worm without positive seeds, seeds outside the image, tau outside (0, 1).
    """
    grower = get_grower(prediction)
    h, w = grower.shape
    if not worms:
        return Instances(masks=np.zeros((0, h, w), bool))
    _, best_class, best_score = grower.prediction.best_tau_class()
    fg_floor = grow_options.get("fg_floor", FG_FLOOR)  # (grow's own default)
    skip_background = from_segments or grow_options.get("clip_to_foreground", True)
    foreground = np.asarray(grower.prediction.foreground)
    masks, seeds, taus, empty = [], [], [], []
    for index, worm in enumerate(worms):
        if not worm.positive:
            raise ValueError(f"worm {index + 1} has no positive seed")
        taus.append(tau if worm.tau is None else worm.tau)
        seeds.append(_as_points(worm.positive[0], grower.shape, "seeds")[0])
        outside = background_seeds(foreground, worm.positive, fg_floor)
        if skip_background and outside:
            worm = WormSeeds(
                tuple(p for p in worm.positive if tuple(p) not in outside),
                worm.negative,
                worm.tau,
            )
            left = "left out" if worm.positive else "left out: its mask is empty"
            warnings.warn(
                f"worm {index + 1}: seed(s) {', '.join(map(str, outside))} on plain "
                f"background (foreground < {fg_floor}) {left}",
                BackgroundSeedWarning,
                stacklevel=2,
            )
            if not worm.positive:
                masks.append(np.zeros(grower.shape, bool))
                empty.append(index)
                continue
        if from_segments:
            from .pick import grow_from_segments

            edges = grow_options.get("edge_thresholds", "auto")
            masks.append(
                grow_from_segments(grower.prediction, list(worm.positive),
                                   list(worm.negative) or None, tau=taus[-1],
                                   edge_thresholds=edges)
            )  # fmt: skip
        else:
            masks.append(
                grow(grower, list(worm.positive), tau=taus[-1],
                     negative=list(worm.negative) or None, **grow_options)
            )  # fmt: skip
    at = np.asarray(seeds)
    rows, cols = at[:, 0], at[:, 1]
    scores = np.array(best_score[rows, cols])
    scores[empty] = 0
    return Instances(
        masks=np.stack(masks),
        scores=scores,
        classes=best_class[rows, cols],
        seeds=at,
        taus=np.asarray(taus, np.float32),
    )
