"""Tests of core.training_folder: the export format for corrected instances."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

import napari_instseg.core.training_folder as tf
from napari_instseg.core.io import read_bbbc010
from napari_instseg.core.synthetic import make_worms
from napari_instseg.core.training_folder import (
    read_training_folder,
    training_folder_names,
    write_training_folder,
)
from napari_instseg.core.types import Instances, Sample


def _worms(seed: int, name: str | None = None, **kwargs) -> Sample:
    kwargs.setdefault("shape", (96, 112))
    kwargs.setdefault("n_worms", 4)
    kwargs.setdefault("length", (30, 60))
    kwargs.setdefault("width", (5, 8))
    sample = make_worms(seed=seed, **kwargs)
    n = sample.n_instances
    sample.reviewed = np.arange(n) % 2 == 0
    sample.classes = np.arange(n) % 3 + 1
    if name:
        sample.name = name
    return sample


def _assert_same(a: Sample, b: Sample) -> None:
    assert a.name == b.name
    np.testing.assert_array_equal(a.image, b.image)
    assert a.image.dtype == b.image.dtype
    np.testing.assert_array_equal(a.masks, b.masks)
    for field in ("reviewed", "classes"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)
    assert a.channels.keys() == b.channels.keys()
    for key in a.channels:
        np.testing.assert_array_equal(a.channels[key], b.channels[key])


def _tmp_files(root):
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_round_trip_synthetic_with_overlaps(tmp_path):
    samples = [_worms(1, n_crossings=1), _worms(2, n_crossings=2, n_touching=0)]
    samples[1].channels = {"w1": np.random.default_rng(0).random((96, 112)).astype(np.float32)}
    assert all((s.masks.sum(axis=0) > 1).any() for s in samples)  # the data really overlap
    root = write_training_folder(tmp_path / "export", samples, model="unet-abc123")
    back = read_training_folder(root)
    assert [s.name for s in back] == ["synthetic-1", "synthetic-2"]
    for a, b in zip(samples, back, strict=True):
        _assert_same(a, b)
        assert b.metadata["model"] == "unet-abc123"
        assert b.metadata["params"] == a.metadata["params"]
        assert b.metadata["crossings"] == a.metadata["crossings"]
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["format"] == tf.FORMAT and manifest["version"] == tf.FORMAT_VERSION
    entry = manifest["images"]["synthetic-1"]
    assert entry["instances"] == "instances/synthetic-1.tif"
    assert entry["reviewed"] == samples[0].reviewed.tolist()
    assert entry["model"] == "unet-abc123" and entry["created"]
    assert manifest["images"]["synthetic-2"]["channels"] == {"w1": "channels/synthetic-2/w1.tif"}
    assert _tmp_files(root) == []


def test_label_tiff_is_plain_2d_uint16_following_smaller_wins(tmp_path):
    sample = _worms(3, n_crossings=1)
    root = write_training_folder(tmp_path, [sample])
    with tifffile.TiffFile(root / "masks" / "synthetic-3.tif") as tif:
        assert len(tif.pages) == 1
        labels = tif.asarray()
    assert labels.shape == (96, 112) and labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, Instances(sample.masks).to_labels())
    (i, j), *_ = sample.metadata["crossings"]
    shared = sample.masks[i] & sample.masks[j]
    smaller = i if sample.masks[i].sum() < sample.masks[j].sum() else j
    assert (labels[shared] == smaller + 1).all()
    image = tifffile.imread(root / "images" / "synthetic-3.tif")
    np.testing.assert_array_equal(image, sample.image)


def test_without_overlaps_no_instances_file_and_labels_suffice(tmp_path):
    sample = _worms(4, n_crossings=0, n_touching=1)
    sample.masks = np.concatenate([sample.masks, np.zeros((1, 96, 112), bool)])  # empty one
    sample.reviewed = np.ones(5, bool)
    sample.classes = None
    root = write_training_folder(tmp_path, [sample])
    assert not (root / "instances" / "synthetic-4.tif").exists()
    (back,) = read_training_folder(root)
    _assert_same(sample, back)
    assert back.classes is None


def test_multichannel_and_integer_images(tmp_path):
    rng = np.random.default_rng(0)
    masks = np.zeros((2, 20, 30), bool)
    masks[0, 2:8, 3:9] = masks[1, 5:12, 6:14] = True
    a = Sample(image=rng.integers(0, 4000, (3, 20, 30), dtype=np.uint16), masks=masks, name="rgb")
    b = Sample(image=rng.random((1, 20, 30)).astype(np.float32), masks=masks[:1], name="one-c")
    root = write_training_folder(tmp_path, [a, b])
    back = {s.name: s for s in read_training_folder(root)}
    _assert_same(a, back["rgb"])
    _assert_same(b, back["one-c"])
    assert back["rgb"].image.shape == (3, 20, 30)  # never mistaken for an RGB image
    assert back["one-c"].image.shape == (1, 20, 30)


def test_refuses_to_overwrite_then_overwrite_works(tmp_path):
    root = write_training_folder(tmp_path, [_worms(5, name="w")])
    before = (root / "images" / "w.tif").read_bytes()
    manifest_before = (root / "manifest.json").read_text()
    replacement = _worms(6, name="w", n_crossings=0, n_touching=0)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_training_folder(root, [_worms(7, name="new"), replacement])
    # nothing was written, not even the new name
    assert (root / "images" / "w.tif").read_bytes() == before
    assert (root / "manifest.json").read_text() == manifest_before
    assert not (root / "images" / "new.tif").exists()
    write_training_folder(root, [replacement], overwrite=True)
    (back,) = read_training_folder(root)
    _assert_same(replacement, back)
    # the old instance stack is gone since the new masks do not overlap
    assert not (root / "instances" / "w.tif").exists()


def test_adding_names_extends_manifest(tmp_path):
    write_training_folder(tmp_path, [_worms(8, name="a")], model="m1")
    write_training_folder(tmp_path, [_worms(9, name="b")], model="m2")
    assert training_folder_names(tmp_path) == ["a", "b"]
    back = read_training_folder(tmp_path)
    assert [s.metadata["model"] for s in back] == ["m1", "m2"]


def test_failed_write_leaves_previous_export_readable(tmp_path, monkeypatch):
    first = _worms(10, name="first")
    write_training_folder(tmp_path, [first])
    manifest_before = (tmp_path / "manifest.json").read_text()
    real = tf._write_tiff
    calls = {"n": 0}

    def flaky(path, data, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # fail in the middle of the second sample
            raise OSError("disk full")
        real(path, data, **kwargs)

    monkeypatch.setattr(tf, "_write_tiff", flaky)
    with pytest.raises(OSError, match="disk full"):
        write_training_folder(
            tmp_path, [_worms(11, name="second"), _worms(12, name="third")], model="x"
        )
    assert (tmp_path / "manifest.json").read_text() == manifest_before
    assert _tmp_files(tmp_path) == []
    assert not (tmp_path / "images" / "second.tif").exists()
    (back,) = read_training_folder(tmp_path)
    _assert_same(first, back)


def test_failed_overwrite_keeps_old_files(tmp_path, monkeypatch):
    old = _worms(13, name="w")
    write_training_folder(tmp_path, [old])

    def broken(path, data, **kwargs):
        raise OSError("no space")

    monkeypatch.setattr(tf, "_write_tiff", broken)
    with pytest.raises(OSError):
        write_training_folder(tmp_path, [_worms(14, name="w")], overwrite=True)
    (back,) = read_training_folder(tmp_path)
    _assert_same(old, back)
    assert _tmp_files(tmp_path) == []


@pytest.mark.parametrize("name", ["", " a", "../evil", "a/b", ".hidden", "x:y"])
def test_bad_names(tmp_path, name):
    sample = Sample(image=np.zeros((8, 8), np.float32), masks=np.zeros((0, 8, 8)), name=name)
    with pytest.raises(ValueError, match="name"):
        write_training_folder(tmp_path, [sample])
    assert list(tmp_path.iterdir()) == []


def test_duplicate_names_and_bad_flags(tmp_path):
    a = _worms(15, name="dup")
    with pytest.raises(ValueError, match="unique"):
        write_training_folder(tmp_path, [a, _worms(16, name="dup")])
    a.reviewed = np.ones(a.n_instances + 1, bool)
    with pytest.raises(ValueError, match="reviewed"):
        write_training_folder(tmp_path, [a])
    assert not (tmp_path / "manifest.json").exists()


def test_reading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_training_folder(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a training folder"):
        read_training_folder(tmp_path / "empty")
    root = write_training_folder(tmp_path / "t", [_worms(17, name="a"), _worms(18, name="b")])
    (root / "masks" / "b.tif").unlink()
    with pytest.raises(FileNotFoundError, match="b.tif"):
        read_training_folder(root)
    tifffile.imwrite(root / "masks" / "b.tif", np.zeros((50, 60), np.uint16))
    with pytest.raises(ValueError, match="label image of 'b'"):
        read_training_folder(root)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        read_training_folder(root)
    (root / "manifest.json").write_text(json.dumps({"format": tf.FORMAT, "version": 99}))
    with pytest.raises(ValueError, match="version"):
        read_training_folder(root)


def test_instance_stack_size_mismatch(tmp_path):
    root = write_training_folder(tmp_path, [_worms(19, name="a", n_crossings=1)])
    tifffile.imwrite(root / "instances" / "a.tif", np.zeros((4, 10, 10), np.uint8))
    with pytest.raises(ValueError, match="instance stack"):
        read_training_folder(root)


def test_plain_folder_without_manifest(tmp_path):
    labels = np.zeros((20, 30), np.uint16)
    labels[2:6, 2:9] = 1
    labels[10:15, 5:20] = 2
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "images" / "x.tif", np.ones((20, 30), np.float32))
    tifffile.imwrite(tmp_path / "masks" / "x.tif", labels)
    (sample,) = read_training_folder(tmp_path)
    assert sample.name == "x" and sample.masks.shape == (2, 20, 30)
    np.testing.assert_array_equal(sample.masks[1], labels == 2)
    tifffile.imwrite(tmp_path / "images" / "y.tif", np.ones((20, 30), np.float32))
    with pytest.raises(FileNotFoundError, match="masks/y.tif"):
        read_training_folder(tmp_path)


def test_top_level_api():
    import napari_instseg as nis

    assert nis.write_training_folder is write_training_folder
    assert nis.read_training_folder is read_training_folder


@pytest.mark.bbbc010
def test_round_trip_bbbc010(bbbc010_root, tmp_path):
    samples = read_bbbc010(bbbc010_root, wells=["A01", "B05"])
    for sample in samples:
        sample.reviewed = np.ones(sample.n_instances, bool)
    assert any((s.masks.sum(axis=0) > 1).any() for s in samples)
    root = write_training_folder(tmp_path / "bbbc", samples, model="reference")
    back = read_training_folder(root)
    assert [s.name for s in back] == ["A01", "B05"]
    for a, b in zip(samples, back, strict=True):
        _assert_same(a, b)
        assert b.metadata["source"] == a.metadata["source"]
        assert b.metadata["dataset"] == "BBBC010"
