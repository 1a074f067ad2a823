"""The demo (``python -m napari_instseg.demo``, ``make demo``): a new user's first run."""

from __future__ import annotations

import numpy as np
import pytest

from napari_instseg._napari import compute
from napari_instseg._napari.layers import LAYER_NAMES
from napari_instseg.core.synthetic import sample_worms

pytest.importorskip("napari")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Keep the demo's prediction cache out of the user's cache folder, and forget it after."""
    monkeypatch.setenv(compute.CACHE_ENV, str(tmp_path / "cache"))
    compute._PREDICTIONS.clear()
    yield
    compute._PREDICTIONS.clear()


@pytest.fixture(autouse=True)
def _viewers_napari_cleans_up(make_napari_viewer, monkeypatch):
    """The demo's ``napari.Viewer(...)`` made by napari's test fixture.

    A viewer made directly leaves napari's plugins registered in the app after the test,
    and a later test that registers them again fails ("already registered"); the fixture
    isolates them and closes its viewers.
    """
    import napari

    monkeypatch.setattr(napari, "Viewer", make_napari_viewer)


def _close(viewer):
    viewer.close()


def test_demo_runs_the_shipped_model_and_segments_the_sample(qtbot):
    """The demo must run the shipped weights, not fall back to the oracle unnoticed."""
    from napari_instseg.demo import build_viewer

    viewer, widget = build_viewer(show=True)
    try:
        session = widget.session()
        status = widget.status.text()
        assert "Model unavailable" not in status, status
        assert "oracle" not in session.prediction.metadata.get("model", "")
        assert "worms found" in status
        labels = session.labels_layer
        assert viewer.layers.selection.active is labels
        found = set(np.unique(labels.data).tolist()) - {0}
        truth = sample_worms().masks
        # the shipped model finds most of the sample's worms, each as its own label
        assert len(found) >= len(truth) // 2
        assert len(session.worms) == len(found)
        # every map the model predicts is a layer
        for key in ("embeddings", "seediness", "boundary", "foreground", "seeds", "worms"):
            assert LAYER_NAMES[key] in viewer.layers
        assert any(layer.name.startswith(LAYER_NAMES["class_score"]) for layer in viewer.layers)
    finally:
        _close(viewer)


def test_demo_falls_back_to_the_oracle_and_says_so(qtbot, monkeypatch):
    """No usable weights (a fresh checkout before training): the demo still works, and says why."""
    from napari_instseg.demo import build_viewer

    def broken(*args, **kwargs):
        raise FileNotFoundError("no weights here")

    monkeypatch.setattr(compute, "cached_predict", broken)
    viewer, widget = build_viewer(show=True)
    try:
        status = widget.status.text()
        assert "Model unavailable (FileNotFoundError: no weights here)" in status
        assert widget.session().prediction.metadata["model"] == "oracle (ground truth)"
        assert len(widget.session().worms) >= len(sample_worms().masks) // 2
    finally:
        _close(viewer)
    with pytest.raises(FileNotFoundError, match="no weights here"):
        build_viewer(show=True, oracle_fallback=False)  # (its viewer: the fixture closes it)


def test_demo_screenshot_saves_the_whole_window(tmp_path, qtbot):
    """``--screenshot`` writes a PNG of the window (canvas, layer list, widget) and exits."""
    import imageio.v3 as iio

    from napari_instseg.demo import main

    out = tmp_path / "demo.png"
    assert main(["--screenshot", str(out)]) == 0
    png = iio.imread(out)
    assert png.ndim == 3 and png.shape[0] >= 600 and png.shape[1] >= 900
    # not a blank window: the canvas shows the worms and the widget its controls
    assert png[..., :3].std() > 10
    assert len(np.unique(png[..., :3].reshape(-1, 3), axis=0)) > 100
