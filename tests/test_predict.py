"""Prediction: shapes, input forms, errors, tiling, the zarr cache, progress."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_instseg.core.model import InstSegNet, ModelConfig
from napari_instseg.core.predict import iter_predict, predict
from napari_instseg.core.types import Prediction


def _model(in_channels: int = 1, seed: int = 0) -> InstSegNet:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        in_channels=in_channels,
        channels=(8, 16, 32),
        embedding_dim=4,
        head_channels=8,
        coord_scale=32.0,
    )
    return InstSegNet(cfg).eval()


@pytest.fixture(scope="module")
def model() -> InstSegNet:
    return _model()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.normal(1000.0, 50.0, (100, 150)).astype(np.float32)
    img[30:40, 20:120] += 400.0  # a bright bar
    return img


@pytest.fixture(scope="module")
def whole(model, image) -> Prediction:
    return predict(image, model, "cpu")


@pytest.fixture
def cli_files(model, tmp_path):
    """The tiny model saved as weights, and three synthetic worms as a uint16 TIFF."""
    import tifffile

    from napari_instseg.core.synthetic import make_worms
    from napari_instseg.core.weights import save_model

    weights = save_model(model, tmp_path / "tiny.safetensors", {"name": "tiny"})
    sample = make_worms(
        shape=(64, 80), n_worms=3, length=(25, 40), width=(5, 7), n_touching=0, seed=0
    )
    image = tmp_path / "worms.tif"
    tifffile.imwrite(image, sample.image.astype(np.uint16))
    return weights, sample, image


def centre_seed_file(mask, path):
    """A seeds CSV with one seed, the middle pixel of ``mask`` in row-major order.

    Returns the path and the seed (row, col).
    """
    r0, c0 = np.argwhere(mask)[len(np.argwhere(mask)) // 2]
    path.write_text(f"row,col\n{r0},{c0}\n")
    return path, (int(r0), int(c0))


def test_a_colour_image_is_its_luminance_and_a_channel_first_three_is_refused(image, model):
    from napari_instseg.core.predict import as_model_input, colour_to_grey

    rng = np.random.default_rng(1)
    rgb = np.stack([image, image * 0.5, rng.uniform(0, 9, image.shape)], -1)
    luminance = 0.2125 * rgb[..., 0] + 0.7154 * rgb[..., 1] + 0.0721 * rgb[..., 2]
    np.testing.assert_allclose(as_model_input(rgb, 1)[0], luminance, rtol=1e-5)
    rgba = np.concatenate([rgb, np.full(image.shape + (1,), 255.0)], -1)
    np.testing.assert_allclose(as_model_input(rgba, 1)[0], luminance, rtol=1e-5)
    np.testing.assert_allclose(colour_to_grey(np.moveaxis(rgb, -1, 0)), luminance, rtol=1e-5)
    one = np.stack([image])
    assert colour_to_grey(one) is one and colour_to_grey(np.moveaxis(rgb, -1, 0), 3).shape[0] == 3
    grey = predict(luminance.astype(np.float32), model, "cpu", tta=1)
    np.testing.assert_allclose(predict(rgb, model, "cpu", tta=1).foreground, grey.foreground)
    # three planes first could be a stack as well as colour: refused, with the hint
    with pytest.raises(ValueError, match="plane by plane"):
        as_model_input(np.moveaxis(rgb, -1, 0), 1)


def test_shapes_and_probabilities(whole, image, model):
    h, w = image.shape
    cfg = model.config
    assert whole.embeddings.shape == (cfg.embedding_dim, h, w)
    assert whole.class_scores.shape == (len(cfg.taus), cfg.n_classes + 1, h, w)
    for name in ("seediness", "boundary", "foreground"):
        arr = getattr(whole, name)
        assert arr.shape == (h, w) and arr.dtype == np.float32
        assert (arr >= 0).all() and (arr <= 1).all()
    np.testing.assert_allclose(whole.class_scores.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(whole.seediness, whole.class_scores[:, 1:].max(axis=(0, 1)))
    assert whole.taus == tuple(cfg.taus)
    assert whole.metadata["cached"] is False and whole.metadata["tiles"] == 1
    assert whole.metadata["model_sha256"] is None  # an unsaved model has no file signature


def test_input_forms_agree(model, image, whole):
    chw = predict(image[None], model, "cpu")
    np.testing.assert_array_equal(chw.embeddings, whole.embeddings)
    two = _model(in_channels=2)
    stack = np.stack([image, image[::-1]])
    a = predict(stack, two, "cpu")  # (C, H, W)
    b = predict(np.moveaxis(stack, 0, -1), two, "cpu")  # (H, W, C)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    np.testing.assert_array_equal(a.foreground, b.foreground)
    # integer images are fine too
    ints = predict(image.astype(np.uint16), model, "cpu")
    assert ints.embeddings.shape == whole.embeddings.shape


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.full((32, 32), np.nan, np.float32), "NaN"),
        (np.zeros((2, 1, 32, 32), np.float32), "2D image"),
        (np.zeros((3, 32, 32), np.float32), "channel"),
        (np.zeros((5, 32, 32), np.float32), "5 planes of a stack or time series"),
        (np.zeros((0, 32), np.float32), "empty"),
        (np.array([["a", "b"], ["c", "d"]]), "numeric"),
        (np.zeros((4, 4), np.float32), "too small"),
    ],
)
def test_bad_inputs(model, bad, match):
    with pytest.raises(ValueError, match=match):
        predict(bad, model, "cpu")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tile_size": 0}, "tile_size must be an integer >= 16"),
        ({"tile_size": 8}, "tile_size must be"),
        ({"tile_size": 64.5}, "tile_size must be"),
        ({"halo": -5}, "halo must be an integer >= 0"),
    ],
)
def test_bad_tiling_is_rejected(model, image, kwargs, match):
    with pytest.raises(ValueError, match=match):
        predict(image, model, "cpu", **kwargs)


def test_inf_is_rejected(model):
    img = np.zeros((32, 32), np.float32)
    img[3, 3] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        predict(img, model, "cpu")


@pytest.mark.parametrize(("tile", "halo"), [(64, 64), (48, 32)])
def test_tiled_equals_whole(model, image, whole, tile, halo):
    calls = []
    tiled = predict(
        image, model, "cpu", tile_size=tile, halo=halo, progress=lambda d, t: calls.append((d, t))
    )
    assert tiled.metadata["tiles"] > 1
    for name in ("embeddings", "class_scores", "boundary", "foreground", "seediness"):
        np.testing.assert_allclose(getattr(tiled, name), getattr(whole, name), atol=1e-4)
    total = tiled.metadata["tiles"]
    assert calls == [(i, total) for i in range(1, total + 1)]


def test_iter_predict_yields_progress_then_returns(model, image, whole):
    gen = iter_predict(image, model, "cpu", tile_size=64, halo=64)
    steps = []
    while True:
        try:
            steps.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    assert len(steps) > 1 and steps[-1][0] == steps[-1][1] == len(steps)
    assert isinstance(result, Prediction)
    np.testing.assert_allclose(result.embeddings, whole.embeddings, atol=1e-4)


def test_zarr_cache(model, image, tmp_path):
    cache = tmp_path / "cache"
    first = predict(image, model, "cpu", cache=cache)
    assert first.metadata["cached"] is False
    stores = sorted(cache.glob("*.zarr"))
    assert len(stores) == 1
    calls = []
    second = predict(image, model, "cpu", cache=cache, progress=lambda d, t: calls.append((d, t)))
    assert second.metadata["cached"] is True
    assert calls[-1][0] == calls[-1][1]
    for name in ("embeddings", "class_scores", "boundary", "foreground", "seediness"):
        np.testing.assert_array_equal(getattr(second, name), getattr(first, name))
    assert second.taus == first.taus
    assert len(list(cache.glob("*.zarr"))) == 1

    # re-tuning changes the weights' metadata, not their tensors: the cached maps are
    # reused, but the segmentation parameters come from the model as it is now
    tuned = {"boundary": {"boundary_threshold": 0.9}}
    model.metadata = {
        **(getattr(model, "metadata", {}) or {}),
        "segment_params": tuned,
        "recommended_method": "boundary",
    }
    try:
        retuned = predict(image, model, "cpu", cache=cache)
    finally:
        model.metadata = {
            k: v
            for k, v in model.metadata.items()
            if k not in ("segment_params", "recommended_method")
        }
    assert retuned.metadata["cached"] is True
    assert retuned.metadata["segment_params"] == tuned
    assert retuned.metadata["recommended_method"] == "boundary"

    # a changed image, a changed model, or other tiling: a new key, never the stale entry
    changed = image.copy()
    changed[0, 0] += 1.0
    assert predict(changed, model, "cpu", cache=cache).metadata["cached"] is False
    assert len(list(cache.glob("*.zarr"))) == 2
    other = _model(seed=0)
    with torch.no_grad():
        next(other.embedding_head.parameters()).add_(0.5)
    new = predict(image, other, "cpu", cache=cache)
    assert new.metadata["cached"] is False
    assert not np.array_equal(new.embeddings, first.embeddings)
    assert len(list(cache.glob("*.zarr"))) == 3
    assert predict(image, model, "cpu", tile_size=64, cache=cache).metadata["cached"] is False
    assert len(list(cache.glob("*.zarr"))) == 4
    # an incomplete entry (e.g. killed while writing) is recomputed, not trusted
    import zarr

    for store in cache.glob("*.zarr"):
        zarr.open_group(str(store), mode="r+").attrs["complete"] = False
    again = predict(image, model, "cpu", cache=cache)
    assert again.metadata["cached"] is False
    np.testing.assert_array_equal(again.embeddings, first.embeddings)


def test_model_from_path(model, image, whole, tmp_path):
    from napari_instseg.core.weights import save_model

    path = save_model(model, tmp_path / "m.safetensors", {"name": "tiny"})
    pred = predict(image, path, "cpu")
    np.testing.assert_allclose(pred.embeddings, whole.embeddings, atol=1e-6)
    assert pred.metadata["model"] == "tiny" and pred.metadata["model_sha256"]


def test_cli_predict(model, cli_files, tmp_path, capsys):
    import pandas as pd
    import tifffile

    from napari_instseg.cli import main

    weights, sample, single = cli_files
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.stack([sample.image, sample.image[::-1]]).astype(np.uint16))
    out = tmp_path / "out"
    argv = ["predict", str(single), str(stack), "--out", str(out), "--model", str(weights)]
    argv += ["--device", "cpu", "--save-maps", "--method", "seeds", "--cache", str(out / "c")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "worms.tif: 1 plane(s)" in printed and "stack.tif: 2 plane(s)" in printed

    labels = tifffile.imread(out / "worms_labels.tif")
    assert labels.shape == (64, 80) and labels.dtype.kind == "u"
    assert tifffile.imread(out / "stack_labels.tif").shape == (2, 64, 80)
    emb = tifffile.imread(out / "worms_embeddings.tif")
    assert emb.shape == (model.config.embedding_dim, 64, 80) and emb.dtype == np.float32
    for key in ("seediness", "boundary", "foreground"):
        assert tifffile.imread(out / f"worms_{key}.tif").shape == (64, 80)
        assert tifffile.imread(out / f"stack_{key}.tif").shape == (2, 64, 80)
    table = pd.read_csv(out / "stack_measurements.csv")
    assert {"image", "plane"} <= set(table.columns)
    assert set(table["plane"]) <= {0, 1}
    measured = pd.read_csv(out / "worms_measurements.csv")
    assert len(measured) >= len(np.unique(labels)) - 1  # every visible label is measured
    # worms.tif and the stack's first plane are the same image: one cache entry for both
    assert len(list((out / "c").glob("*.zarr"))) == 2

    # clear errors, non-zero status
    assert main(["predict", str(tmp_path / "nope.tif"), "--out", str(out)]) == 1
    assert "nope.tif" in capsys.readouterr().err
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"not weights")
    argv = ["predict", str(single), "--out", str(out), "--model", str(bad), "--overwrite"]
    assert main(argv) == 1
    assert "safetensors" in capsys.readouterr().err


def test_cli_predict_never_overwrites_inputs_nor_silently_earlier_outputs(
    cli_files, tmp_path, capsys
):
    import shutil

    import tifffile

    from napari_instseg.cli import main

    weights, _, single = cli_files
    out = tmp_path / "ov"
    out.mkdir()
    image = shutil.copy(single, out / "w.tif")
    other = shutil.copy(single, out / "w_labels.tif")  # w.tif's labels would land on it
    before = (out / "w_labels.tif").read_bytes()
    common = ["--model", str(weights), "--device", "cpu", "--tta", "1"]
    argv = ["predict", str(image), str(other), "--out", str(out), *common]
    for extra in ([], ["--overwrite"]):  # never, not even with --overwrite
        assert main([*argv, *extra]) == 1
        err = capsys.readouterr().err
        assert "would overwrite the input" in err and "w_labels.tif" in err
        assert (out / "w_labels.tif").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["w.tif", "w_labels.tif"]  # no work done

    # earlier outputs: refused, naming them, unless --overwrite
    res = tmp_path / "res"
    argv = ["predict", str(single), "--out", str(res), *common]
    assert main(argv) == 0
    first = tifffile.imread(res / "worms_labels.tif")
    (res / "worms_labels.tif").write_bytes(b"")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "already holds" in err and "worms_labels.tif" in err and "--overwrite" in err
    assert (res / "worms_labels.tif").read_bytes() == b""
    assert main([*argv, "--overwrite"]) == 0
    np.testing.assert_array_equal(tifffile.imread(res / "worms_labels.tif"), first)
    # an earlier run's maps are outputs too: not left beside labels they do not match
    assert main([*argv, "--overwrite", "--save-maps"]) == 0
    assert (res / "worms_boundary.tif").exists()
    assert main(argv) == 1 and "worms_boundary.tif" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert not (res / "worms_boundary.tif").exists()

    # --out that is a file (here: the input itself): a clear error, not a traceback
    assert main(["predict", str(single), "--out", str(single), *common]) == 1
    assert "exists and is not a folder" in capsys.readouterr().err


def test_cli_predict_goes_on_after_a_bad_image_and_names_it(cli_files, tmp_path, capsys):
    import tifffile

    from napari_instseg.cli import main

    weights, sample, single = cli_files
    nan = tmp_path / "nan.tif"
    tifffile.imwrite(nan, np.full((64, 80), np.nan, np.float32))
    two = tmp_path / "two.tif"  # two channels: not what the grey model takes
    tifffile.imwrite(
        two, np.stack([sample.image] * 2).astype(np.float32), metadata={"axes": "CYX"}
    )
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"hello, not a TIFF")
    out = tmp_path / "out"
    argv = ["predict", str(nan), str(single), str(two), str(broken), "--out", str(out)]
    assert main([*argv, "--model", str(weights), "--device", "cpu", "--tta", "1"]) == 1
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 3
    for line, path in zip(errors, (nan, two, broken), strict=True):
        assert line.startswith(f"napari-instseg predict: error: {path}: ")
    assert "NaN" in errors[0] and "channel" in errors[1]
    assert "worms.tif: 1 plane(s)" in captured.out  # the good image after the bad one
    assert sorted(p.name for p in out.glob("*_labels.tif")) == ["worms_labels.tif"]


def test_cli_predict_and_grow_take_a_colour_file_as_its_grey_luminance(
    cli_files, tmp_path, capsys
):
    import tifffile

    from napari_instseg.cli import main

    weights, sample, single = cli_files
    grey = (255 * sample.image / sample.image.max()).astype(np.uint8)
    tifffile.imwrite(tmp_path / "grey.tif", grey)
    tifffile.imwrite(tmp_path / "rgb.tif", np.stack([grey] * 3, -1), photometric="rgb")
    common = ["--model", str(weights), "--device", "cpu", "--tta", "1", "--out"]
    for name in ("grey", "rgb"):
        argv = ["predict", str(tmp_path / f"{name}.tif"), "--save-maps", *common]
        assert main([*argv, str(tmp_path / name)]) == 0
    capsys.readouterr()
    maps = {n: tifffile.imread(tmp_path / n / f"{n}_foreground.tif") for n in ("grey", "rgb")}
    # grey R = G = B: the luminance is the grey image (weights sum to 1), so the same maps
    assert maps["rgb"].shape == grey.shape
    np.testing.assert_allclose(maps["rgb"], maps["grey"], atol=1e-5)
    r, c = np.argwhere(sample.masks[0])[len(np.argwhere(sample.masks[0])) // 2]
    (tmp_path / "seeds.csv").write_text(f"row,col\n{r},{c}\n")
    argv = ["grow", str(tmp_path / "rgb.tif"), "--seeds", str(tmp_path / "seeds.csv")]
    assert main([*argv, *common, str(tmp_path / "g")]) == 0
    assert tifffile.imread(tmp_path / "g" / "rgb_labels.tif")[r, c] == 1


@pytest.mark.parametrize("kind", ["folder", "pattern"])
def test_cli_predict_folders_and_patterns_need_a_zarr_out(cli_files, tmp_path, capsys, kind):
    from napari_instseg.cli import main

    weights, _, single = cli_files
    given = single.parent if kind == "folder" else single.parent / "*.tif"
    assert (
        main(["predict", str(given), "--out", str(tmp_path / "o"), "--model", str(weights)]) == 1
    )
    err = capsys.readouterr().err
    assert str(given) in err and "need --out <name>.zarr" in err


def _maps(p: Prediction) -> dict[str, np.ndarray]:
    return {"boundary": p.boundary, "foreground": p.foreground, "class_scores": p.class_scores}


def test_tta_averages_the_dihedral_group_and_keeps_embeddings(model, image):
    img = image[:96, :128]  # both sides multiples of the divisor: no padding to move
    assert img.shape[0] % model.config.divisor == 0 and img.shape[1] % model.config.divisor == 0
    plain = predict(img, model, "cpu")
    tta = predict(img, model, "cpu", tta=8)
    assert tta.metadata["tta"] == 8 and plain.metadata["tta"] == 1
    np.testing.assert_array_equal(tta.embeddings, plain.embeddings)
    np.testing.assert_allclose(tta.class_scores.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(tta.seediness, tta.class_scores[:, 1:].max(axis=(0, 1)))
    # the mean over all 8 flips/transposes is exactly equivariant: flipping or transposing
    # the image flips or transposes the maps; a single pass of this untrained net is not
    for transform in (
        lambda a: a[..., ::-1],
        lambda a: a[..., ::-1, :],
        lambda a: a.swapaxes(-2, -1),
    ):
        moved = predict(np.ascontiguousarray(transform(img)), model, "cpu", tta=8)
        moved_plain = predict(np.ascontiguousarray(transform(img)), model, "cpu")
        for name, arr in _maps(tta).items():
            np.testing.assert_allclose(_maps(moved)[name], transform(arr), atol=1e-5)
        gap = np.abs(moved_plain.foreground - transform(plain.foreground)).max()
        assert gap > 1e-4  # 10x the tolerance above: without tta the check would fail
    # tta=4 (the flips) is equivariant under flips; progress after every pass
    calls = []
    four = predict(img, model, "cpu", tta=4, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    flipped = predict(np.ascontiguousarray(img[:, ::-1]), model, "cpu", tta=4)
    np.testing.assert_allclose(flipped.foreground, four.foreground[:, ::-1], atol=1e-5)


@pytest.mark.parametrize("tta", [0, 3, 16, 2.0])
def test_bad_tta_is_rejected(model, image, tta):
    with pytest.raises(ValueError, match="tta must be"):
        predict(image, model, "cpu", tta=tta)


def test_tta_is_part_of_the_cache_key(model, image, tmp_path):
    first = predict(image, model, "cpu", cache=tmp_path)
    again = predict(image, model, "cpu", tta=2, cache=tmp_path)
    assert first.metadata["cached"] is False and again.metadata["cached"] is False
    assert not np.array_equal(first.foreground, again.foreground)
    assert predict(image, model, "cpu", tta=2, cache=tmp_path).metadata["cached"] is True


@pytest.mark.parametrize(
    "change", [{"semi_conv": False}, {"coord_scale": 64.0}, {"taus": (0.2, 0.4, 0.6, 0.8)}]
)
def test_the_architecture_is_part_of_the_cache_key(image, tmp_path, change):
    """Same tensors, other architecture (coordinates, their scale, the taus): other maps,
    so never the cached entry of the first (issue 4: a stale cache is never reused)."""
    from dataclasses import replace

    from napari_instseg.core.weights import model_signature

    first = _model()
    torch.manual_seed(0)
    other = InstSegNet(replace(first.config, **change)).eval()
    other.load_state_dict(first.state_dict())
    assert model_signature(other) == model_signature(first)  # the tensors alone agree
    predict(image, first, "cpu", cache=tmp_path)
    cached = predict(image, other, "cpu", cache=tmp_path)
    fresh = predict(image, other, "cpu")
    assert cached.metadata["cached"] is False
    assert cached.taus == fresh.taus == other.config.taus
    np.testing.assert_array_equal(cached.embeddings, fresh.embeddings)
    assert predict(image, other, "cpu", cache=tmp_path).metadata["cached"] is True


def test_precision_rules(monkeypatch):
    from napari_instseg.cli.predict import PRECISIONS as CLI_PRECISIONS
    from napari_instseg.core import device as device_module
    from napari_instseg.core.device import PRECISIONS, inference_dtype

    cpu = torch.device("cpu")
    assert CLI_PRECISIONS == PRECISIONS
    assert inference_dtype(cpu, "float32") is torch.float32
    assert inference_dtype(cpu, "bfloat16") is torch.bfloat16
    monkeypatch.setattr(device_module, "cpu_has_native_bfloat16", lambda: True)
    assert inference_dtype(cpu) is torch.bfloat16
    monkeypatch.setattr(device_module, "cpu_has_native_bfloat16", lambda: False)
    assert inference_dtype(cpu) is torch.float32  # emulated bfloat16 would be slower
    with pytest.raises(ValueError, match="Unknown precision"):
        inference_dtype(cpu, "float16")
    with pytest.raises(ValueError, match="MPS"):
        inference_dtype(torch.device("mps"), "bfloat16")
    assert isinstance(device_module.cpu_has_native_bfloat16(), bool)


def test_bfloat16_maps_are_close_to_float32_and_cached_apart(model, image, tmp_path):
    full = predict(image, model, "cpu", precision="float32", cache=tmp_path)
    half = predict(image, model, "cpu", precision="bfloat16", cache=tmp_path)
    assert (full.metadata["precision"], half.metadata["precision"]) == ("float32", "bfloat16")
    assert half.metadata["cached"] is False  # not the float32 entry
    assert not np.array_equal(full.foreground, half.foreground)
    for key in ("foreground", "boundary", "seediness"):
        np.testing.assert_allclose(getattr(half, key), getattr(full, key), atol=0.05)
    spread = full.embeddings.std()
    assert np.abs(half.embeddings - full.embeddings).max() < 0.1 * spread
    assert predict(image, model, "cpu", precision="bfloat16", cache=tmp_path).metadata["cached"]
    with pytest.raises(ValueError, match="Unknown precision"):
        predict(image, model, "cpu", precision="half")


def test_auto_precision_without_hardware_bfloat16_is_float32(model, image, tmp_path, monkeypatch):
    from napari_instseg.core import device as device_module

    monkeypatch.setattr(device_module, "cpu_has_native_bfloat16", lambda: False)
    first = predict(image, model, "cpu", precision="float32", cache=tmp_path)
    auto = predict(image, model, "cpu", cache=tmp_path)
    assert first.metadata["cached"] is False
    assert auto.metadata["cached"] is True  # same key: float32 caches stay valid
    assert auto.metadata["precision"] == "float32"


def test_cli_grow_matches_the_python_api(model, cli_files, tmp_path, capsys):
    import pandas as pd
    import tifffile

    from napari_instseg.cli import main
    from napari_instseg.core.grow import grow

    weights, sample, image = cli_files
    centres = [np.argwhere(m)[len(np.argwhere(m)) // 2] for m in sample.masks]
    (r0, c0), (r1, c1) = centres[0], centres[1]
    seeds = tmp_path / "seeds.csv"  # worm 7: two clicks; worm 3: one click and a negative
    seeds.write_text(
        f"worm,row,col,positive\n7,{r0},{c0},1\n3,{r1},{c1},yes\n7,{r0 + 1},{c0},1\n"
        f"3,{r0},{c0},0\n"
    )
    out = tmp_path / "out"
    argv = ["grow", str(image), "--seeds", str(seeds), "--out", str(out)]
    argv += ["--model", str(weights), "--device", "cpu", "--tta", "1", "--tau", "0.3"]
    assert main(argv) == 0
    assert "2 worm(s) grown (tau 0.3" in capsys.readouterr().out
    labels = tifffile.imread(out / "worms_labels.tif")
    prediction = predict(sample.image.astype(np.uint16), model, "cpu")
    first = grow(prediction, [(r0, c0), (r0 + 1, c0)], tau=0.3)
    second = grow(prediction, [(r1, c1)], tau=0.3, negative=[(r0, c0)])
    # labels 1, 2 in the order the worms first appear; overlaps show the smaller worm
    assert ((labels == 1) | (labels == 2)).sum() == (first | second).sum()
    assert ((labels == 1) & ~first).sum() == 0 and ((labels == 2) & ~second).sum() == 0
    assert labels[r0, c0] == 1 and labels[r1, c1] == 2
    table = pd.read_csv(out / "worms_measurements.csv")
    assert table["worm"].tolist() == [7, 3]
    assert table["area"].tolist() == [int(first.sum()), int(second.sum())]

    # napari's Points export of a stack: axis-0 is the plane; plane 1 has no seeds
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.stack([sample.image] * 2).astype(np.uint16))
    points = tmp_path / "points.csv"
    points.write_text(f"index,axis-0,axis-1,axis-2\n0,0.0,{r0 + 0.2},{c0 - 0.3}\n")
    argv = ["grow", str(stack), "--seeds", str(points), "--out", str(out)]
    assert main([*argv, "--model", str(weights), "--device", "cpu", "--tta", "1"]) == 0
    stacked = tifffile.imread(out / "stack_labels.tif")
    assert stacked.shape == (2, 64, 80) and not stacked[1].any()
    np.testing.assert_array_equal(stacked[0] > 0, grow(prediction, (r0, c0)))

    # clear errors, non-zero status
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,2\n")
    assert main([*argv[:3], str(bad), *argv[4:], "--model", str(weights)]) == 1
    assert "needs columns row and col" in capsys.readouterr().err
    points.write_text("index,axis-0,axis-1,axis-2\n0,5,10,10\n")
    assert main([*argv, "--model", str(weights)]) == 1
    assert "plane(s) [5]" in capsys.readouterr().err
    assert main([*argv, "--model", str(weights), "--tau", "1.5"]) == 1


def test_cli_grow_refuses_to_overwrite_seeds_or_earlier_outputs(cli_files, tmp_path, capsys):
    from napari_instseg.cli import main

    weights, sample, image = cli_files
    r0, c0 = np.argwhere(sample.masks[0])[len(np.argwhere(sample.masks[0])) // 2]
    out = tmp_path / "out"
    out.mkdir()
    seeds = out / "worms_measurements.csv"  # where the measurements would go
    seeds.write_text(f"row,col\n{r0},{c0}\n")
    common = ["--model", str(weights), "--device", "cpu", "--tta", "1"]
    argv = ["grow", str(image), "--seeds", str(seeds), "--out", str(out), *common]
    assert main([*argv, "--overwrite"]) == 1
    assert "would overwrite the input" in capsys.readouterr().err
    assert seeds.read_text() == f"row,col\n{r0},{c0}\n" and not (out / "worms_labels.tif").exists()
    res = tmp_path / "res"
    argv = ["grow", str(image), "--seeds", str(seeds), "--out", str(res), *common]
    assert main(argv) == 0
    assert main(argv) == 1
    assert "already holds ['worms_labels.tif'" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert (res / "worms_measurements.csv").exists()


def test_cli_grow_with_nothing_grown_leaves_no_earlier_table(cli_files, tmp_path, monkeypatch):
    import tifffile

    from napari_instseg.cli import main
    from napari_instseg.core import grow as grow_module

    weights, sample, image = cli_files
    seeds, (r0, c0) = centre_seed_file(sample.masks[0], tmp_path / "seeds.csv")
    res = tmp_path / "res"
    argv = ["grow", str(image), "--seeds", str(seeds), "--out", str(res), "--model"]
    argv += [str(weights), "--device", "cpu", "--tta", "1"]
    assert main(argv) == 0 and (res / "worms_measurements.csv").exists()
    monkeypatch.setattr(grow_module, "FG_FLOOR", 1.01)  # every seed now on "background"
    assert main([*argv, "--overwrite"]) == 0
    assert not (res / "worms_measurements.csv").exists()  # not the earlier run's worms
    assert tifffile.imread(res / "worms_labels.tif").max() == 0


def test_cli_grow_skips_seeds_on_background_and_warns_about_ignored_flags(
    model, cli_files, tmp_path, capsys, monkeypatch
):
    import pandas as pd
    import tifffile

    from napari_instseg.cli import main
    from napari_instseg.core import predict as predict_module

    weights, sample, image = cli_files
    real = predict_module.predict

    def background_corner(*args, **kwargs):  # no background in the untrained model's map
        prediction = real(*args, **kwargs)
        prediction.foreground[:8, :8] = 0.01
        return prediction

    monkeypatch.setattr(predict_module, "predict", background_corner)
    centres = [np.argwhere(m)[len(np.argwhere(m)) // 2] for m in sample.masks]
    (r0, c0), (r1, c1) = centres[0], centres[1]
    assert not sample.masks[:, :8, :8].any()
    seeds = tmp_path / "seeds.csv"  # worm 1: background only; worm 2: one seed on it
    seeds.write_text(f"worm,row,col\n1,2,3\n2,4,5\n2,{r0},{c0}\n3,{r1},{c1}\n")
    out = tmp_path / "out"
    argv = ["grow", str(image), "--seeds", str(seeds), "--out", str(out), "--tta", "1"]
    argv += ["--model", str(weights), "--device", "cpu"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    warnings = captured.err.strip().splitlines()
    assert all(w.startswith("napari-instseg grow: warning: ") for w in warnings)
    assert "seed (2,3) is on background" in warnings[0] and "worm 1 " in warnings[1]
    assert "seed (4,5) is on background" in warnings[2] and len(warnings) == 3
    assert "2 worm(s) grown" in captured.out
    assert pd.read_csv(out / "worms_measurements.csv")["worm"].tolist() == [2, 3]
    labels = tifffile.imread(out / "worms_labels.tif")
    assert not labels[:8, :8].any() and set(np.unique(labels)) == {0, 1, 2}

    # flags of the embedding growth: a warning when the worms start from the segments
    seeds.write_text(f"row,col\n{r0},{c0}\n")
    flags = ["--no-clip", "--boundary-barrier", "0.5", "--overwrite"]
    assert main([*argv, *flags, "--from", "segments"]) == 0
    err = capsys.readouterr().err
    assert "--boundary-barrier, --no-clip: worms start from the automatic segments" in err
    assert main([*argv, *flags, "--from", "embedding"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main([*argv, "--from", "segments", "--overwrite"]) == 0  # not given: no warning
    assert "warning" not in capsys.readouterr().err
    # unclipped embedding growth asked for: a seed on background is kept, as in Python
    seeds.write_text("worm,row,col\n1,2,3\n")
    assert main([*argv, "--no-clip", "--from", "embedding", "--overwrite"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert tifffile.imread(out / "worms_labels.tif")[2, 3] == 1


def test_cli_grow_from_segments_matches_the_python_api(model, cli_files, tmp_path):
    import tifffile

    from napari_instseg.cli import main
    from napari_instseg.core.pick import grow_from_segments

    weights, sample, image = cli_files
    seeds, (r0, c0) = centre_seed_file(sample.masks[0], tmp_path / "seeds.csv")
    out = tmp_path / "out"
    argv = ["grow", str(image), "--seeds", str(seeds), "--out", str(out), "--tta", "1"]
    argv += ["--model", str(weights), "--device", "cpu", "--from", "segments"]
    assert main(argv) == 0
    labels = tifffile.imread(out / "worms_labels.tif")
    prediction = predict(sample.image.astype(np.uint16), model, "cpu")
    expected = grow_from_segments(prediction, [(r0, c0)])
    np.testing.assert_array_equal(labels > 0, expected)
    with pytest.raises(SystemExit):  # not a choice: argparse's usage error
        main([*argv[:-1], "sideways"])


def test_cli_predict_contrast_outlines_switch(cli_files, tmp_path):
    import argparse

    import tifffile

    from napari_instseg.cli import main
    from napari_instseg.cli.predict import _segment_overrides, configure

    parser = argparse.ArgumentParser()
    configure(parser)
    on = parser.parse_args(["x.tif", "--out", "o"])
    off = parser.parse_args(["x.tif", "--out", "o", "--no-contrast-outlines"])
    assert _segment_overrides(on) == {}
    assert _segment_overrides(off) == {"edge_thresholds": None}
    keep = parser.parse_args(["x.tif", "--out", "o", "--no-debris-filter"])
    assert _segment_overrides(keep) == {"blob_filter": None}
    weights, _, single = cli_files
    out = tmp_path / "out"
    argv = ["predict", str(single), "--out", str(out), "--model", str(weights)]
    assert main([*argv, "--device", "cpu", "--no-contrast-outlines", "--no-debris-filter"]) == 0
    assert tifffile.imread(out / "worms_labels.tif").shape == (64, 80)


def test_cli_predict_scale(cli_files, tmp_path, capsys):
    import argparse

    import tifffile

    from napari_instseg.cli import main
    from napari_instseg.cli.predict import configure

    parser = argparse.ArgumentParser()
    configure(parser)
    assert parser.parse_args(["x.tif", "--out", "o"]).scale == 1.0
    assert parser.parse_args(["x.tif", "--out", "o", "--scale", "auto"]).scale == "auto"
    assert parser.parse_args(["x.tif", "--out", "o", "--scale", "0.5"]).scale == 0.5
    with pytest.raises(SystemExit):
        parser.parse_args(["x.tif", "--out", "o", "--scale", "0"])
    assert "scale must be in" in capsys.readouterr().err
    weights, _, single = cli_files
    out = tmp_path / "out"
    argv = ["predict", str(single), "--out", str(out), "--model", str(weights), "--save-maps"]
    assert main([*argv, "--device", "cpu", "--scale", "0.5"]) == 0
    assert tifffile.imread(out / "worms_labels.tif").shape == (64, 80)  # the image's grid
    assert tifffile.imread(out / "worms_foreground.tif").shape == (64, 80)
    # a model without a training width cannot estimate the scale: a clear error
    assert main([*argv, "--device", "cpu", "--scale", "auto", "--overwrite"]) == 1
    assert "object_width" in capsys.readouterr().err


def test_prediction_nbytes_counts_the_network_grid(model, image):
    plain = predict(image, model, "cpu")
    arrays = (plain.embeddings, plain.seediness, plain.class_scores, plain.boundary)
    expected = sum(a.nbytes for a in arrays + (plain.foreground, plain.contrast))
    assert plain.nbytes == expected
    scaled = predict(image, model, "cpu", scale=0.5)
    assert scaled.model_grid is not None
    assert scaled.nbytes == expected + scaled.model_grid.nbytes > expected


def test_widget_memory_cache_is_bounded_by_bytes(model, monkeypatch):
    from napari_instseg._napari import compute

    made = []

    def fake_predict_image(image, **kwargs):
        made.append(image)
        return predict(image, model, "cpu", precision="float32")

    monkeypatch.setattr(compute, "predict_image", fake_predict_image)
    monkeypatch.setattr(compute, "_PREDICTIONS", type(compute._PREDICTIONS)())
    rng = np.random.default_rng(3)
    images = [rng.normal(100, 10, (48, 64)).astype(np.float32) for _ in range(4)]
    one = predict(images[0], model, "cpu", precision="float32").nbytes
    monkeypatch.setattr(compute, "_MAX_CACHED_BYTES", int(2.5 * one))
    for im in images:
        compute.cached_predict(im)
    # two fit within 2.5 predictions' bytes: the two newest stay, the older were dropped
    assert [compute.is_cached(im) for im in images] == [False, False, True, True]
    compute.cached_predict(images[3])  # from memory: no new prediction
    assert len(made) == 4
    monkeypatch.setattr(compute, "_MAX_CACHED_BYTES", one // 2)
    compute.cached_predict(images[0])
    assert compute.is_cached(images[0])  # the newest is kept even when it alone is too big
    assert not compute.is_cached(images[3])


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_cli_predict_precision_reaches_the_network(model, cli_files, tmp_path, precision):
    import tifffile

    from napari_instseg.cli import main

    weights, sample, single = cli_files
    out = tmp_path / "out"
    argv = ["predict", str(single), "--out", str(out), "--model", str(weights), "--save-maps"]
    assert main([*argv, "--device", "cpu", "--tta", "1", "--precision", precision]) == 0
    image = tifffile.imread(single)
    expected = predict(image, model, "cpu", precision=precision).foreground
    np.testing.assert_allclose(tifffile.imread(out / "worms_foreground.tif"), expected, atol=1e-6)


def test_cli_predict_says_which_options_the_kind_of_run_ignores(cli_files, tmp_path, capsys):
    from napari_instseg.cli import main

    weights, _, image = cli_files
    common = ["--model", str(weights), "--device", "cpu", "--tta", "1"]
    argv = ["predict", str(image), "--out", str(tmp_path / "res"), *common]
    assert main([*argv, "--workers", "4", "--no-resume"]) == 0
    err = capsys.readouterr().err
    assert "--workers, --no-resume have no effect without --out *.zarr" in err
    # a batch-only option is ignored, not checked, without --out *.zarr: said in the singular
    assert main([*argv, "--overwrite", "--halo", "-3"]) == 0
    assert "--halo has no effect without --out *.zarr" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--chunk-size", "8"], "--chunk-size must be at least 16, got 8"),
        (
            ["--halo", "4"],
            "--halo must be at least 8 (instances are matched in the overlap), got 4",
        ),
    ],
)
def test_cli_batch_names_the_one_bad_option(cli_files, tmp_path, capsys, option, message):
    """A bad --chunk-size or --halo is named alone, with the real minimum, before any work."""
    from napari_instseg.cli import main

    weights, _, image = cli_files
    out = tmp_path / "res.zarr"
    argv = ["predict", str(image), "--out", str(out), "--model", str(weights), "--tta", "1"]
    assert main([*argv, "--device", "cpu", *option]) == 1
    err = capsys.readouterr().err
    assert message in err
    other = "--halo" if option[0] == "--chunk-size" else "--chunk-size"
    assert other not in err and not out.exists()


def test_cli_predict_and_grow_say_the_estimated_scale(
    model, cli_files, tmp_path, capsys, monkeypatch
):
    """With --scale auto the line printed per image names the factor that was chosen."""
    import napari_instseg.core.predict as predict_module
    from napari_instseg.cli import main
    from napari_instseg.core.weights import save_model

    monkeypatch.setattr(predict_module, "auto_scale", lambda image, *a, **k: 0.75)
    _, sample, image = cli_files
    weights = save_model(model, tmp_path / "wide.safetensors", {"object_width": 8.0})
    common = ["--model", str(weights), "--device", "cpu", "--tta", "1"]
    assert main(["predict", str(image), "--out", str(tmp_path / "p"), *common]) == 0
    assert "estimated scale" not in capsys.readouterr().out  # --scale 1: nothing to say
    argv = ["predict", str(image), "--out", str(tmp_path / "a"), "--scale", "auto", *common]
    assert main(argv) == 0
    assert ", estimated scale 0.75)" in capsys.readouterr().out
    seeds, _ = centre_seed_file(sample.masks[0], tmp_path / "seeds.csv")
    argv = ["grow", str(image), "--seeds", str(seeds), "--out", str(tmp_path / "g")]
    argv += ["--scale", "auto", "--from", "embedding", "--no-clip", *common]
    assert main(argv) == 0
    assert ", estimated scale 0.75)" in capsys.readouterr().out


def test_cli_evaluate_reads_what_predict_wrote(cli_files, tmp_path, monkeypatch):
    """predict -> evaluate: the labels TIFFs and the table's scores are the predictions."""
    import json

    import pandas as pd
    import tifffile

    from napari_instseg.cli import main
    from napari_instseg.cli import predict as predict_cli
    from napari_instseg.cli.evaluate import read_prediction_folder
    from napari_instseg.core.training_folder import write_training_folder
    from napari_instseg.core.types import Instances

    weights, sample, image = cli_files
    found = Instances(masks=sample.masks[:2], scores=np.array([0.4, 0.9], np.float32))
    # (the tiny untrained model finds nothing: its segmentation is the truth's first two)
    monkeypatch.setattr(predict_cli, "_segmenter", lambda: lambda *a, **k: found)
    res = tmp_path / "res"
    common = ["--model", str(weights), "--device", "cpu", "--tta", "1"]
    assert main(["predict", str(image), "--out", str(res), *common]) == 0
    [read] = read_prediction_folder(res)
    labels = tifffile.imread(res / "worms_labels.tif")
    table = pd.read_csv(res / "worms_measurements.csv")
    assert read.name == "worms" and len(read.masks) == len(np.unique(labels)) - 1 == 2
    np.testing.assert_allclose(read.metadata["scores"], table.sort_values("label")["score"])
    np.testing.assert_allclose(read.metadata["scores"], [0.4, 0.9])
    # the truth as a training folder of the same name; then evaluate the predict folder
    sample.name = "worms"
    write_training_folder(tmp_path / "truth", [sample])
    out = tmp_path / "r.json"
    args = ["evaluate", "--pred", str(res), "--gt", str(tmp_path / "truth"), "--json", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["n_images"] == 1 and result["n_pred"] == 2 and result["n_gt"] == 3
    assert result["S"]["0.5"] == pytest.approx(2 / 3)
    # a BBBC010 file name is matched by its well
    tifffile.imwrite(res / "1649_x_A01_w2_ABC-1.tif_labels.tif".replace(".tif_", "_"), labels)
    names = [s.name for s in read_prediction_folder(res)]
    assert "A01" in names


def test_tiled_tta_prediction_makes_every_tensor_on_the_models_device(model, image):
    """The network pass with tiles and all eight augmentations, run with the default device
    set to ``meta``: a tensor made without ``device=`` would land there instead of beside
    the model (on a GPU: a CPU tensor among CUDA ones) and the pass would fail."""
    from napari_instseg.core.normalize import model_input
    from napari_instseg.core.predict import iter_predict_normalized
    from napari_instseg.core.weights import DEFAULT_NORMALIZATION

    norm = model_input(
        image[None], "percentile", DEFAULT_NORMALIZATION["low"], DEFAULT_NORMALIZATION["high"]
    )
    with torch.device("meta"):
        steps = iter_predict_normalized(
            norm, model, torch.device("cpu"), tile_size=64, halo=16, tta=8, precision="float32"
        )
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                tiled = stop.value
                break
    assert tiled.metadata["tiles"] == 6 and tiled.metadata["tta"] == 8
    assert np.isfinite(tiled.boundary).all() and np.isfinite(tiled.embeddings).all()


def test_cli_predict_measures_another_channel_and_calls_dead_worms(tmp_path, capsys):
    """``--measure-channel w1=_w2_:_w1_``: BBBC010's stain file, found by name, is measured.

    The stain glows in one worm only: its instance gets the highest ``mean_w1`` and is
    the one called dead.
    """
    import pandas as pd
    import tifffile

    from napari_instseg.cli import main
    from napari_instseg.core.synthetic import make_worms

    sample = make_worms(shape=(192, 256), n_worms=4, n_crossings=0, n_touching=0, seed=1)
    folder = tmp_path / "plate"
    folder.mkdir()
    bright = folder / "plate_A01_w2_1F3C.tif"  # BBBC010's names: random suffixes differ
    stain_file = folder / "plate_A01_w1_9B2E.tif"
    tifffile.imwrite(bright, sample.image.astype(np.uint16))
    rng = np.random.default_rng(0)
    stain = rng.normal(100, 5, sample.image.shape)
    dead = int(np.argmax(sample.masks.sum((1, 2))))  # the largest worm has taken up the stain
    stain[sample.masks[dead]] += 3000
    tifffile.imwrite(stain_file, stain.astype(np.uint16))
    out = tmp_path / "out"
    argv = ["predict", str(bright), "--out", str(out), "--tta", "1", "--device", "cpu"]
    argv += ["--measure-channel", "w1=_w2_:_w1_"]
    assert main(argv) == 0, capsys.readouterr().err
    table = pd.read_csv(out / "plate_A01_w2_1F3C_measurements.csv")
    assert {"mean_w1", "dead"} <= set(table.columns)
    labels = tifffile.imread(out / "plate_A01_w2_1F3C_labels.tif")
    on_dead = np.bincount(labels[sample.masks[dead]], minlength=labels.max() + 1)
    on_dead[0] = 0
    dead_label = int(np.argmax(on_dead))  # the instance that covers the stained worm
    row = table.set_index("label").loc[dead_label]
    assert row["mean_w1"] == table["mean_w1"].max() and bool(row["dead"])
    assert table["dead"].sum() == 1 or table.loc[table["dead"], "mean_w1"].min() > 1000

    # errors are clear and name the file: no such channel file, a name without FROM
    lone = folder / "plate_A02_w2_77AA.tif"
    tifffile.imwrite(lone, sample.image.astype(np.uint16))
    argv = ["predict", str(lone), str(stain_file), "--out", str(tmp_path / "o2")]
    argv += ["--tta", "1", "--device", "cpu"]
    assert main([*argv, "--measure-channel", "w1=_w2_:_w1_"]) == 1
    err = capsys.readouterr().err
    assert "plate_A02_w2_77AA.tif: no channel file: neither plate_A02_w1_77AA.tif nor " in err
    assert "plate_A01_w1_9B2E.tif: its name has no '_w2_' to replace by '_w1_'" in err
    # the stain file among the inputs: said before any work, with what to do instead
    assert "plate_A01_w1_9B2E.tif: BBBC010's Sytox fluorescence (w1), not the bright-field" in err
    assert "leave them out of the inputs" in err
    assert main([*argv[:1], str(stain_file), *argv[3:], "--overwrite"]) == 0
    assert "measure these with --measure-channel w1=_w2_:_w1_" in capsys.readouterr().err
    # a spec that is not NAME=FROM:TO is refused before any work
    with pytest.raises(SystemExit):
        main([*argv, "--measure-channel", "w1=_w2_"])
    assert "expected NAME=FROM:TO" in capsys.readouterr().err
    # two candidates: ambiguous, said so
    (folder / "plate_A02_w1_0001.tif").write_bytes(b"")
    (folder / "plate_A02_w1_0002.tif").write_bytes(b"")
    argv = ["predict", str(lone), "--out", str(tmp_path / "o3"), "--tta", "1", "--device", "cpu"]
    assert main([*argv, "--measure-channel", "w1=_w2_:_w1_"]) == 1
    assert "several files could be its channel" in capsys.readouterr().err
