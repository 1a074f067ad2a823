"""Edge refinement by image contrast (core/edges.py) and its use in segment()."""

from __future__ import annotations

import numpy as np
import pytest

from napari_instseg.core.edges import edge_threshold, local_contrast, refine_edges
from napari_instseg.core.instances import segment
from napari_instseg.core.oracle import prediction_from_masks
from napari_instseg.core.shape import solidity
from napari_instseg.core.types import Instances


def _rod(shape=(80, 120), rows=(36, 44), cols=(20, 100)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


def _image_with_halo(mask: np.ndarray, halo: float, body: float = 0.5) -> np.ndarray:
    """Background 100 with a left-to-right illumination ramp, the object dark, a faint ring."""
    from scipy import ndimage

    h, w = mask.shape
    ramp = np.linspace(0.85, 1.15, w, dtype=np.float32)[None, :].repeat(h, 0)
    ring = ndimage.binary_dilation(mask) & ~mask
    factor = np.where(mask, body, np.where(ring, halo, 1.0))
    return (100.0 * ramp * factor).astype(np.float32)


def test_local_contrast_removes_illumination_and_keeps_dark_objects():
    mask = _rod()
    image = _image_with_halo(mask, halo=1.0)
    contrast = local_contrast(image)
    assert contrast.shape == image.shape and contrast.dtype == np.float32
    far = np.ones_like(mask)
    far[20:60, 10:110] = False
    # the 1.35x illumination ramp is gone on background; the rod stays half as bright
    assert np.abs(contrast[far] - 1).max() < 0.05
    assert np.median(contrast[mask]) == pytest.approx(0.5, abs=0.05)


def test_local_contrast_handles_nan_and_rejects_bad_input():
    image = np.full((40, 40), 50.0, np.float32)
    image[5, 5] = np.nan
    contrast = local_contrast(image)
    assert np.isfinite(contrast).all() and contrast[5, 5] == 1.0
    with pytest.raises(ValueError, match="one"):
        local_contrast(np.zeros((2, 40, 40)))
    with pytest.raises(ValueError, match=">= 1"):
        local_contrast(image, block=0)


def test_solidity_of_rod_and_of_bent_worm():
    rod = _rod()
    bent = np.zeros((80, 120), bool)
    bent[10:70, 20:28] = True  # an L: vertical arm ...
    bent[62:70, 20:100] = True  # ... and horizontal arm
    assert solidity(rod) == pytest.approx(1.0)
    assert solidity(bent) < 0.5
    assert solidity(np.zeros((5, 5), bool)) == 0.0


def test_edge_threshold_follows_median_solidity():
    assert edge_threshold([0.5, 0.55, 0.9], 0.88, 0.98) == pytest.approx(0.88)
    assert edge_threshold([0.8, 0.85, 0.3], 0.88, 0.98) == pytest.approx(0.98)
    assert edge_threshold([0.67], 0.88, 0.98) == pytest.approx(0.93)
    assert edge_threshold([], 0.88, 0.98) == pytest.approx(0.88)


def test_refine_edges_takes_the_faint_halo_of_a_straight_worm_only():
    truth = _rod()
    from scipy import ndimage

    halo = ndimage.binary_dilation(truth) & ~truth
    contrast = local_contrast(_image_with_halo(truth, halo=0.95))
    found = Instances(masks=truth[None])
    # a straight rod: the straight threshold 0.98 takes the 0.95 halo ring
    straight = refine_edges(found, contrast, (0.88, 0.98))
    assert straight.masks[0][halo].all() and straight.masks[0][truth].all()
    # thresholds for curved worms everywhere: the ring stays out
    curved = refine_edges(found, contrast, (0.9, 0.9))
    np.testing.assert_array_equal(curved.masks[0], truth)


def test_refine_edges_trims_a_ring_that_is_not_dark():
    truth = _rod()
    from scipy import ndimage

    too_big = ndimage.binary_dilation(truth)
    contrast = local_contrast(_image_with_halo(truth, halo=1.0))
    refined = refine_edges(Instances(masks=too_big[None], scores=[0.7]), contrast, (0.9, 0.98))
    np.testing.assert_array_equal(refined.masks[0], truth)
    assert refined.scores[0] == pytest.approx(0.7)


def test_refine_edges_does_not_grow_into_a_neighbour():
    a = _rod(rows=(30, 38))
    b = _rod(rows=(38, 46))  # touching: a's outer band is b's first row, which is dark
    contrast = local_contrast(_image_with_halo(a | b, halo=0.9))
    refined = refine_edges(Instances(masks=np.stack([a, b])), contrast, (0.98, 0.98))
    assert not (refined.masks[0] & b).any() and not (refined.masks[1] & a).any()
    # each still takes the halo on its free side
    assert refined.masks[0][29, 20:100].all() and refined.masks[1][46, 20:100].all()


def test_refine_edges_rejects_bad_arguments():
    found = Instances(masks=_rod()[None])
    contrast = np.ones((80, 120), np.float32)
    with pytest.raises(ValueError, match="same image"):
        refine_edges(found, np.ones((10, 10)), (0.9, 0.98))
    with pytest.raises(ValueError, match="two numbers"):
        refine_edges(found, contrast, (0.9,))
    with pytest.raises(ValueError, match=r"\(0, 2\)"):
        refine_edges(found, contrast, (0.9, -1.0))
    with pytest.raises(ValueError, match="radius"):
        refine_edges(found, contrast, (0.9, 0.98), radius=0)
    empty = Instances(masks=np.zeros((0, 80, 120), bool))
    assert len(refine_edges(empty, contrast, (0.9, 0.98))) == 0


def test_segment_applies_edge_thresholds_from_params_and_from_the_model():
    truth = _rod()
    prediction = prediction_from_masks(truth[None])
    plain = segment(prediction, "boundary", min_size=10)
    assert len(plain) == 1
    # explicit refinement without contrast: a clear error
    with pytest.raises(ValueError, match="contrast"):
        segment(prediction, "boundary", min_size=10, edge_thresholds=(0.9, 0.98))
    # the model's tuned refinement is skipped without contrast
    prediction.metadata["segment_params"] = {"boundary": {"edge_thresholds": [0.9, 0.98]}}
    np.testing.assert_array_equal(segment(prediction, "boundary", min_size=10).masks, plain.masks)
    # with contrast the halo ring joins the straight rod
    from scipy import ndimage

    halo = ndimage.binary_dilation(plain.masks[0]) & ~plain.masks[0]
    prediction.contrast = local_contrast(_image_with_halo(plain.masks[0], halo=0.95))
    refined = segment(prediction, "boundary", min_size=10)
    assert refined.masks[0][halo].all()
    # and None turns the tuned refinement off
    off = segment(prediction, "boundary", min_size=10, edge_thresholds=None)
    np.testing.assert_array_equal(off.masks, plain.masks)


def test_refine_edges_leaves_a_mask_with_a_bright_outline_alone():
    truth = _rod()
    from scipy import ndimage

    ring = truth & ~ndimage.binary_erosion(truth)
    image = _image_with_halo(truth, halo=1.0)
    image[ring] *= 2.4  # the outline is brighter than the background (a rim artefact)
    found = Instances(masks=truth[None])
    refined = refine_edges(found, local_contrast(image), (0.9, 0.98))
    np.testing.assert_array_equal(refined.masks[0], truth)


def test_refine_edges_keeps_a_thin_stretch_connected():
    worm = _rod()
    worm[39:41, 100:112] = True  # a 2 px wide tail: the band covers it end to end
    tail = np.zeros_like(worm)
    tail[39:41, 100:112] = True
    image = _image_with_halo(worm & ~tail, halo=1.0)  # the tail is as bright as background
    refined = refine_edges(Instances(masks=worm[None]), local_contrast(image), (0.9, 0.98))
    # its skeleton stays, so the tail is thinned, not cut off
    assert refined.masks[0][tail].any()
    assert refined.masks[0][worm & ~tail].sum() >= (worm & ~tail).sum() - 2 * 82


def test_grow_refines_the_clicked_mask_by_contrast():
    from scipy import ndimage

    from napari_instseg.core.grow import grow

    truth = _rod()
    prediction = prediction_from_masks(truth[None])
    seed = (40, 60)
    plain = grow(prediction, [seed], tau=0.5, edge_thresholds=None)
    # no contrast: "auto" changes nothing, explicit thresholds are a clear error
    np.testing.assert_array_equal(grow(prediction, [seed], tau=0.5), plain)
    with pytest.raises(ValueError, match="contrast"):
        grow(prediction, [seed], tau=0.5, edge_thresholds=(0.9, 0.98))
    with pytest.raises(ValueError, match="'auto' or None"):
        grow(prediction, [seed], tau=0.5, edge_thresholds="on")
    halo = ndimage.binary_dilation(plain) & ~plain
    prediction.contrast = local_contrast(_image_with_halo(plain, halo=0.95))
    # a straight rod: its own solidity picks the straight threshold, the halo joins
    refined = grow(prediction, [seed], tau=0.5, edge_thresholds=(0.88, 0.98))
    assert refined[halo].all() and refined[plain].all()
    # "auto" follows the model's tuned thresholds
    prediction.metadata["segment_params"] = {"boundary": {"edge_thresholds": [0.88, 0.98]}}
    np.testing.assert_array_equal(grow(prediction, [seed], tau=0.5), refined)


def test_refine_edges_of_a_mask_filling_the_whole_image_warns_nothing():
    import warnings

    full = Instances(masks=np.ones((1, 12, 16), bool))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = refine_edges(full, np.full((12, 16), 0.9, np.float32), (0.88, 0.98))
    assert out.masks.all()
