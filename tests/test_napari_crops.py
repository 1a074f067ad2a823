"""Segment all hands the session each worm as a crop (``core.instances.segment_cropped``).

``Session.apply_segmentation`` takes ``CroppedInstances`` as well as ``Instances``: the
worms, their areas and boxes and the label image must be the same either way.
"""

import numpy as np
import pytest

from napari_instseg._napari import compute
from napari_instseg.core.instances import segment_cropped
from napari_instseg.core.oracle import prediction_from_masks
from napari_instseg.core.synthetic import make_worms


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(compute.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture
def worms():
    return make_worms(shape=(160, 160), n_worms=5, n_crossings=1, n_touching=1, seed=3)


@pytest.fixture
def widget(make_napari_viewer, monkeypatch, worms):
    from napari_instseg._napari.widget import InstSegWidget

    compute.clear_cache()
    oracle = prediction_from_masks(worms.masks, noise=0.1)
    monkeypatch.setattr(compute, "predict_image", lambda image, *a, **k: oracle)
    viewer = make_napari_viewer(show=False)
    viewer.add_image(worms.image, name="worms image")
    w = InstSegWidget(viewer)
    viewer.window.add_dock_widget(w, name="instseg")
    return w


def _state(session):
    worms = sorted(session.worms, key=lambda w: w.label)
    return (
        np.asarray(session.labels_layer.data).copy(),
        [(w.label, w.area, w.bbox, w.score, w.cls, w.seeds, w.origin) for w in worms],
        [np.packbits(w.mask).tobytes() for w in worms],
    )


def test_apply_segmentation_of_crops_is_that_of_masks(widget):
    widget.run_model(blocking=True)
    session = widget.session()
    crops = segment_cropped(session.prediction, method="boundary")
    assert len(crops) >= 3
    session.apply_segmentation(crops.to_instances(), keep_edited=False)
    expected = _state(session)
    session.apply_segmentation(crops, keep_edited=False)
    found = _state(session)
    np.testing.assert_array_equal(found[0], expected[0])
    assert found[1:] == expected[1:]
    for worm in session.worms:  # the area and box given from the crop are the mask's
        rows, cols = np.nonzero(worm.mask)
        assert worm.area == len(rows)
        assert worm.bbox == (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1)

    # an edited worm is kept, and found worms lying mostly on it are dropped, either way
    first = session.worms[0]
    session.mark_reviewed(first.label)
    session.apply_segmentation(crops.to_instances(), keep_edited=True)
    expected = _state(session)
    session.mark_reviewed(first.label)  # (the undo history differs; the state is what counts)
    session.apply_segmentation(crops, keep_edited=True)
    found = _state(session)
    np.testing.assert_array_equal(found[0], expected[0])
    assert found[1:] == expected[1:]
