"""Batch prediction into OME-Zarr: stitching, resume, bad inputs, normalisation, CLI."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import zarr

from napari_instseg.core.batch import (
    default_workers,
    find_inputs,
    local_worker_devices,
    match_overlap,
    normalization_stats,
    normalize_window,
    plan_batch,
    run_batch,
)
from napari_instseg.core.instances import segment
from napari_instseg.core.model import InstSegNet, ModelConfig
from napari_instseg.core.normalize import model_input
from napari_instseg.core.oracle import prediction_from_masks
from napari_instseg.core.predict import predict
from napari_instseg.core.synthetic import make_worms
from napari_instseg.core.types import Prediction


def _tiny_model(input_norm: str = "percentile") -> InstSegNet:
    torch.manual_seed(0)
    cfg = ModelConfig(
        in_channels=1,
        channels=(8, 16, 32),
        embedding_dim=4,
        head_channels=8,
        coord_scale=32.0,
        input_norm=input_norm,
        flatfield_sigma=4.0,
    )
    return InstSegNet(cfg).eval()


class Oracle:
    """A perfect network: crops a prediction built from the true masks at each window."""

    def __init__(self, prediction: Prediction) -> None:
        self.prediction = prediction
        self.calls = 0
        self.fail_at: int | None = None
        self.error: type[BaseException] = RuntimeError
        self.lock = threading.Lock()

    def __getstate__(self) -> dict:  # picklable for dask.distributed (without the lock)
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, lock=threading.Lock())

    def __call__(self, x: np.ndarray, chunk) -> Prediction:
        with self.lock:
            self.calls += 1
            if self.fail_at is not None and self.calls == self.fail_at:
                raise self.error(f"simulated failure in chunk {chunk.key}")
        p = self.prediction
        r0, r1, c0, c1 = chunk.window
        assert x.shape[-2:] == (r1 - r0, c1 - c0)
        return Prediction(
            embeddings=p.embeddings[:, r0:r1, c0:c1],
            seediness=p.seediness[r0:r1, c0:c1],
            class_scores=p.class_scores[..., r0:r1, c0:c1],
            boundary=p.boundary[r0:r1, c0:c1],
            foreground=p.foreground[r0:r1, c0:c1],
            taus=p.taus,
        )


class Crash(BaseException):
    """Stands in for a killed process: not an ``Exception``, so nothing catches it."""


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    """A 160 x 224 image of 8 worms written as a zarr array, and its oracle prediction."""
    sample = make_worms(
        shape=(160, 224),
        n_worms=8,
        length=(50, 90),
        width=(6, 9),
        n_crossings=1,
        n_touching=1,
        seed=3,
    )
    path = tmp_path_factory.mktemp("mosaic") / "mosaic.zarr"
    arr = zarr.create_array(str(path), shape=sample.image.shape, dtype="uint16", chunks=(64, 64))
    arr[...] = sample.image.astype(np.uint16)
    return path, sample, prediction_from_masks(sample.masks, seed=0)


def _labels(out, level: int = 0) -> np.ndarray:
    return np.asarray(zarr.open_array(str(out / "labels" / "instances" / str(level)))[...])


def _match(reference: np.ndarray, labels: np.ndarray) -> list[tuple[int, int, float]]:
    """For each reference label: the label covering most of it and their IoU."""
    out = []
    for i in np.unique(reference)[1:]:
        m = reference == i
        vals, counts = np.unique(labels[m], return_counts=True)
        j = int(vals[np.argmax(counts)])
        other = labels == j
        out.append((int(i), j, float((m & other).sum() / (m | other).sum())))
    return out


# ---------------------------------------------------------------------------- stitching


def test_match_overlap_pairs_by_iou():
    a = np.zeros((10, 10), int)
    b = np.zeros((10, 10), int)
    a[:, :4], b[:, :4] = 1, 7  # the same instance under different ids
    a[:, 5:], b[:, 5:7], b[:, 7:] = 2, 3, 4  # one instance cut in two: no half wins
    pairs = match_overlap(a, b)
    assert pairs.tolist() == [[1, 7], [2, 4]]
    assert match_overlap(a, b, min_iou=0.9).tolist() == [[1, 7]]
    with pytest.raises(ValueError, match="differ in size"):
        match_overlap(a, b[:5])


def test_worms_crossing_chunk_borders_are_one_instance(mosaic, tmp_path):
    path, sample, oracle = mosaic
    out = tmp_path / "out.zarr"
    result = run_batch(
        [path], out, chunk_size=48, halo=24, method="seeds", predictor=Oracle(oracle)
    )
    assert result.ok and result.report["chunks"]["total"] == 4 * 5
    labels = _labels(out)
    assert labels.shape == (1, 160, 224) and labels.dtype == np.uint32
    labels = labels[0]

    # meaningful: most worms lie in several chunk cores
    def cores(mask):
        rows, cols = np.nonzero(mask)
        return len(set(zip(rows // 48, cols // 48, strict=True)))

    assert sum(cores(m) > 1 for m in sample.masks) >= 6
    # the stitched labels are the whole-image segmentation: one instance per worm
    whole = segment(oracle, "seeds").to_labels()
    assert len(np.unique(whole)) - 1 == len(sample.masks)
    matches = _match(whole, labels)
    assert len(np.unique(labels)) - 1 == len(matches)
    assert len({j for _, j, _ in matches}) == len(matches)
    assert min(iou for _, _, iou in matches) > 0.97

    table = pd.read_csv(result.table)
    assert sorted(table["label"]) == sorted(np.unique(labels)[1:].tolist())
    assert (table["chunks"] > 1).sum() >= 6
    # every worm here spans chunks: no solidity for them (see test_combine_...)
    assert table.loc[table["chunks"] > 1, "solidity"].isna().all()
    for _, row in table.iterrows():  # areas (overlaps counted) and boxes of the whole worm
        mask = labels == row["label"]
        rows, cols = np.nonzero(mask)
        assert row["area"] >= mask.sum()
        assert row["bbox_min_row"] <= rows.min() and row["bbox_max_row"] >= rows.max() + 1
        assert row["bbox_min_col"] <= cols.min() and row["bbox_max_col"] >= cols.max() + 1
    # a pyramid for napari: level 1 is level 0 every second pixel
    np.testing.assert_array_equal(_labels(out, 1)[0], labels[:160:2, :224:2])
    assert _labels(out, 2).shape == (1, 40, 56)


def test_without_matching_worms_would_split(mosaic, tmp_path, monkeypatch):
    """Control: the same chunks with no matches leave the worms in pieces."""
    from napari_instseg.core import batch

    monkeypatch.setattr(batch, "match_overlap", lambda a, b, min_iou: np.zeros((0, 2), int))
    path, sample, oracle = mosaic
    out = tmp_path / "split.zarr"
    run_batch([path], out, chunk_size=48, halo=24, method="seeds", predictor=Oracle(oracle))
    assert len(np.unique(_labels(out)[0])) - 1 > len(sample.masks) + 6


# ---------------------------------------------------------------------------- resume


def test_resume_after_failed_chunk_and_crash(mosaic, tmp_path):
    path, _, oracle = mosaic
    kwargs = {"chunk_size": 64, "halo": 24, "method": "seeds", "scheduler": "sync"}
    reference = tmp_path / "reference.zarr"
    run_batch([path], reference, predictor=Oracle(oracle), **kwargs)

    # an error in the 3rd chunk is reported; the other chunks are written
    out = tmp_path / "out.zarr"
    flaky = Oracle(oracle)
    flaky.fail_at = 3
    first = run_batch([path], out, predictor=flaky, **kwargs)
    assert not first.ok and first.report["chunks"]["failed"] == 1
    (failed,) = first.report["failed_chunks"]
    assert "simulated failure" in failed["error"] and failed["input"] == str(path)
    assert first.report["inputs"][0]["status"] == "incomplete"
    report = json.loads((out / "report.json").read_text())
    assert report["failed_chunks"][0]["chunk"] == failed["chunk"]

    # a rerun computes only that chunk, and the result is that of an uninterrupted run
    again = Oracle(oracle)
    second = run_batch([path], out, predictor=again, **kwargs)
    assert second.ok and again.calls == 1
    assert second.report["chunks"] == {"total": 12, "skipped": 11, "computed": 1, "failed": 0}
    np.testing.assert_array_equal(_labels(out), _labels(reference))
    pd.testing.assert_frame_equal(
        pd.read_csv(second.table), pd.read_csv(reference / "measurements.csv")
    )

    # a crash (nothing caught) in the 5th chunk: a rerun does the 8 chunks left
    crashed = tmp_path / "crashed.zarr"
    dying = Oracle(oracle)
    dying.fail_at, dying.error = 5, Crash
    with pytest.raises(Crash):
        run_batch([path], crashed, predictor=dying, **kwargs)
    assert len(list((crashed / ".work" / "done").glob("*.json"))) == 4
    resumed = Oracle(oracle)
    third = run_batch([path], crashed, predictor=resumed, **kwargs)
    assert third.ok and resumed.calls == 8
    np.testing.assert_array_equal(_labels(crashed), _labels(reference))

    # finished: nothing left to do; another job into the same store is refused
    done = Oracle(oracle)
    assert run_batch([path], crashed, predictor=done, **kwargs).report["chunks"]["computed"] == 0
    assert done.calls == 0
    with pytest.raises(ValueError, match="different run"):
        run_batch([path], crashed, predictor=done, **{**kwargs, "halo": 16})
    fresh = run_batch([path], crashed, predictor=done, resume=False, **{**kwargs, "halo": 16})
    assert fresh.ok and done.calls == 12


# ---------------------------------------------------------------------------- bad inputs


def test_bad_inputs_are_reported_and_skipped(mosaic, tmp_path):
    _, sample, oracle = mosaic
    folder = tmp_path / "plate"
    folder.mkdir()
    image = sample.image.astype(np.uint16)
    tifffile.imwrite(folder / "a.tif", image)
    tifffile.imwrite(folder / "b.tif", np.stack([image, image]))  # two planes
    tifffile.imwrite(folder / "small.tif", image[:100, :100])  # mixed size
    (folder / "broken.tif").write_bytes(b"this is not a TIFF file")
    with_nan = sample.image.copy()
    with_nan[50, 60] = np.nan
    tifffile.imwrite(folder / "nan.tif", with_nan)  # readable, fails in its chunks
    (folder / "notes.txt").write_text("not an image, ignored")
    inputs = [folder, tmp_path / "missing.tif", str(tmp_path / "none-*.tif")]
    out = tmp_path / "out.zarr"
    kwargs = {"chunk_size": 96, "halo": 24, "method": "seeds"}
    result = run_batch(inputs, out, predictor=Oracle(oracle), **kwargs)

    skipped = {item["path"]: item["error"] for item in result.report["skipped_inputs"]}
    assert set(skipped) == {
        str(folder / "small.tif"),
        str(folder / "broken.tif"),
        str(tmp_path / "missing.tif"),
        str(tmp_path / "none-*.tif"),
    }
    assert "differs from the batch's 160 x 224" in skipped[str(folder / "small.tif")]
    assert "cannot read" in skipped[str(folder / "broken.tif")]
    assert "no such file" in skipped[str(tmp_path / "missing.tif")]
    assert "matches" in skipped[str(tmp_path / "none-*.tif")]
    # the NaN image fails in all its chunks; its plane stays empty
    assert not result.ok and result.report["chunks"]["failed"] == 6
    assert {f["input"] for f in result.report["failed_chunks"]} == {str(folder / "nan.tif")}
    assert "NaN" in result.report["failed_chunks"][0]["error"]
    status = {item["path"]: item["status"] for item in result.report["inputs"]}
    assert (
        status[str(folder / "nan.tif")] == "incomplete" and status[str(folder / "a.tif")] == "ok"
    )
    # the good inputs are done: three planes, each segmented
    labels = _labels(out)
    assert labels.shape == (4, 160, 224) and not labels[3].any()
    np.testing.assert_array_equal(labels[1], labels[0])
    table = pd.read_csv(result.table)
    assert set(zip(table["image"], table["plane"], table["index"], strict=True)) == {
        ("a.tif", 0, 0),
        ("b.tif", 0, 1),
        ("b.tif", 1, 2),
    }
    image_back = zarr.open_array(str(out / "0"))[...]
    np.testing.assert_array_equal(image_back[2, 0], image)
    # finished work is kept: a rerun retries only the failed chunks
    rerun = Oracle(oracle)
    chunks = run_batch(inputs, out, predictor=rerun, **kwargs).report["chunks"]
    assert chunks == {"total": 24, "skipped": 18, "computed": 0, "failed": 6}
    assert rerun.calls == 0
    # nothing usable: a clear error
    with pytest.raises(ValueError, match="no readable input"):
        run_batch([folder / "broken.tif"], tmp_path / "x.zarr", predictor=rerun)


def test_find_inputs_and_plan(tmp_path):
    for name in ("b.tif", "a.png", ".hidden.tif", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    paths, errors = find_inputs([tmp_path, tmp_path / "a.png", str(tmp_path / "*.tif")])
    assert [p.name for p in paths] == ["a.png", "b.tif"] and not errors
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((100, 130), np.uint16))
    plan = plan_batch([tmp_path / "img.tif"], chunk_size=48, halo=16, divisor=8)
    assert plan.grid == (3, 3) and len(plan.chunks()) == 9
    for chunk in plan.chunks():
        r0, r1, c0, c1 = chunk.window
        assert r0 % 8 == 0 and c0 % 8 == 0  # the network's pooling grid is the global one
        assert r0 <= chunk.core[0] - 16 or r0 == 0
        assert r1 == min(chunk.core[1] + 16, 100)
    # a colour file for a grey model: skipped, with what to do instead
    rgb = np.zeros((100, 130, 3), np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    plan = plan_batch([tmp_path / "img.tif", tmp_path / "rgb.tif"], 48, 16, in_channels=1)
    (error,) = plan.errors
    assert (
        error["path"].endswith("rgb.tif")
        and "a colour image: convert it to grey" in error["error"]
    )
    with pytest.raises(ValueError, match="halo"):
        plan_batch([tmp_path / "img.tif"], chunk_size=48, halo=2)
    with pytest.raises(ValueError, match="chunk size"):
        plan_batch([tmp_path / "img.tif"], chunk_size=8)


def test_a_single_path_is_one_input_not_its_characters(tmp_path, monkeypatch):
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((40, 50), np.uint16))
    tifffile.imwrite(tmp_path / "other.tif", np.zeros((40, 50), np.uint16))
    monkeypatch.chdir(tmp_path)
    for single in ("img.tif", tmp_path / "img.tif"):
        paths, errors = find_inputs(single)  # a str would otherwise be "i", "m", "g", "."...
        assert [p.name for p in paths] == ["img.tif"] and not errors
        plan = plan_batch(single, chunk_size=48, halo=16)
        assert [Path(s["path"]).name for s in plan.sources] == ["img.tif"]


@pytest.mark.parametrize(
    "kwargs", [{}, {"compression": "zlib", "tile": (32, 32)}, {"compression": "zlib"}]
)
def test_open_input_reads_windows_of_tiff_stacks(tmp_path, kwargs):
    from napari_instseg.core.batch import open_input

    data = np.random.default_rng(0).integers(0, 4000, (3, 100, 120)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", data, photometric="minisblack", **kwargs)
    arr = open_input(tmp_path / "s.tif")  # uncompressed: memory map; else chunk by chunk
    assert arr.shape == (3, 1, 100, 120) and arr.dtype == np.uint16
    np.testing.assert_array_equal(arr[2, 0, 40:90, 70:110].compute(), data[2, 40:90, 70:110])
    rgb = np.zeros((50, 60, 3), np.uint8)
    rgb[..., 1] = 7
    import imageio.v3 as iio

    iio.imwrite(tmp_path / "c.png", rgb)
    assert open_input(tmp_path / "c.png").shape == (1, 3, 50, 60)
    with pytest.raises(ValueError, match="unknown file type"):
        (tmp_path / "x.xyz").write_bytes(b"")
        open_input(tmp_path / "x.xyz")


# ---------------------------------------------------------------------------- the network


@pytest.mark.parametrize("input_norm", ["percentile", "flatfield"])
def test_plane_statistics_reproduce_model_input(input_norm):
    rng = np.random.default_rng(0)
    image = (1000 + 300 * rng.random((1, 96, 120)) * np.linspace(0.5, 1, 120)).astype(np.float32)
    stats = normalization_stats(image, input_norm, flatfield_sigma=4.0)
    whole = model_input(image, input_norm, flatfield_sigma=4.0)
    np.testing.assert_array_equal(normalize_window(image, stats), whole)
    # from a strided sample the numbers are close
    sub = normalization_stats(image[:, ::3, ::3], input_norm, flatfield_sigma=4.0, stride=3)
    np.testing.assert_allclose(sub["low"], stats["low"], rtol=0.02)
    np.testing.assert_allclose(sub["high"], stats["high"], rtol=0.02)
    if input_norm == "flatfield":
        np.testing.assert_allclose(sub["flat_high"], stats["flat_high"], rtol=0.05)
    with pytest.raises(ValueError, match="NaN"):
        normalize_window(np.full((1, 4, 4), np.nan), stats)


@pytest.mark.parametrize("input_norm", ["percentile", "flatfield"])
def test_network_in_chunks_agrees_with_whole_image(tmp_path, input_norm):
    model = _tiny_model(input_norm)
    sample = make_worms(shape=(120, 160), n_worms=5, length=(25, 50), width=(5, 7), seed=0)
    image = sample.image.astype(np.uint16)
    tifffile.imwrite(tmp_path / "img.tif", image)
    whole = predict(image.astype(np.float32), model, "cpu")
    params = {"model": model, "device": "cpu", "method": "boundary", "save_maps": True}
    # one chunk: exactly predict + segment
    run_batch([tmp_path / "img.tif"], tmp_path / "one.zarr", chunk_size=256, **params)
    emb = zarr.open_array(str(tmp_path / "one.zarr" / "maps" / "embeddings" / "0"))[...]
    assert emb.shape == (1, 4, 120, 160)
    np.testing.assert_allclose(emb[0], whole.embeddings, atol=1e-5)
    expected = segment(whole, "boundary").to_labels()
    np.testing.assert_array_equal(_labels(tmp_path / "one.zarr")[0], expected)
    # 3 x 4 chunks with a halo beyond the receptive field (~21 px): the same maps
    many = tmp_path / "many.zarr"
    result = run_batch([tmp_path / "img.tif"], many, chunk_size=48, halo=32, **params)
    assert result.report["chunks"]["total"] == 12
    for name in ("embeddings", "seediness", "foreground"):
        got = zarr.open_array(str(many / "maps" / name / "0"))[0]
        np.testing.assert_allclose(got, getattr(whole, name), atol=1e-4, err_msg=name)


def test_batch_predicts_with_the_models_recommended_tta(tmp_path):
    model = _tiny_model()
    model.metadata = {"name": "tiny", "recommended_tta": 4}
    sample = make_worms(shape=(120, 160), n_worms=5, length=(25, 50), width=(5, 7), seed=1)
    tifffile.imwrite(tmp_path / "img.tif", sample.image.astype(np.uint16))
    image = sample.image.astype(np.uint16).astype(np.float32)
    params = {"model": model, "device": "cpu", "method": "boundary", "save_maps": True}
    auto = run_batch([tmp_path / "img.tif"], tmp_path / "auto.zarr", chunk_size=256, **params)
    plain = run_batch(
        [tmp_path / "img.tif"], tmp_path / "plain.zarr", chunk_size=256, tta=1, **params
    )
    assert auto.ok and plain.ok
    for out, tta in ((tmp_path / "auto.zarr", 4), (tmp_path / "plain.zarr", 1)):
        expected = predict(image, model, "cpu", tta=tta)
        got = zarr.open_array(str(out / "maps" / "foreground" / "0"))[0]
        np.testing.assert_allclose(got, expected.foreground, atol=1e-5)
    with pytest.raises(ValueError, match="tta must be"):
        run_batch([tmp_path / "img.tif"], tmp_path / "bad.zarr", tta=3, **params)
    # the precision reaches the network: float32 windows are predict()'s float32 maps
    full = run_batch(
        [tmp_path / "img.tif"], tmp_path / "fp32.zarr", tta=1, precision="float32", **params
    )
    got = zarr.open_array(str(tmp_path / "fp32.zarr" / "maps" / "foreground" / "0"))[0]
    expected = predict(image, model, "cpu", precision="float32").foreground
    assert full.ok
    np.testing.assert_allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="Unknown precision"):
        run_batch([tmp_path / "img.tif"], tmp_path / "bad.zarr", precision="half", **params)


@pytest.mark.parametrize("change", [{"semi_conv": False}, {"coord_scale": 64.0}])
def test_a_store_never_resumes_with_another_architecture(tmp_path, change):
    """Same tensors, other architecture: other maps, so the run is a different one."""
    from dataclasses import replace

    from napari_instseg.core.weights import model_signature

    model = _tiny_model()
    other = InstSegNet(replace(model.config, **change)).eval()
    other.load_state_dict(model.state_dict())
    assert model_signature(other) == model_signature(model)  # the tensors alone agree
    sample = make_worms(shape=(96, 128), n_worms=3, length=(25, 50), width=(5, 7), seed=3)
    tifffile.imwrite(tmp_path / "img.tif", sample.image.astype(np.uint16))
    params = {"device": "cpu", "method": "boundary", "save_maps": True, "tta": 1}
    out = tmp_path / "out.zarr"
    assert run_batch([tmp_path / "img.tif"], out, model=model, **params).ok
    # the same model resumes the finished store: nothing recomputed
    again = run_batch([tmp_path / "img.tif"], out, model=model, **params)
    assert again.report["chunks"]["computed"] == 0
    with pytest.raises(ValueError, match="different run"):
        run_batch([tmp_path / "img.tif"], out, model=other, **params)
    fresh = run_batch([tmp_path / "img.tif"], out, model=other, resume=False, **params)
    assert fresh.ok and fresh.report["chunks"]["computed"] > 0
    expected = predict(sample.image.astype(np.uint16).astype(np.float32), other, "cpu")
    got = zarr.open_array(str(out / "maps" / "foreground" / "0"))[0]
    np.testing.assert_allclose(got, expected.foreground, atol=1e-5)


def test_batch_at_another_scale_matches_predict(tmp_path):
    model = _tiny_model()
    sample = make_worms(shape=(120, 160), n_worms=5, length=(25, 50), width=(5, 7), seed=2)
    tifffile.imwrite(tmp_path / "img.tif", sample.image.astype(np.uint16))
    image = sample.image.astype(np.uint16).astype(np.float32)
    params = {"model": model, "device": "cpu", "method": "boundary", "save_maps": True}
    half = run_batch([tmp_path / "img.tif"], tmp_path / "half.zarr", scale=0.5, **params)
    plain = run_batch([tmp_path / "img.tif"], tmp_path / "plain.zarr", **params)
    assert half.ok and plain.ok
    expected = predict(image, model, "cpu", scale=0.5)
    got = zarr.open_array(str(tmp_path / "half.zarr" / "maps" / "foreground" / "0"))[0]
    other = zarr.open_array(str(tmp_path / "plain.zarr" / "maps" / "foreground" / "0"))[0]
    assert got.shape == (120, 160)  # the image's grid
    # the window is resized after normalisation, the whole image before: close, not equal
    assert np.abs(got - expected.foreground).mean() < 0.5 * np.abs(other - got).mean()
    assert _labels(tmp_path / "half.zarr").shape[-2:] == (120, 160)
    assert half.report["scale"] == 0.5 and "scale_estimates" not in half.report
    with pytest.raises(ValueError, match="object_width"):  # auto needs the model's width
        run_batch([tmp_path / "img.tif"], tmp_path / "auto.zarr", scale="auto", **params)
    assert not (tmp_path / "auto.zarr").exists()
    with pytest.raises(ValueError, match="scale"):
        run_batch([tmp_path / "img.tif"], tmp_path / "bad.zarr", scale=0, **params)


def test_batch_auto_scale_is_estimated_once_for_the_series(tmp_path, monkeypatch):
    import napari_instseg.core.predict as predict_module

    model = _tiny_model()
    model.metadata = {"object_width": 8.0}
    for index in range(4):
        sample = make_worms(shape=(96, 128), n_worms=3, length=(25, 50), seed=index)
        tifffile.imwrite(tmp_path / f"img{index}.tif", sample.image.astype(np.uint16))
    measured = []

    def fake_auto_scale(image, model, device="auto", tile_size=1024, halo=64, precision="auto"):
        measured.append(image.shape)
        return [0.5, 0.52, 0.7][len(measured) - 1]  # first, middle, last plane

    monkeypatch.setattr(predict_module, "auto_scale", fake_auto_scale)
    params = {"model": model, "device": "cpu", "method": "boundary", "save_maps": True}
    inputs = [tmp_path / f"img{i}.tif" for i in range(4)]
    auto = run_batch(inputs, tmp_path / "auto.zarr", scale="auto", **params)
    assert auto.ok and len(measured) == 3  # three of the four planes, once each
    assert auto.report["scale"] == 0.52 and auto.report["scale_estimates"] == [0.5, 0.52, 0.7]
    fixed = run_batch(inputs, tmp_path / "fixed.zarr", scale=0.52, **params)
    for name in ("foreground", "boundary"):  # every window resized by the one factor
        got = zarr.open_array(str(tmp_path / "auto.zarr" / "maps" / name / "0"))[...]
        np.testing.assert_array_equal(got, zarr.open_array(str(fixed.out / "maps" / name / "0")))
    # a rerun of the same job resumes with the kept estimate, measuring nothing again
    again = run_batch(inputs, tmp_path / "auto.zarr", scale="auto", **params)
    assert len(measured) == 3 and again.report["scale"] == 0.52
    with pytest.raises(ValueError, match="predictor"):
        run_batch(inputs, tmp_path / "p.zarr", scale="auto", predictor=lambda x, c: None)


def test_cli_batch_auto_scale_prints_the_series_factor(tmp_path, capsys, monkeypatch):
    import napari_instseg.core.predict as predict_module
    from napari_instseg.cli import main
    from napari_instseg.core.weights import save_model

    monkeypatch.setattr(predict_module, "auto_scale", lambda image, *a, **k: 0.6)
    sample = make_worms(shape=(64, 80), n_worms=3, length=(25, 40), width=(5, 7), seed=0)
    tifffile.imwrite(tmp_path / "a.tif", sample.image.astype(np.uint16))
    argv = ["predict", str(tmp_path / "a.tif"), "--out", str(tmp_path / "res.zarr")]
    argv += ["--method", "boundary", "--device", "cpu", "--scale", "auto", "--model"]
    older = save_model(_tiny_model(), tmp_path / "older.safetensors", {"name": "older"})
    assert main([*argv, str(older)]) == 1  # no training width: refused, nothing written
    assert "object_width" in capsys.readouterr().err and not (tmp_path / "res.zarr").exists()
    weights = save_model(_tiny_model(), tmp_path / "w.safetensors", {"object_width": 8.0})
    assert main([*argv, str(weights)]) == 0
    out = capsys.readouterr().out
    assert "scale 0.6 for every image (the median of the estimates 0.6 on the first" in out


# ---------------------------------------------------------------------------- CLI, napari


def _whole_plane_model() -> InstSegNet:
    """An untrained model whose heads say "foreground everywhere, no boundary"."""
    model = _tiny_model()
    with torch.no_grad():
        model.boundary_head[-1].bias.copy_(torch.tensor([-8.0, 8.0]))
    return model


def test_cli_writes_ome_zarr_that_napari_reads(tmp_path, capsys):
    from napari_instseg.cli import main
    from napari_instseg.core.io import read_image
    from napari_instseg.core.weights import save_model

    weights = save_model(_whole_plane_model(), tmp_path / "tiny.safetensors", {"name": "tiny"})
    sample = make_worms(shape=(64, 80), n_worms=3, length=(25, 40), width=(5, 7), seed=0)
    image = sample.image.astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", image)
    tifffile.imwrite(tmp_path / "b.tif", np.stack([image, image[::-1]]))
    out = tmp_path / "res.zarr"
    argv = ["predict", str(tmp_path / "*.tif"), "--out", str(out), "--model", str(weights)]
    argv += ["--method", "boundary", "--chunk-size", "32", "--halo", "16"]  # device: auto
    assert main([*argv, "--threads", "2"]) == 0
    printed = capsys.readouterr().out
    assert "3 image(s) of 64 x 80" in printed and "18 computed" in printed
    assert re.search(r"^network on (cpu|cuda:0|mps)$", printed, re.MULTILINE), printed
    report = json.loads((out / "report.json").read_text())
    assert report["chunks"]["failed"] == 0 and report["planes"] == 3
    # each plane is one instance over 2 x 3 chunks, stitched through the real network path
    labels = _labels(out)
    assert labels.shape == (3, 64, 80) and (labels == 1).all()
    table = pd.read_csv(out / "measurements.csv")
    assert table["label"].tolist() == [1, 1, 1] and table["index"].tolist() == [0, 1, 2]
    assert (table["area"] == 64 * 80).all() and (table["chunks"] == 6).all()
    assert table["image"].tolist() == ["a.tif", "b.tif", "b.tif"]
    np.testing.assert_allclose(table["mean_intensity"][:2], image.mean(), rtol=1e-6)
    np.testing.assert_array_equal(read_image(out)[:, 0], [image, image, image[::-1]])
    # rerun: everything already done
    assert main(argv) == 0
    assert "0 computed" in capsys.readouterr().out
    # an unreadable input: reported, exit status 1
    (tmp_path / "c.tif").write_bytes(b"garbage")
    assert main([*argv[:3], str(tmp_path / "out2.zarr"), *argv[4:]]) == 1
    assert "skipped" in capsys.readouterr().err

    reader = pytest.importorskip("napari_ome_zarr").napari_get_reader(str(out))
    layers = {kind: (data, meta) for data, meta, kind in reader()}
    assert set(layers) == {"image", "labels"}
    np.testing.assert_array_equal(np.asarray(layers["labels"][0][0]), labels)
    assert layers["image"][1]["channel_axis"] == 1


def test_parquet_needs_pyarrow(mosaic, tmp_path):
    path, _, oracle = mosaic
    params = {"chunk_size": 96, "measurements": "parquet", "predictor": Oracle(oracle)}
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pyarrow"):
            run_batch([path], tmp_path / "p.zarr", **params)
        return
    result = run_batch([path], tmp_path / "p.zarr", **params)
    assert result.table.suffix == ".parquet" and len(pd.read_parquet(result.table)) > 0


def test_distributed_client_gives_the_same_result(mosaic, tmp_path):
    distributed = pytest.importorskip("distributed")
    path, _, oracle = mosaic
    kwargs = {"chunk_size": 64, "halo": 24, "method": "seeds", "predictor": Oracle(oracle)}
    local = run_batch([path], tmp_path / "threads.zarr", **kwargs)
    # an in-process cluster keeps the test fast; the benchmark runs worker processes
    with distributed.Client(
        processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None
    ) as client:
        remote = run_batch([path], tmp_path / "cluster.zarr", scheduler=client, **kwargs)
    assert remote.ok and remote.report["scheduler"].startswith("dask.distributed")
    assert remote.report["chunks"]["computed"] == 12
    np.testing.assert_array_equal(
        _labels(tmp_path / "cluster.zarr"), _labels(tmp_path / "threads.zarr")
    )
    pd.testing.assert_frame_equal(pd.read_csv(remote.table), pd.read_csv(local.table))


def _fake_gpus(monkeypatch, count: int) -> None:
    """Make ``torch.cuda`` describe ``count`` GPUs (none: no CUDA) on this CPU machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_local_workers_share_the_gpus_out(monkeypatch):
    _fake_gpus(monkeypatch, 3)
    assert local_worker_devices("auto", 4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    assert local_worker_devices("cuda", 2) == ["cuda:0", "cuda:1"]
    assert local_worker_devices("cuda:1", 3) == ["cuda:1"] * 3  # asked for: kept
    assert local_worker_devices("cpu", 2) == ["cpu", "cpu"]
    assert default_workers("auto") == default_workers("cuda") == 3  # one process per GPU
    assert default_workers("cuda:1") == default_workers("cpu") == 1
    assert default_workers("auto", "tcp://10.0.0.5:8786") == 1  # an existing cluster
    _fake_gpus(monkeypatch, 1)
    assert default_workers("auto") == 1
    assert local_worker_devices("auto", 2) == ["cuda:0", "cuda:0"]
    _fake_gpus(monkeypatch, 0)
    assert default_workers("auto") == 1
    assert local_worker_devices("auto", 2) == ["auto", "auto"]


def test_local_cluster_workers_run_the_network_on_their_own_gpu(tmp_path, monkeypatch):
    """Two faked GPUs: by default two worker processes, worker i on cuda:i, as reported.

    The cluster's workers run in this process (``processes=False``) so that they see the
    faked ``torch.cuda``; the network itself runs on the CPU whatever device it is given.
    """
    distributed = pytest.importorskip("distributed")
    import napari_instseg.core.batch as batch

    model = _tiny_model()
    sample = make_worms(shape=(120, 160), n_worms=5, length=(25, 50), width=(5, 7), seed=0)
    tifffile.imwrite(tmp_path / "img.tif", sample.image.astype(np.uint16))
    params = {"model": model, "method": "boundary", "chunk_size": 48, "halo": 32}
    on_cpu = run_batch([tmp_path / "img.tif"], tmp_path / "cpu.zarr", device="cpu", **params)
    assert on_cpu.report["devices"] == {"local": "cpu"}

    _fake_gpus(monkeypatch, 2)
    real_cluster = distributed.LocalCluster

    def in_process(*args, **kwargs):
        return real_cluster(*args, **{**kwargs, "processes": False})

    monkeypatch.setattr(distributed, "LocalCluster", in_process)
    seen: list[tuple[object, str, str]] = []  # (worker, what for, device)
    lock = threading.Lock()

    def worker_model(path, device, threads):
        with lock:
            seen.append((batch._worker_name(), "model", device))
        return model

    real_predict = batch.predict_window

    def predict_on_cpu(x, net, device, *args):
        with lock:
            seen.append((batch._worker_name(), "network", str(device)))
        time.sleep(0.05)  # both workers get chunks
        return real_predict(x, net, "cpu", *args)

    monkeypatch.setattr(batch, "_worker_model", worker_model)
    monkeypatch.setattr(batch, "predict_window", predict_on_cpu)

    spread = run_batch([tmp_path / "img.tif"], tmp_path / "auto.zarr", device="auto", **params)
    assert spread.ok and spread.report["scheduler"].startswith("dask.distributed")
    workers = {w for w, _, _ in seen}
    assert workers == {0, 1}  # two processes by default, one per GPU
    assert sorted({(w, d) for w, _, d in seen}) == [(0, "cuda:0"), (1, "cuda:1")]
    assert spread.report["devices"] == {"0": "cuda:0", "1": "cuda:1"}
    np.testing.assert_array_equal(_labels(tmp_path / "auto.zarr"), _labels(tmp_path / "cpu.zarr"))

    # a custom predictor does not use the device: local threads, no processes
    oracle = run_batch(
        [tmp_path / "img.tif"], tmp_path / "oracle.zarr", method="boundary", chunk_size=48,
        halo=32, predictor=Oracle(predict(sample.image.astype(np.float32), model, "cpu")),
    )  # fmt: skip
    assert oracle.ok and oracle.report["scheduler"].startswith("dask threads")

    # an explicit GPU is every worker's
    seen.clear()
    one = run_batch(
        [tmp_path / "img.tif"], tmp_path / "one.zarr", device="cuda:1", workers=2, **params
    )
    assert one.ok and {d for _, _, d in seen} == {"cuda:1"}
    assert set(one.report["devices"].values()) == {"cuda:1"}

    # an existing cluster's workers each keep their own choice ("auto": their best device)
    seen.clear()
    with distributed.Client(
        processes=False, n_workers=2, threads_per_worker=1, dashboard_address=None
    ) as client:
        given = run_batch(
            [tmp_path / "img.tif"], tmp_path / "given.zarr", device="auto", scheduler=client,
            **params,
        )  # fmt: skip
    assert given.ok and {d for _, _, d in seen} == {"auto"}
    assert set(given.report["devices"].values()) == {"cuda:0"}  # what "auto" resolved to


def test_chunks_carry_the_image_contrast_of_the_whole_plane(mosaic, tmp_path):
    """The edge refinement sees about the same contrast in a chunk as in the whole image."""
    from napari_instseg.core.edges import local_contrast

    path, sample, oracle = mosaic
    whole = local_contrast(sample.image.astype(np.uint16).astype(np.float32))

    class WindowOracle(Oracle):
        def __call__(self, x, chunk):
            prediction = super().__call__(x, chunk)
            prediction.metadata["window"] = chunk.window
            return prediction

    seen = []

    def recording_segmenter(prediction, method, **params):
        seen.append((prediction.metadata["window"], prediction.contrast))
        return segment(prediction, method, **params)

    def run(name, **segment_params):
        return run_batch(
            [path],
            tmp_path / name,
            chunk_size=48,
            halo=24,
            method="seeds",
            predictor=WindowOracle(oracle),
            segmenter=recording_segmenter,
            segment_params=segment_params,
        )

    result = run("out.zarr")
    assert result.ok and len(seen) == result.report["chunks"]["total"]
    for (r0, r1, c0, c1), contrast in seen:
        assert contrast is not None and contrast.shape == (r1 - r0, c1 - c0)
        # the window's 4 px block grid may differ from the whole image's: close, not equal
        assert float(np.abs(contrast - whole[r0:r1, c0:c1]).mean()) < 0.02

    # with the refinement turned off the contrast is not computed at all
    seen.clear()
    result = run("off.zarr", edge_thresholds=None)
    assert result.ok and seen and all(contrast is None for _, contrast in seen)


def test_combine_adds_pieces_and_keeps_solidity_of_one_chunk_instances_only():
    from napari_instseg.core.batch import _combine

    def piece(label, area, length, solidity):
        return {
            "image": "a.tif", "plane": 0, "index": 0, "label": label, "area": area,
            "length": length, "width": area / length, "solidity": solidity, "score": 0.9,
            "class": 1, "bbox_min_row": 0, "bbox_min_col": 0, "bbox_max_row": 5,
            "bbox_max_col": 5, "centroid_row": 2.0, "centroid_col": 2.0,
        }  # fmt: skip

    chunk_a = pd.DataFrame([piece(1, 100, 20.0, 0.9), piece(2, 60, 10.0, 0.8)])
    chunk_b = pd.DataFrame([piece(2, 40, 5.0, 0.95)])
    combined = _combine([chunk_a, chunk_b])
    out = combined.set_index("label")
    assert out.loc[1, "solidity"] == pytest.approx(0.9) and out.loc[1, "chunks"] == 1
    assert np.isnan(out.loc[2, "solidity"]) and out.loc[2, "chunks"] == 2
    assert out.loc[2, "area"] == 100 and out.loc[2, "width"] == pytest.approx(100 / 15)
    assert list(combined.columns[:8]) == [
        "image", "plane", "index", "label", "area", "length", "width", "solidity",
    ]  # fmt: skip
