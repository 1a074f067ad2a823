"""Shape descriptors of one 2D mask: bounding box, solidity, elongation, skeleton length.

Used by the segmentation (edge thresholds from solidity, the debris filter), by the
per-instance measurements and by the plugin. Pure numpy/scipy/scikit-image.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, dijkstra
from scipy.spatial import ConvexHull
from skimage.morphology import skeletonize

__all__ = ["bounding_box", "elongation", "hull_pixel_count", "skeleton_length", "solidity"]


def solidity(mask: np.ndarray) -> float:
    """Area over the area of the convex hull of a 2D mask (1 for a straight rod).

    Parameters
    ----------
    mask : np.ndarray
        (H, W) bool.

    Returns
    -------
    float
        In (0, 1]; 0 for an empty mask.
    """
    mask = np.asarray(mask, bool)
    box = bounding_box(mask)
    if box is None:
        return 0.0
    crop = mask[box[0] : box[1], box[2] : box[3]]
    return float(crop.sum() / max(hull_pixel_count(crop), 1))


#: corners of the diamond a pixel is drawn as in its convex hull (as scikit-image does)
_DIAMOND = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]], np.int64)


def hull_pixel_count(mask: np.ndarray) -> int:
    """Number of pixels in the convex hull of a 2D mask.

    The same count as ``skimage.morphology.convex_hull_image(mask).sum()`` (each pixel
    drawn as the diamond through its edges' midpoints; pixels whose centre lies inside
    or on the hull), about twice as fast: only the first and last pixel of every row can be
    hull vertices, and the pixels inside are counted row by row from the
    hull's half-planes instead of tested one by one.

    Parameters
    ----------
    mask : np.ndarray
        (H, W) bool with at least one pixel.

    Returns
    -------
    int
        Pixel count of the hull.
    """
    h, w = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    by_row = mask[rows]
    # every pixel (and its diamond) lies between its row's first and last: those suffice
    ends = np.concatenate(
        [
            np.stack([rows, by_row.argmax(axis=1)], 1),
            np.stack([rows, w - 1 - by_row[:, ::-1].argmax(axis=1)], 1),
        ]
    )
    # diamond corners in half-pixel units, made unique through one integer key per point
    twice = (2 * ends[:, None, :] + _DIAMOND).reshape(-1, 2) + 1
    width = 2 * w + 3
    key = np.unique(twice[:, 0] * width + twice[:, 1])
    points = np.stack([key // width, key % width], 1).astype(np.float64) / 2 - 0.5
    hull = ConvexHull(points)
    # inside: n_r * r + n_c * c + offset <= 0 for every facet; per row an interval of c
    n_r, n_c, offset = hull.equations.T
    r = np.arange(h, dtype=np.float64)[:, None]
    rhs = -(offset[None, :] + n_r[None, :] * r)
    tol = 1e-9
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = rhs / n_c[None, :]
    hi = np.where(n_c > tol, bound, np.inf).min(axis=1)
    lo = np.where(n_c < -tol, bound, -np.inf).max(axis=1)
    level = np.where(np.abs(n_c) <= tol, rhs >= -tol, True).all(axis=1)
    lo = np.maximum(np.ceil(lo - 1e-7), 0)
    hi = np.minimum(np.floor(hi + 1e-7), w - 1)
    return int(np.where(level, np.maximum(hi - lo + 1, 0), 0).sum())


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[int, int, int, int] | None:
    """(r0, r1, c0, c1) of a 2D mask's pixels, grown by ``margin`` within the image.

    Parameters
    ----------
    mask : np.ndarray
        (H, W) bool.
    margin : int
        Pixels added on every side (clipped to the image).

    Returns
    -------
    tuple of int or None
        Row and column slice bounds, or None for an empty mask.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if not len(rows):
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return (
        max(int(rows[0]) - margin, 0),
        min(int(rows[-1]) + margin + 1, h),
        max(int(cols[0]) - margin, 0),
        min(int(cols[-1]) + margin + 1, w),
    )


def elongation(mask: np.ndarray) -> float:
    """Ratio of a 2D mask's major to minor axis (from its second moments; 1 for a disc).

    Parameters
    ----------
    mask : np.ndarray
        (H, W) bool.

    Returns
    -------
    float
        ``sqrt(l1 / l2)`` of the pixel coordinates' covariance eigenvalues (``inf`` for
        a one-pixel-wide line, 0 for an empty mask).
    """
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return 0.0
    cov = np.cov(np.stack([rows, cols]).astype(np.float64), bias=True) if len(rows) > 1 else 0
    low, high = np.linalg.eigvalsh(np.atleast_2d(cov) + np.eye(2) / 12.0)  # + pixel extent
    return float(np.sqrt(high / max(low, 1e-12)))


_STEPS = ((0, 1, 1.0), (1, 0, 1.0), (1, 1, np.sqrt(2.0)), (1, -1, np.sqrt(2.0)))


def skeleton_length(mask: np.ndarray) -> float:
    """Length of the longest path through the skeleton of a mask (sum over its pieces).

    Parameters
    ----------
    mask : np.ndarray
        (H, W) bool.

    Returns
    -------
    float
        Length in pixels (0 for an empty mask, 1 for a single-pixel skeleton).
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        return 0.0
    r0, r1, c0, c1 = bounding_box(mask)  # type: ignore[misc]
    crop = np.pad(mask[r0:r1, c0:c1], 1)
    skel = skeletonize(crop)
    rr, cc = np.nonzero(skel)
    n = len(rr)
    if n <= 1:
        return float(n)
    index = -np.ones(skel.shape, np.int64)
    index[rr, cc] = np.arange(n)
    src, dst, wts = [], [], []
    for dr, dc, wt in _STEPS:
        r2, c2 = rr + dr, cc + dc
        ok = (r2 >= 0) & (r2 < skel.shape[0]) & (c2 >= 0) & (c2 < skel.shape[1])
        j = np.full(n, -1)
        j[ok] = index[r2[ok], c2[ok]]
        has = j >= 0
        src.append(np.flatnonzero(has))
        dst.append(j[has])
        wts.append(np.full(int(has.sum()), wt))
    graph = coo_matrix(
        (np.concatenate(wts), (np.concatenate(src), np.concatenate(dst))), shape=(n, n)
    ).tocsr()
    n_comp, comp = connected_components(graph, directed=False)
    total = 0.0
    for k in range(n_comp):
        nodes = np.flatnonzero(comp == k)
        if len(nodes) == 1:
            total += 1.0
            continue
        # double sweep: farthest node from any node, then farthest from that one
        d = dijkstra(graph, directed=False, indices=int(nodes[0]))
        far = int(nodes[np.argmax(d[nodes])])
        d = dijkstra(graph, directed=False, indices=far)
        total += float(d[nodes].max()) + 1.0  # count the end pixels too
    return total
