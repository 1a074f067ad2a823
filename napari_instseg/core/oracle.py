"""A synthetic "perfect" :class:`~napari_instseg.core.types.Prediction` built from masks.

The oracle stands in for a trained network in tests, development and benchmarks: every
instance gets its own well-separated embedding vector (background one more), pixels shared
by two instances (worms crossing) get the mean of their instances' vectors, the boundary is
every instance's contour (also where instances touch or cross), and seediness / class scores
are high in instance interiors and low on background, boundaries and crossings.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .types import DEFAULT_TAUS, Prediction

__all__ = ["prediction_from_masks", "separated_vectors"]


def separated_vectors(
    n: int, dim: int, min_d2: float = 16.0, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Draw ``n`` random vectors whose pairwise squared distances are at least ``min_d2``.

    Parameters
    ----------
    n : int
        Number of vectors.
    dim : int
        Their dimension.
    min_d2 : float
        Smallest allowed squared Euclidean distance between two vectors.
    rng : numpy.random.Generator, optional
        Random generator (default: a fresh unseeded one).

    Returns
    -------
    np.ndarray
        (n, dim) float32.
    """
    if dim < 1:
        raise ValueError(f"embedding dimension must be >= 1, got {dim}")
    rng = np.random.default_rng() if rng is None else rng
    # typical squared distance 2 * dim * scale**2 ~ 2.5 * min_d2; grows when rejections pile up
    scale = np.sqrt(1.25 * min_d2 / dim)
    out: list[np.ndarray] = []
    tries = 0
    while len(out) < n:
        v = rng.normal(0.0, scale, dim)
        if all(float(((v - u) ** 2).sum()) >= min_d2 for u in out):
            out.append(v)
            tries = 0
        else:
            tries += 1
            if tries > 50:
                scale *= 1.25
                tries = 0
    return np.asarray(out, np.float32).reshape(n, dim)


def prediction_from_masks(
    masks: np.ndarray,
    embedding_dim: int = 8,
    noise: float = 0.0,
    seed: int = 0,
    taus: tuple[float, ...] = DEFAULT_TAUS,
    min_separation: float = 16.0,
    boundary_sigma: float = 0.7,
) -> Prediction:
    """Build a synthetic perfect prediction from ground-truth masks.

    Parameters
    ----------
    masks : np.ndarray
        (N, H, W) bool instance masks (overlaps allowed) or an (H, W) bool single mask.
    embedding_dim : int
        D, the number of embedding channels.
    noise : float
        Standard deviation of Gaussian noise added to every embedding channel. Instance
        vectors are at least ``sqrt(min_separation)`` apart, so noise up to ~0.3 keeps
        instances separable at tau = 0.5.
    seed : int
        Seed of the random generator (vectors and noise).
    taus : tuple of float
        Thresholds of the class-score head.
    min_separation : float
        Smallest squared distance between two instance (or background) vectors.
    boundary_sigma : float
        Gaussian blur (pixels) of the contour map.

    Returns
    -------
    Prediction
        ``embeddings`` (D, H, W): instance vector inside each instance, mean of the
        instances' vectors where several overlap, background vector elsewhere (plus noise);
        ``foreground``: union of the masks; ``boundary``: contours of every instance
        (including where instances touch or cross), blurred and scaled to max 1;
        ``seediness`` / ``class_scores``: a per-instance normalised distance transform
        (0.3 at the edge to 0.95 on the centre line, 0.1 on crossings, 0.02 on background),
        with ``tau = 0.5`` scored highest.
    """
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W) or (H, W), got shape {masks.shape}")
    masks = masks.astype(bool)
    if masks.shape[1] == 0 or masks.shape[2] == 0:
        raise ValueError(f"masks have an empty image size {masks.shape[1:]}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    n, h, w = masks.shape
    rng = np.random.default_rng(seed)
    vectors = separated_vectors(n + 1, embedding_dim, min_separation, rng)  # [0] = background
    counts = masks.sum(axis=0).astype(np.float32)
    fg = counts > 0
    emb = np.tensordot(vectors[1:].T, masks.astype(np.float32), axes=(1, 0)) if n else 0.0
    emb = emb + vectors[0][:, None, None] * (~fg)[None]
    emb = (emb / np.maximum(counts, 1.0)[None]).astype(np.float32)
    if noise > 0:
        emb = emb + rng.normal(0.0, noise, emb.shape).astype(np.float32)

    contour = np.zeros((h, w), bool)
    interior = np.zeros((h, w), np.float32)
    for m in masks:
        if not m.any():
            continue
        rows, cols = np.nonzero(m)
        r0, r1 = max(rows.min() - 2, 0), min(rows.max() + 3, h)
        c0, c1 = max(cols.min() - 2, 0), min(cols.max() + 3, w)
        crop = m[r0:r1, c0:c1]
        edge = crop & ~ndimage.binary_erosion(crop, border_value=0)
        contour[r0:r1, c0:c1] |= edge
        dt = ndimage.distance_transform_edt(crop)
        dt = (dt / max(dt.max(), 1.0)).astype(np.float32)
        np.maximum(interior[r0:r1, c0:c1], dt, out=interior[r0:r1, c0:c1])
    boundary = ndimage.gaussian_filter(contour.astype(np.float32), boundary_sigma)
    boundary = (boundary / max(float(boundary.max()), 1e-6)).astype(np.float32)

    seediness = np.where(fg, 0.3 + 0.65 * interior, 0.02).astype(np.float32)
    seediness[counts > 1] = 0.1
    seediness[contour] = np.minimum(seediness[contour], 0.3)
    weights = np.array([1.0 if abs(t - 0.5) < 1e-6 else 0.95 for t in taus], np.float32)
    fg_scores = weights[:, None, None] * seediness[None]
    class_scores = np.stack([1.0 - fg_scores, fg_scores], axis=1).astype(np.float32)
    seediness = fg_scores.max(axis=0)
    return Prediction(
        embeddings=emb,
        seediness=seediness,
        class_scores=class_scores,
        boundary=boundary,
        foreground=fg.astype(np.float32),
        taus=tuple(taus),
        metadata={"source": "oracle", "noise": noise, "seed": seed},
    )
