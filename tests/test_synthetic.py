"""Tests of core.synthetic: the synthetic worms used as sample data and test fixture."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_instseg.core.synthetic import make_worms, sample_worms
from napari_instseg.core.types import Sample


def _overlapping_pairs(masks: np.ndarray) -> list[list[int]]:
    return [
        [i, j]
        for i, j in itertools.combinations(range(len(masks)), 2)
        if (masks[i] & masks[j]).any()
    ]


def test_returns_sample_with_documented_types():
    sample = make_worms(shape=(128, 160), n_worms=4, length=(40, 70), seed=3)
    assert isinstance(sample, Sample)
    assert sample.image.shape == (128, 160) and sample.image.dtype == np.float32
    assert sample.masks.shape == (4, 128, 160) and sample.masks.dtype == bool
    assert sample.name == "synthetic-3"
    assert sample.metadata["params"]["n_worms"] == 4
    assert 50 < sample.image.min() and sample.image.max() < 4000  # uint16-like range


def test_same_seed_same_arrays_different_seed_different():
    a = make_worms(seed=7)
    b = make_worms(seed=7)
    c = make_worms(seed=8)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.metadata == b.metadata
    assert not np.array_equal(a.masks, c.masks)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("seed", range(6))
def test_worms_inside_image_and_exactly_requested_crossings(seed):
    sample = make_worms(n_worms=6, n_crossings=2, n_touching=1, seed=seed)
    masks = sample.masks
    assert len(masks) == 6
    # every worm is fully inside: nothing on the image border, every mask non-trivial
    assert not masks[:, 0].any() and not masks[:, -1].any()
    assert not masks[:, :, 0].any() and not masks[:, :, -1].any()
    assert (masks.reshape(6, -1).sum(axis=1) > 100).all()
    # each worm is one connected piece
    for mask in masks:
        assert ndi.label(mask)[1] == 1
    # exactly the reported pairs overlap, and there are as many as requested
    pairs = _overlapping_pairs(masks)
    assert pairs == sample.metadata["crossings"]
    assert len(pairs) == 2
    # a crossing shares only a small part of each worm
    for i, j in pairs:
        shared = (masks[i] & masks[j]).sum()
        assert shared < 0.5 * min(masks[i].sum(), masks[j].sum())


def test_touching_worms_touch_without_overlap():
    sample = make_worms(n_worms=5, n_crossings=0, n_touching=2, seed=11)
    assert _overlapping_pairs(sample.masks) == []
    assert len(sample.metadata["touching"]) == 2
    eight = np.ones((3, 3), bool)
    for i, j in sample.metadata["touching"]:
        grown = ndi.binary_dilation(sample.masks[j], structure=eight)
        assert (grown & sample.masks[i]).any()


@pytest.mark.parametrize("n", [0, 1, 3, 9])
def test_count_parameter_respected(n):
    sample = make_worms(
        shape=(200, 200), n_worms=n, length=(30, 60), n_crossings=0, n_touching=0, seed=n
    )
    assert sample.masks.shape == (n, 200, 200)
    if n == 0:
        assert sample.image.std() < 0.1 * sample.image.mean()  # background only


def test_dark_worms_on_bright_background_with_falloff():
    sample = make_worms(seed=5, noise=0.0, illumination=0.3)
    worms = sample.masks.any(axis=0)
    near = ndi.binary_dilation(worms, iterations=6) & ~ndi.binary_dilation(worms, iterations=2)
    assert sample.image[worms].mean() < 0.75 * sample.image[near].mean()
    image = make_worms(n_worms=0, n_crossings=0, n_touching=0, noise=0.0, seed=5).image
    h, w = image.shape
    centre = image[h // 2 - 10 : h // 2 + 10, w // 2 - 10 : w // 2 + 10].mean()
    assert image[:10, :10].mean() < 0.9 * centre  # light falls off towards the corners
    flat = make_worms(n_worms=0, n_crossings=0, n_touching=0, noise=0.0, illumination=0.0)
    assert flat.image.std() < 1e-3 * flat.image.mean()


def test_worms_darken_from_outline_to_centre_line():
    # BBBC010's bright-field worms absorb most on their centre line (a cylinder seen from
    # above), so intensity falls with the distance from the outline
    sample = make_worms(seed=3, noise=0.0, illumination=0.0, n_crossings=0, n_touching=0)
    worms = sample.masks.any(axis=0)
    depth = ndi.distance_transform_edt(worms)
    background = np.median(sample.image[~ndi.binary_dilation(worms, iterations=4)])
    ring = [sample.image[(depth > d) & (depth <= d + 1)].mean() / background for d in range(3)]
    assert ring[0] > ring[1] > ring[2]  # darker at every step inwards
    assert ring[0] > 0.65 and ring[2] < 0.6  # a light outline, a dark core


def test_crossings_are_darker_than_single_worms():
    sample = make_worms(seed=2, noise=0.0)
    (i, j), *_ = sample.metadata["crossings"]
    both = sample.masks[i] & sample.masks[j]
    single = sample.masks[i] & ~sample.masks[j]
    assert sample.image[both].mean() < sample.image[single].mean()


def test_noise_level():
    clean = make_worms(seed=4, noise=0.0).image
    noisy = make_worms(seed=4, noise=0.05).image
    rel = (noisy - clean) / clean
    assert 0.03 < rel.std() < 0.07


def test_worm_sizes_follow_parameters():
    sample = make_worms(
        shape=(300, 300), n_worms=6, length=(80, 100), width=(8, 10), n_crossings=0, seed=9
    )
    for mask in sample.masks:
        dist = ndi.distance_transform_edt(mask)
        assert 3 <= dist.max() <= 6.5  # half of the body width, plus rounding
        area = mask.sum()
        assert 80 * 3 < area < 100 * 10


def test_well_keeps_worms_inside_lit_region():
    sample = make_worms(shape=(200, 240), n_worms=4, length=(40, 60), well=True, seed=1)
    dark = sample.image < 400
    assert dark[0, 0] and dark[-1, -1]  # corners outside the well are dark
    assert not (sample.masks.any(axis=0) & dark).any()


def test_sample_worms():
    sample = sample_worms()
    assert sample.image.shape == (520, 696)
    assert sample.masks.shape[0] == 12
    assert len(_overlapping_pairs(sample.masks)) == 3
    assert sample.name == "sample-worms"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": (8, 8)}, "at least 16"),
        ({"shape": "big"}, "shape"),
        ({"n_worms": -1}, "n_worms"),
        ({"n_worms": 2.5}, "n_worms"),
        ({"n_worms": 2, "n_crossings": 2}, "crossings need"),
        ({"n_worms": 1, "n_crossings": 0, "n_touching": 1}, "touch"),
        ({"length": (50, 20)}, "length"),
        ({"width": (1, 3)}, "width"),
        ({"length": 30}, "length"),
        ({"noise": -0.1}, "noise"),
        ({"illumination": 1.0}, "illumination"),
        ({"shape": (64, 64), "length": (200, 300)}, "do not fit"),
        ({"shape": (32, 32), "n_worms": 30, "length": (15, 20), "width": (4, 5)}, "only place"),
    ],
)
def test_parameter_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_worms(**kwargs)


def test_top_level_api_exports_make_worms():
    import napari_instseg as nis

    assert nis.make_worms is make_worms
