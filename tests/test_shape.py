"""Shape descriptors of single masks (core/shape.py)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.morphology import convex_hull_image

from napari_instseg.core.shape import bounding_box, elongation, hull_pixel_count, solidity
from napari_instseg.core.synthetic import make_worms


def _disc_and_rod(shape=(120, 200)) -> np.ndarray:
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    disc = (rr - 30) ** 2 + (cc - 30) ** 2 <= 14**2
    rod = np.zeros(shape, bool)
    rod[80:88, 20:110] = True
    return np.stack([disc, rod])


def test_elongation_of_disc_rod_and_empty_mask():
    masks = _disc_and_rod()
    assert elongation(masks[0]) == pytest.approx(1.0, abs=0.05)
    # 90 x 8 px: the axes' ratio is the sides' ratio
    assert elongation(masks[1]) == pytest.approx(90 / 8, rel=0.05)
    assert solidity(masks[1]) == pytest.approx(1.0)
    assert elongation(np.zeros((5, 5), bool)) == 0.0


def test_hull_pixel_count_matches_scikit_image():
    rng = np.random.default_rng(3)
    masks = list(make_worms((200, 260), n_worms=6, length=(40, 90), seed=1).masks)
    masks += [rng.random(rng.integers(2, 30, size=2)) < rng.uniform(0.05, 0.9) for _ in range(60)]
    masks += [np.eye(7, dtype=bool), np.ones((1, 5), bool), np.ones((1, 1), bool)]
    checked = 0
    for mask in masks:
        if not mask.any():
            continue
        assert hull_pixel_count(mask) == int(convex_hull_image(mask).sum())
        checked += 1
    assert checked > 50


def test_bounding_box_with_margin_stays_in_the_image():
    mask = np.zeros((10, 12), bool)
    mask[1:4, 8:11] = True
    assert bounding_box(mask) == (1, 4, 8, 11)
    assert bounding_box(mask, 2) == (0, 6, 6, 12)
    assert bounding_box(np.zeros((3, 3), bool)) is None
