"""Reader, writer and sample data of the plugin; export -> re-open round trip (no Qt)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.components import ViewerModel  # noqa: E402

from napari_instseg._napari import io as nio  # noqa: E402
from napari_instseg._napari.session import Session  # noqa: E402
from napari_instseg.core.oracle import prediction_from_masks  # noqa: E402
from napari_instseg.core.synthetic import make_worms  # noqa: E402
from napari_instseg.core.training_folder import read_training_folder  # noqa: E402
from napari_instseg.core.types import Instances  # noqa: E402


@pytest.fixture
def session():
    sample = make_worms(shape=(96, 112), n_worms=3, n_crossings=1, n_touching=0, seed=1)
    assert (sample.masks.sum(0) > 1).any()  # the round trip must keep an overlap
    viewer = ViewerModel()
    layer = viewer.add_image(sample.image, name="plate")
    s = Session(viewer, layer)
    s.set_prediction(prediction_from_masks(sample.masks), model_name="oracle")
    s.sample = sample
    return s


def seeds_of(masks):
    """One pixel per mask that no other mask covers."""
    out = []
    for i, m in enumerate(masks):
        only = m & ~np.delete(masks, i, axis=0).any(0)
        rows, cols = np.nonzero(only)
        out.append((int(rows[len(rows) // 2]), int(cols[len(cols) // 2])))
    return out


def test_sample_data_is_the_synthetic_worms():
    [(data, kwargs, kind)] = nio.sample_data()
    assert kind == "image" and data.shape == (520, 696) and data.std() > 0
    assert kwargs["name"] == "sample worms"


def test_export_then_reopen_round_trip(session, tmp_path):
    for p in seeds_of(session.sample.masks):
        session.grow_new(p)
    assert len(session.worms) == 3
    session.mark_reviewed(session.worms[0].label)
    out = tmp_path / "export"
    session.export(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "napari-instseg-training-folder"
    with pytest.raises(FileExistsError):
        session.export(out)  # never silently overwrites

    assert nio.get_reader(str(out)) is not None
    assert nio.get_reader(str(tmp_path / "nothing-here")) is None
    layers = nio.read(str(out))
    kinds = [kind for _, _, kind in layers]
    assert kinds[:2] == ["image", "labels"]
    image, labels = layers[0][0], layers[1][0]
    np.testing.assert_array_equal(image, session.image)
    np.testing.assert_array_equal(labels, session.instances.to_labels())
    meta = layers[1][1]["metadata"]["napari_instseg"]
    np.testing.assert_array_equal(meta["masks"], session.instances.masks)  # overlaps kept
    assert meta["reviewed"].tolist() == [True, False, False]

    # opened into a new viewer and adopted by a session: the same instances come back
    viewer = ViewerModel()
    img = viewer.add_image(image, **layers[0][1])
    lab = viewer.add_labels(labels, **layers[1][1])
    again = Session(viewer, img)
    again.adopt_labels_layer(lab)
    assert len(again.worms) == 3
    for a, b in zip(again.worms, sorted(session.worms, key=lambda w: w.label), strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.reviewed == b.reviewed
        assert a.edited == b.edited  # hand-made worms stay "edited": Segment all keeps them
    assert all(w.edited for w in again.worms)
    again.set_prediction(prediction_from_masks(session.sample.masks[:1]), model_name="oracle")
    again.auto_segment(method="boundary")
    for a, b in zip(sorted(session.worms, key=lambda w: w.label), again.worms[:3], strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)


def test_writer_exports_live_session_with_overlaps(session, tmp_path):
    for p in seeds_of(session.sample.masks):
        session.grow_new(p)
    layer = session.labels_layer
    out = tmp_path / "written"
    paths = nio.write_training(
        str(out),
        [
            (session.image_layer.data, {"name": "plate"}, "image"),
            (layer.data, {"name": layer.name, "metadata": layer.metadata}, "labels"),
        ],
    )
    assert paths == [str(out)]
    layers = nio.read(str(out))
    masks = layers[1][1]["metadata"]["napari_instseg"]["masks"]
    assert (masks.sum(0) > 1).any()  # the writer used the side model, not the flat labels
    with pytest.raises(FileExistsError, match="already holds an image named 'plate'"):
        nio.write_training(
            str(out),
            [(layer.data, {"name": "w"}, "labels"), (session.image, {"name": "plate"}, "image")],
        )  # the same image again: never replaced
    # another image saved into the training folder joins it, as the widget's Export does
    nio.write_training(
        str(out), [(layer.data, {"name": "w"}, "labels"), (session.image, {"name": "b"}, "image")]
    )
    assert [s.name for s in read_training_folder(out)] == ["plate", "b"]
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a training folder"):
        nio.write_training(
            str(notes), [(layer.data, {"name": "w"}, "labels"), (session.image, {}, "image")]
        )
    with pytest.raises(ValueError, match="exactly one Labels"):
        nio.write_training(str(tmp_path / "x"), [(session.image, {}, "image")])


def test_writer_without_session_uses_labels(tmp_path):
    labels = np.zeros((20, 30), np.int32)
    labels[2:8, 3:20] = 1
    labels[10:15, 5:9] = 2
    image = np.random.default_rng(0).random((20, 30)).astype(np.float32)
    nio.write_training(
        str(tmp_path / "f"), [(labels, {"name": "l"}, "labels"), (image, {"name": "im"}, "image")]
    )
    layers = nio.read(str(tmp_path / "f"))
    np.testing.assert_array_equal(layers[1][0], labels)
    assert (
        Instances(masks=layers[1][1]["metadata"]["napari_instseg"]["masks"]).to_labels().max() == 2
    )


def test_reader_bbbc010_one_well(bbbc010_root):
    well_file = next((bbbc010_root / "images").glob("*_A01_w2_*.tif"))
    reader = nio.get_reader(str(well_file))
    assert reader is not None
    layers = reader(str(well_file))
    assert layers[0][0].shape == (520, 696) and layers[1][0].max() > 3


def test_session_sync_after_hand_painting(session):
    p, q, _ = seeds_of(session.sample.masks)
    session.grow_new(p)
    layer = session.labels_layer
    # paint a new label by hand (napari's paint tool goes through the same history)
    layer.data_setitem((np.array([1, 1, 2]), np.array([1, 2, 1])), 7)
    assert session.sync() or session.worm(7) is not None
    worm = session.worm(7)
    assert worm is not None and worm.origin == "hand" and worm.edited and worm.area == 3
    layer.undo()
    session.sync()
    assert session.worm(7) is None and len(session.worms) == 1


def test_napari_save_and_open_through_the_plugin(session, tmp_path):
    """File > Save Selected Layers / Open Folder go through the manifest's writer and reader."""
    import npe2
    from napari.plugins import _initialize_plugins
    from napari.plugins.io import save_layers

    _initialize_plugins()
    if npe2.PluginManager.instance().get_manifest("napari-instseg") is None:
        pytest.skip("napari-instseg is not installed (pip install -e .)")
    for p in seeds_of(session.sample.masks):
        session.grow_new(p)
    out = tmp_path / "saved"
    written = save_layers(
        str(out), [session.image_layer, session.labels_layer], plugin="napari-instseg"
    )
    assert written == [str(out)] and (out / "manifest.json").is_file()
    viewer = ViewerModel()
    layers = viewer.open(str(out), plugin="napari-instseg")
    assert [type(layer).__name__ for layer in layers][:2] == ["Image", "Labels"]
    np.testing.assert_array_equal(layers[1].data, session.labels_layer.data)
    again = Session(viewer, layers[0])
    again.adopt_labels_layer(layers[1])
    assert len(again.worms) == len(session.worms)
    assert (again.instances.masks.sum(0) > 1).any()  # overlaps survived the round trip


def test_worms_layer_is_uint16_and_widens_past_its_range(session):
    """uint16 spares napari's int32 label kernel; a label past 65535 widens the layer."""
    p = seeds_of(session.sample.masks)[0]
    session.grow_new(p)
    layer = session.labels_layer
    assert layer.data.dtype == np.uint16
    worm = session.worms[0]
    session.worms = (type(worm)(70000, worm.mask, seeds=worm.seeds),)
    session._register()
    session._write((type(worm)(70001, worm.mask, seeds=worm.seeds),))
    assert layer.data.dtype == np.int32 and layer.data.max() == 70001
    assert [w.label for w in session.worms] == [70001]
