"""Objects of another size: resizing factors, widths, resized predictions and instances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.draw import disk
from skimage.transform import resize

from napari_instseg.core.edges import local_contrast
from napari_instseg.core.instances import segment
from napari_instseg.core.model import InstSegNet, ModelConfig
from napari_instseg.core.oracle import prediction_from_masks
from napari_instseg.core.predict import auto_scale, predict
from napari_instseg.core.scale import (
    at_model_scale,
    at_recorded_scale,
    check_scale,
    estimate_scale,
    object_width,
    resize_instances,
    resize_mask,
    resize_prediction,
    resize_sample,
    scaled_shape,
)
from napari_instseg.core.synthetic import make_worms
from napari_instseg.core.types import Instances, Sample


def _apart(shape, length, width):
    """Three synthetic worms that neither cross nor touch."""
    return make_worms(
        shape=shape, n_worms=3, length=length, width=width, n_crossings=0, n_touching=0, seed=4
    )


def _tiny_model() -> InstSegNet:
    torch.manual_seed(0)
    cfg = ModelConfig(channels=(8, 16, 32), embedding_dim=4, head_channels=8, coord_scale=32.0)
    return InstSegNet(cfg).eval()


@pytest.mark.parametrize(
    ("given", "expected"),
    [(1, 1.0), (0.5, 0.5), ("2.5", 2.5), ("auto", "auto"), ("AUTO ", "auto")],
)
def test_check_scale_accepts_numbers_and_auto(given, expected):
    assert check_scale(given) == expected


@pytest.mark.parametrize("bad", [0, -1, 0.05, 11, float("nan"), float("inf"), "big", True, None])
def test_check_scale_rejects_everything_else(bad):
    with pytest.raises(ValueError, match="scale"):
        check_scale(bad)


def test_object_width_of_bars_and_resized_worms():
    bar = np.zeros((60, 300), bool)
    bar[25:35, 20:280] = True  # 10 px wide, 260 px long
    assert 9.5 < object_width(bar) < 11.0
    assert np.isnan(object_width(np.zeros((20, 20), bool)))
    worms = make_worms(shape=(200, 260), n_worms=4, n_crossings=0, n_touching=0, seed=1).masks
    wide = np.stack([resize(m.astype(np.float32), (300, 390), order=1) >= 0.5 for m in worms])
    assert object_width(wide) / object_width(worms) == pytest.approx(1.5, rel=0.06)


def test_resize_prediction_keeps_every_map_and_the_metadata():
    masks = make_worms(
        shape=(64, 80), n_worms=2, length=(20, 40), width=(5, 7), n_crossings=0, n_touching=0
    ).masks
    small = prediction_from_masks(masks)
    small.contrast = np.linspace(0, 1, 64 * 80, dtype=np.float32).reshape(64, 80)
    small.metadata["note"] = "kept"
    big = resize_prediction(small, (128, 160))
    assert big.shape == (128, 160)
    assert big.embeddings.shape == (small.embeddings.shape[0], 128, 160)
    assert big.class_scores.shape[-2:] == (128, 160) and big.contrast.shape == (128, 160)
    assert big.metadata["note"] == "kept" and big.metadata is not small.metadata
    # a ramp stays a ramp: bilinear values between the neighbours
    assert np.all(np.diff(big.contrast.ravel()[:160]) >= -1e-6)
    assert big.foreground.max() <= 1.0 + 1e-6


def test_resize_instances_scales_masks_and_seeds():
    mask = np.zeros((50, 60), bool)
    mask[disk((20, 30), 8)] = True
    found = Instances(masks=mask[None], scores=np.array([0.9]), seeds=np.array([[20, 30]]))
    big = resize_instances(found, (100, 120))
    assert big.masks.shape == (1, 100, 120)
    assert big.masks[0].sum() / mask.sum() == pytest.approx(4.0, rel=0.1)
    assert tuple(big.seeds[0]) in {(40, 60), (41, 61), (40, 61), (41, 60)}
    assert big.masks[0][tuple(big.seeds[0])]
    assert big.scores[0] == pytest.approx(0.9)


def test_segment_follows_the_prediction_scale():
    # worms twice the model's size: at scale 0.5 every size parameter is in the model's
    # pixels, so a minimum size between the worms' model-scale and image-scale areas drops
    # them; the masks come back on the image's pixels
    sample = _apart((200, 240), length=(100, 140), width=(14, 18))
    prediction = prediction_from_masks(sample.masks)
    smallest = int(sample.masks.sum(axis=(1, 2)).min())
    params = {"min_size": smallest // 2, "split_factor": 0.0, "untangle_factor": 0.0}
    at_image_scale = segment(prediction, method="boundary", **params)
    assert len(at_image_scale.masks) == 3
    prediction.metadata["scale"] = 0.5
    at_model_scale = segment(prediction, method="boundary", **params)
    assert len(at_model_scale.masks) == 0
    params["min_size"] = smallest // 8
    found = segment(prediction, method="boundary", **params)
    assert found.masks.shape == (3, 200, 240)
    for mask in sample.masks:  # every worm found whole on the image's pixels
        ious = (found.masks & mask).sum((1, 2)) / (found.masks | mask).sum((1, 2))
        assert ious.max() > 0.8


def test_predict_at_a_scale_returns_the_image_grid_and_caches_apart(tmp_path):
    model = _tiny_model()
    image = np.random.default_rng(0).normal(1000, 50, (90, 120)).astype(np.float32)
    cache = tmp_path / "cache"
    half = predict(image, model, "cpu", scale=0.5, cache=cache)
    assert half.shape == (90, 120) and half.metadata["scale"] == 0.5
    assert half.contrast.shape == (90, 120)
    plain = predict(image, model, "cpu", cache=cache)
    assert plain.metadata["scale"] == 1.0 and plain.metadata["cached"] is False
    assert not np.allclose(plain.foreground, half.foreground)
    again = predict(image, model, "cpu", scale=0.5, cache=cache)
    assert again.metadata["cached"] is True and again.metadata["scale"] == 0.5
    np.testing.assert_allclose(again.foreground, half.foreground)
    with pytest.raises(ValueError, match="scale"):
        predict(image, model, "cpu", scale=-2)


def test_predict_at_a_scale_keeps_the_network_grid_through_the_cache(tmp_path):
    model = _tiny_model()
    image = np.random.default_rng(1).normal(1000, 50, (90, 120)).astype(np.float32)
    cache = tmp_path / "cache"
    half = predict(image, model, "cpu", scale=0.5, cache=cache)
    assert half.model_grid is not None and half.model_grid.shape == (45, 60)
    assert half.model_grid.contrast.shape == (45, 60)
    # the outline is decided on the image's own pixels: its contrast, not a resized one
    np.testing.assert_allclose(half.contrast, local_contrast(image), rtol=1e-6)
    # the network's maps, of which the image-grid maps are the resized copy
    np.testing.assert_allclose(
        resize_prediction(half.model_grid, (90, 120)).foreground, half.foreground, atol=1e-6
    )
    assert predict(image, model, "cpu", cache=cache).model_grid is None  # scale 1: none
    again = predict(image, model, "cpu", scale=0.5, cache=cache)
    assert again.metadata["cached"] is True
    np.testing.assert_array_equal(again.model_grid.embeddings, half.model_grid.embeddings)
    np.testing.assert_array_equal(again.model_grid.contrast, half.model_grid.contrast)
    # a scaled cache entry without the network's maps (an older version's) is not reused
    import shutil

    (store,) = [p for p in cache.iterdir() if (p / "model_grid").is_dir()]
    shutil.rmtree(store / "model_grid")
    redone = predict(image, model, "cpu", scale=0.5, cache=cache)
    assert redone.metadata["cached"] is False and redone.model_grid is not None


def _shown_at_twice_the_size():
    """Separate worms, their oracle maps (the network's grid) and, at twice the size, a
    prediction made at scale 0.5 whose image-grid maps show no foreground anywhere."""
    import dataclasses

    sample = _apart((100, 120), length=(50, 70), width=(7, 9))
    network = prediction_from_masks(sample.masks)
    resized = resize_prediction(network, (200, 240))
    shown = dataclasses.replace(
        resized,
        foreground=np.zeros_like(resized.foreground),
        boundary=np.ones_like(resized.boundary),
        metadata={**resized.metadata, "scale": 0.5},
    )
    return sample, network, shown


def test_segment_runs_on_the_network_grid_when_the_prediction_keeps_it():
    sample, network, shown = _shown_at_twice_the_size()
    params = {"min_size": 50, "split_factor": 0.0, "untangle_factor": 0.0}
    # image-grid maps that show nothing: only the kept network grid can give the worms
    assert len(segment(shown, method="boundary", **params).masks) == 0
    shown.model_grid = network
    found = segment(shown, method="boundary", **params)
    assert found.masks.shape == (3, 200, 240)
    truth = resize_instances(Instances(masks=sample.masks), (200, 240)).masks
    for mask in truth:
        ious = (found.masks & mask).sum((1, 2)) / (found.masks | mask).sum((1, 2))
        assert ious.max() > 0.9
    # a kept grid of the wrong shape (the maps were resized since) is not used
    shown.model_grid = prediction_from_masks(sample.masks[:, :50, :60])
    assert len(segment(shown, method="boundary", **params).masks) == 0


def test_at_model_scale_returns_the_kept_grid_with_the_prediction_metadata():
    masks = make_worms(
        shape=(64, 80), n_worms=2, length=(20, 40), width=(5, 7), n_crossings=0, n_touching=0
    ).masks
    network = prediction_from_masks(masks)
    shown = resize_prediction(network, (128, 160))
    shown.contrast = np.full((128, 160), 0.7, np.float32)
    shown.metadata.update(scale=0.5, segment_params={"boundary": {"min_size": 10}})
    assert at_model_scale(shown).shape == (64, 80)  # no kept grid: the maps resized
    shown.model_grid = network
    on_grid = at_model_scale(shown)
    assert on_grid.embeddings is network.embeddings and on_grid.model_grid is None
    assert on_grid.metadata["scale"] == 1.0
    assert on_grid.metadata["segment_params"] == {"boundary": {"min_size": 10}}
    assert on_grid is network  # the same object: its grow cache is reused between clicks
    assert on_grid.contrast is None  # outlines are refined on the image's grid instead
    plain = prediction_from_masks(masks)
    assert at_model_scale(plain) is plain
    assert resize_prediction(shown, (64, 80)).model_grid is None


def test_auto_scale_needs_the_model_object_width():
    model = _tiny_model()
    image = np.random.default_rng(0).normal(1000, 50, (64, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="object_width"):
        predict(image, model, "cpu", scale="auto")


def test_auto_scale_of_a_small_image_leaves_out_passes_too_small_to_run():
    model = _tiny_model()
    model.metadata = {"object_width": 8.0}
    image = np.random.default_rng(0).normal(1000, 50, (20, 20)).astype(np.float32)
    # the 1/4 pass would be 5 x 5, below what the network takes: only 1 and 1/2 run
    assert auto_scale(image, model, "cpu") > 0
    prediction = predict(image, model, "cpu", scale="auto")
    assert prediction.shape == (20, 20)


def test_auto_scale_is_estimated_once_per_image_with_a_cache(tmp_path, monkeypatch):
    import napari_instseg.core.predict as predict_module

    model = _tiny_model()
    calls = []

    def fake_auto_scale(image, model, device="auto", tile_size=1024, halo=64, precision="auto"):
        calls.append(float(np.asarray(image).mean()))
        return 0.5

    monkeypatch.setattr(predict_module, "auto_scale", fake_auto_scale)
    image = np.random.default_rng(0).normal(1000, 50, (64, 80)).astype(np.float32)
    first = predict(image, model, "cpu", scale="auto", cache=tmp_path)
    again = predict(image, model, "cpu", scale="auto", cache=tmp_path)
    assert len(calls) == 1 and again.metadata["cached"] is True
    assert first.metadata["scale"] == again.metadata["scale"] == 0.5
    assert again.metadata["scale_estimated"] is True
    predict(image + 10, model, "cpu", scale="auto", cache=tmp_path)  # another image
    predict(image, model, "cpu", scale="auto")  # no cache: estimated again
    assert len(calls) == 3


def test_estimate_scale_without_foreground_is_none():
    empty = prediction_from_masks(np.zeros((1, 40, 40), bool))
    assert estimate_scale(empty, 8.0) is None


def test_auto_scale_finds_worms_twice_the_training_width():
    # the shipped model (object_width about 8 px) on the sample worms drawn twice as large
    sample = make_worms(shape=(260, 348), n_worms=6, well=True, seed=2)
    image = resize(sample.image, (520, 696), order=1, preserve_range=True).astype(np.float32)
    from napari_instseg.core.weights import load_model

    model = load_model()
    assert 0.4 <= auto_scale(image, model, "cpu") <= 0.62
    assert auto_scale(sample.image, model, "cpu") == 1.0
    assert scaled_shape((520, 696), 0.5) == (260, 348)


def test_resize_mask_matches_a_whole_image_resize():
    rng = np.random.default_rng(0)
    for small, big in [((50, 60), (100, 120)), ((100, 120), (50, 60)), ((45, 61), (90, 121))]:
        for _ in range(5):
            mask = np.zeros(small, bool)
            for _ in range(3):
                centre = (rng.integers(0, small[0]), rng.integers(0, small[1]))
                mask[disk(centre, rng.integers(2, 12), shape=small)] = True
            whole = resize(mask.astype(np.float32), big, order=1, anti_aliasing=False) >= 0.5
            ours = resize_mask(mask, big)
            assert (ours != whole).sum() <= max(2, 0.005 * whole.sum())
    assert not resize_mask(np.zeros((10, 10), bool), (20, 20)).any()


def test_grow_on_a_scaled_prediction_runs_on_the_network_grid():
    from napari_instseg.core.grow import Grower, grow

    sample, network, shown = _shown_at_twice_the_size()
    truth = resize_instances(Instances(masks=sample.masks), (200, 240)).masks
    shown.embeddings = np.zeros_like(shown.embeddings)  # every pixel alike on the image grid
    worm = truth[0]
    click = tuple(int(v) for v in np.argwhere(worm)[len(np.argwhere(worm)) // 2])
    blind = grow(shown, [click], tau=0.5, edge_thresholds=None)
    assert (blind & worm).sum() / (blind | worm).sum() < 0.5
    shown.model_grid = network
    for source in (shown, Grower(shown)):
        mask = grow(source, [click], tau=0.5, edge_thresholds=None)
        assert mask.shape == (200, 240) and mask[click]
        assert (mask & worm).sum() / (mask | worm).sum() > 0.9
    with pytest.raises(ValueError, match="outside"):
        grow(shown, [(250, 10)], tau=0.5)
    stale = prediction_from_masks(sample.masks[:, :50, :60])  # not the network's grid
    shown.model_grid = stale
    mask = grow(shown, [click], tau=0.5, edge_thresholds=None)  # the image's grid, as shown
    assert (mask & worm).sum() / (mask | worm).sum() < 0.5 and "scale" not in stale.metadata
    with pytest.raises(ValueError, match="tau"):
        grow(shown, [click], tau=1.5)


def test_resize_sample_keeps_the_instances_that_stay_visible():
    sample = _apart((100, 120), length=(50, 70), width=(7, 9))
    masks = np.concatenate([sample.masks, np.zeros((1, 100, 120), bool)])
    masks[-1, 5, 5] = True  # one pixel: gone at half the size
    sample = Sample(
        image=sample.image,
        masks=masks,
        name="s",
        channels={"w1": sample.image * 2},
        reviewed=np.array([True, False, True, True]),
        classes=np.array([1, 2, 1, 1]),
        metadata={"scale": 0.5, "model": "m"},
    )
    half = at_recorded_scale(sample)
    assert half.image.shape == (50, 60) and half.channels["w1"].shape == (50, 60)
    assert half.masks.shape == (3, 50, 60)
    assert half.reviewed.tolist() == [True, False, True] and half.classes.tolist() == [1, 2, 1]
    assert half.metadata == {"scale": 1.0, "resized_by": 0.5, "model": "m"}
    ratio = object_width(sample.masks[:3]) / object_width(half.masks)
    assert ratio == pytest.approx(2.0, rel=0.12)
    assert at_recorded_scale(half) is half  # recorded 1: as it is
    plain = Sample(image=sample.image, masks=sample.masks)
    assert at_recorded_scale(plain) is plain
    assert resize_sample(plain, 2.0).image.shape == (200, 240)
    with pytest.raises(ValueError, match="numeric"):
        resize_sample(plain, "auto")


def test_segment_at_a_scale_decides_the_outline_on_the_image_pixels():
    from scipy import ndimage

    sample, network, shown = _shown_at_twice_the_size()
    shown.model_grid = network
    truth = resize_instances(Instances(masks=sample.masks), (200, 240)).masks
    wider = np.stack([ndimage.binary_dilation(m) for m in truth])  # one image pixel more
    shown.contrast = np.where(wider.any(0), 0.5, 1.0).astype(np.float32)
    params = {"min_size": 50, "split_factor": 0.0, "untangle_factor": 0.0}
    plain = segment(shown, method="boundary", edge_thresholds=None, **params)
    refined = segment(shown, method="boundary", edge_thresholds=(0.9, 0.9), **params)
    assert len(plain.masks) == len(refined.masks) == 3
    for mask, grown in zip(plain.masks, refined.masks, strict=True):
        # the dark ring one image pixel outside is taken: a band of the image's pixels
        ring = ndimage.binary_dilation(mask) & ~mask
        assert grown[mask].all() and grown[ring].mean() > 0.6
        assert not (grown & ~ndimage.binary_dilation(mask)).any()
