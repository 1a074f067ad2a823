"""The dock widget in a real (offscreen-X) napari window: clicks on the canvas, undo, layers."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from qtpy.QtCore import QTimer

from napari_instseg._napari import compute
from napari_instseg.core.oracle import prediction_from_masks
from napari_instseg.core.synthetic import make_worms
from napari_instseg.core.types import Instances

pytest.importorskip("napari")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Keep the on-disk prediction cache of these tests out of the user's cache folder."""
    monkeypatch.setenv(compute.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture
def worms():
    return make_worms(shape=(160, 160), n_worms=4, n_crossings=1, n_touching=1, seed=3)


@pytest.fixture
def widget(make_napari_viewer, monkeypatch, worms):
    """Viewer + widget whose model is the oracle prediction of the synthetic worms."""
    from napari_instseg._napari.widget import InstSegWidget

    compute.clear_cache()
    oracle = prediction_from_masks(worms.masks, noise=0.1)  # noise: tau matters
    calls = []

    def fake_predict(image, model=None, device="auto", progress=None, tta=1, scale=1.0):
        calls.append(image.shape)
        if progress is not None:
            progress(1, 1)
        return oracle

    monkeypatch.setattr(compute, "predict_image", fake_predict)
    viewer = make_napari_viewer(show=True)
    viewer.add_image(worms.image, name="worms image")
    w = InstSegWidget(viewer)
    viewer.window.add_dock_widget(w, name="instseg")
    w.calls = calls
    return w


def canvas_pos(viewer, row, col):
    """Canvas pixel position of a data (row, col) in a 2D view (layers without transforms)."""
    canvas = viewer.window._qt_viewer.canvas
    x, y = canvas.view.scene.transform.map([col, row, 0, 1])[:2]
    return float(x), float(y)


def click(qtbot, viewer, row, col, modifiers=()):
    canvas = viewer.window._qt_viewer.canvas._scene_canvas
    pos = canvas_pos(viewer, row, col)
    canvas.events.mouse_press(pos=pos, modifiers=modifiers, button=1)
    canvas.events.mouse_release(pos=pos, modifiers=modifiers, button=1)
    qtbot.wait(5)


def inner_pixel(masks, i):
    """A pixel deep inside mask i (max distance transform), away from crossings."""
    from scipy import ndimage

    mask = masks[i] & ~np.delete(masks, i, axis=0).any(axis=0)
    dt = ndimage.distance_transform_edt(mask)
    return tuple(int(v) for v in np.unravel_index(dt.argmax(), mask.shape))


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_click_grows_worm_and_undo(widget, worms, qtbot, tmp_path):
    viewer = widget.viewer
    # our data -> canvas conversion agrees with napari's cursor
    canvas = viewer.window._qt_viewer.canvas._scene_canvas
    canvas.events.mouse_move(pos=canvas_pos(viewer, 40, 90), modifiers=(), button=None)
    qtbot.wait(5)
    assert np.allclose(viewer.cursor.position[-2:], (40, 90), atol=0.6)

    widget.run_model(blocking=True)
    session = widget.session()
    names = [layer.name for layer in viewer.layers]
    for expected in (
        "embeddings (PCA RGB)",
        "seediness",
        "boundary",
        "foreground",
        "worms",
        "seeds",
    ):
        assert expected in names
    assert viewer.layers["embeddings (PCA RGB)"].rgb
    assert not viewer.layers["seediness"].visible  # secondary maps hidden by default
    labels = session.labels_layer
    assert labels.data.max() == 0

    assert widget.save_seeds(tmp_path / "none.csv") is None  # no clicks yet: nothing written
    assert not (tmp_path / "none.csv").exists()
    target = 0
    r, c = inner_pixel(worms.masks, target)
    click(qtbot, viewer, r, c)
    assert labels.data.max() == 1
    grown = labels.data == 1
    assert iou(grown, worms.masks[target]) > 0.8
    assert len(session.worms) == 1 and session.worms[0].seeds == ((r, c),)

    r2, c2 = inner_pixel(worms.masks, 1)
    click(qtbot, viewer, r2, c2)
    assert set(np.unique(labels.data)) == {0, 1, 2}
    second = session.worm(2).mask  # full mask, overlaps kept in the side model
    assert iou(second, worms.masks[1]) > 0.8
    assert not ((labels.data == 2) & ~second).any()

    labels.undo()
    assert set(np.unique(labels.data)) == {0, 1}
    assert [w.label for w in session.worms] == [1]
    labels.redo()
    assert len(session.worms) == 2

    # a second Run reuses the cached prediction
    widget.run_model()
    assert len(widget.calls) == 1


def test_click_on_the_background_adds_no_instance(widget, worms, qtbot):
    viewer = widget.viewer
    widget.run_model(blocking=True)
    session = widget.session()
    background = np.argwhere(~worms.masks.any(0))
    r, c = (int(v) for v in background[len(background) // 2])
    for tool in ("new", "add"):
        widget.set_tool(tool)
        click(qtbot, viewer, r, c)
        assert session.labels_layer.data.max() == 0 and not session.worms
        assert "No worm here" in widget.status.text()
    # a worm is still grown, and the add tool's message names the new instance
    click(qtbot, viewer, *inner_pixel(worms.masks, 0))
    assert session.labels_layer.data.max() == 1
    assert widget.status.text() == "New instance 1."
    # a second click on the same worm selects it rather than adding a duplicate
    session.select(None)
    widget.set_tool("new")
    click(qtbot, viewer, *inner_pixel(worms.masks, 0))
    assert [w.label for w in session.worms] == [1] and session.selected == 1
    assert "already this worm" in widget.status.text()
    # after Segment all, a click on a segmented worm selects its instance too
    widget.segment(blocking=True)
    count = len(session.worms)
    r, c = inner_pixel(worms.masks, 1)
    click(qtbot, viewer, r, c)
    assert len(session.worms) == count
    assert session.selected == session.labels_layer.data[r, c]


def test_remove_merge_split_with_clicks(widget, worms, qtbot):
    viewer = widget.viewer
    widget.run_model(blocking=True)
    session = widget.session()
    labels = session.labels_layer
    pair = (2, 3)  # a touching (not crossing) pair in this image
    assert not (worms.masks[2] & worms.masks[3]).any()
    pts = [inner_pixel(worms.masks, i) for i in pair]
    for p in pts:
        click(qtbot, viewer, *p)
    assert len(session.worms) == 2

    # merge: two clicks
    widget.set_tool("merge")
    click(qtbot, viewer, *pts[0])
    click(qtbot, viewer, *pts[1])
    assert len(session.worms) == 1
    merged = session.worms[0].mask
    assert iou(merged, worms.masks[2] | worms.masks[3]) > 0.8
    assert set(np.unique(labels.data)) == {0, 1}
    labels.undo()
    assert len(session.worms) == 2
    labels.redo()
    assert len(session.worms) == 1

    # split the merged instance back along the boundary map
    widget.set_tool("split")
    click(qtbot, viewer, *pts[0])
    click(qtbot, viewer, *pts[1])
    assert len(session.worms) == 2
    a, b = (w.mask for w in sorted(session.worms, key=lambda w: w.label))
    assert iou(a, worms.masks[2]) > 0.8 and iou(b, worms.masks[3]) > 0.8
    assert not (a & b).any()

    # remove
    widget.set_tool("remove")
    click(qtbot, viewer, *pts[1])
    assert len(session.worms) == 1
    assert not labels.data[worms.masks[3]].any() and labels.data[worms.masks[2]].all()
    labels.undo()
    assert len(session.worms) == 2


def test_tau_slider_seeds_and_similarity(widget, worms, qtbot, tmp_path):
    viewer = widget.viewer
    widget.run_model(blocking=True)
    session = widget.session()
    labels = session.labels_layer
    click(qtbot, viewer, *inner_pixel(worms.masks, 0))
    before = labels.data.copy()
    n_undo = len(labels._undo_history)
    sizes = []
    for tau in (0.7, 0.85, 0.95):
        widget.set_tau(tau, live=True)
        sizes.append(int((labels.data == 1).sum()))
    widget.end_tau_drag()
    assert session.worms[0].tau == pytest.approx(0.95)
    assert before.astype(bool).sum() >= sizes[0] > sizes[-1] > 0  # higher tau: tighter mask
    assert len(labels._undo_history) == n_undo + 1  # the whole drag is one undo step
    labels.undo()
    np.testing.assert_array_equal(labels.data, before)
    assert session.worms[0].tau == pytest.approx(0.5)

    p = inner_pixel(worms.masks, 0)
    # a negative seed on the same worm's far end removes pixels near it
    rows, cols = np.nonzero(worms.masks[0] & ~worms.masks[1:].any(0))
    far = int(np.argmax((rows - p[0]) ** 2 + (cols - p[1]) ** 2))
    neg = (int(rows[far]), int(cols[far]))
    widget.set_tool("negative")
    click(qtbot, viewer, *neg)
    worm = session.worms[0]
    assert worm.negatives == (neg,)
    assert not worm.mask[neg]
    qtbot.waitUntil(lambda: len(viewer.layers["seeds"].data) == 2, timeout=2000)
    # shift+click adds a positive seed back
    widget.set_tool("new")
    click(qtbot, viewer, *neg, modifiers=("Shift",))
    assert session.worms[0].mask[neg] and len(session.worms) == 1

    # the clicks as a seed file grow the same worm again (what ``napari-instseg grow`` does)
    from napari_instseg.core.grow import grow_instances
    from napari_instseg.core.io import read_seed_table

    path = widget.save_seeds(tmp_path / "seeds.csv")
    (regrown,) = read_seed_table(path)[0].values()
    assert regrown.positive == session.worms[0].seeds and regrown.tau == session.worms[0].tau
    again = grow_instances(session.prediction, [regrown])
    np.testing.assert_array_equal(again.masks[0], session.worms[0].mask)

    # live similarity: moving the mouse updates the layer
    widget.hover_check.setChecked(True)
    assert viewer.layers["similarity to cursor"].visible
    canvas = viewer.window._qt_viewer.canvas._scene_canvas
    canvas.events.mouse_move(pos=canvas_pos(viewer, *p), modifiers=(), button=None)
    qtbot.waitUntil(lambda: viewer.layers["similarity to cursor"].data.max() > 0.99, timeout=2000)
    sim = viewer.layers["similarity to cursor"].data
    (r0, r1, c0, c1), step = session.visible_window()  # what the canvas shows
    shown = worms.masks[:, r0:r1:step, c0:c1:step]
    assert sim[shown[0] & ~shown[1:].any(0)].mean() > 0.9
    assert sim[~shown.any(0)].mean() < 0.1


def test_auto_segment_keeps_edits_review_measure(widget, worms, qtbot, tmp_path):
    viewer = widget.viewer
    widget.run_model(blocking=True)
    session = widget.session()
    click(qtbot, viewer, *inner_pixel(worms.masks, 0))
    edited = session.worms[0]
    n = widget.segment(blocking=True)
    assert n >= len(worms.masks) - 1
    assert edited in session.worms  # the hand-made instance survived
    labels = session.labels_layer
    matched = sum(max(iou(w.mask, m) for w in session.worms) > 0.7 for m in worms.masks)
    assert matched >= len(worms.masks) - 1
    # keep_edited off replaces everything
    widget.keep_edited.setChecked(False)
    widget.segment(blocking=True)
    assert edited not in session.worms
    labels.undo()
    assert edited in session.worms

    # review: next_to_review goes to the lowest score, centres the camera
    first = widget.next_to_review()
    worm = session.worm(first)
    assert worm.score == min(w.score for w in session.worms)
    rows, cols = np.nonzero(worm.mask)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    assert np.allclose(camera.center[-2:], (rows.mean(), cols.mean()), atol=1)
    widget.mark_reviewed()
    assert session.worm(first).reviewed
    assert widget.next_to_review() != first
    second = session.selected
    widget.mark_reviewed()  # K twice: the review is taken back
    widget.mark_reviewed()
    assert not session.worm(second).reviewed and session.worm(first).reviewed
    assert widget.review_label.text().startswith("1 /")

    # measurements
    table = widget.measure()
    assert len(table) == len(session.worms)
    assert list(labels.features["index"]) == sorted(w.label for w in session.worms)
    csv = widget.save_csv(tmp_path / "m.csv")
    assert csv.read_text().splitlines()[0].startswith("label")

    # screenshot of the whole window: not blank, worms coloured on the image
    shot = widget.viewer.screenshot(canvas_only=False)
    assert shot.ndim == 3 and shot.shape[0] > 200 and shot.shape[1] > 300
    viewer.reset_view()
    with_worms = viewer.screenshot(canvas_only=True)[..., :3].astype(float)
    assert with_worms.std() > 10  # not blank
    labels.visible = False
    without = viewer.screenshot(canvas_only=True)[..., :3].astype(float)
    changed = np.abs(with_worms - without).max(axis=-1) > 20
    assert changed.mean() > 0.01  # the worms layer visibly colours the worms


def test_run_model_in_worker_cancel_and_cache(make_napari_viewer, monkeypatch, worms, qtbot):
    """A background prediction reports progress, can be cancelled, and is cached after."""
    import time

    from napari_instseg._napari.widget import InstSegWidget

    compute.clear_cache()
    oracle = prediction_from_masks(worms.masks)
    reports = []

    def slow_predict(image, model=None, device="auto", progress=None, tta=1, scale=1.0):
        for i in range(200):
            time.sleep(0.01)
            progress(i + 1, 200)  # raises Cancelled once the user pressed Cancel
            reports.append(i)
        return oracle

    monkeypatch.setattr(compute, "predict_image", slow_predict)
    viewer = make_napari_viewer()
    viewer.add_image(worms.image, name="img")
    widget = InstSegWidget(viewer)
    worker = widget.run_model()
    assert not widget.run_btn.isEnabled() and widget.cancel_btn.isEnabled()
    qtbot.waitUntil(lambda: len(reports) > 3, timeout=5000)
    assert widget.segment() is None  # Segment all while the model runs: it says to wait
    assert "still running" in widget.status.text()
    widget.cancel()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=5000)
    assert len(reports) < 200 and widget.session().prediction is None
    assert "cancelled" in widget.status.text().lower()
    assert not compute.is_cached(worms.image)

    # a full run in the worker shows the layers, then the result comes from the cache
    qtbot.waitUntil(lambda: widget._showing is None and len(widget._map_layers) == 5)
    reports.clear()
    turns = []  # layers present at each turn of the event loop while showing
    actives = []  # the active layer at each turn once the worms layer exists
    timer = QTimer()

    def record_turn():
        turns.append(len(viewer.layers))
        if "worms" in viewer.layers:
            actives.append(viewer.layers.selection.active)

    timer.timeout.connect(record_turn)
    timer.start(0)
    with qtbot.waitSignal(widget.prediction_shown, timeout=15000):
        worker = widget.run_model()
        assert not widget.progress_bar.isHidden()
    timer.stop()
    assert len(reports) == 200 and "worms" in viewer.layers and "seeds" in viewer.layers
    assert widget.session().prediction is oracle
    # worms, seeds and the (empty) maps came with the image's choice, before the run: the
    # result only filled them, no layer was added while the model ran or its maps appeared
    assert len(viewer.layers) == 8 and set(turns) == {8}
    # and the worms layer kept the selection, so a click while they appear goes to the worms
    assert actives and all(a is viewer.layers["worms"] for a in actives)
    qtbot.waitUntil(widget.progress_bar.isHidden, timeout=5000)
    reports.clear()
    assert widget.run_model() is oracle and not reports

    # automatic segmentation in a worker fills the worms layer (one undo step)
    worker = widget.segment()
    with qtbot.waitSignal(worker.finished, timeout=20000):
        pass
    qtbot.waitUntil(lambda: len(widget.session().worms) > 0, timeout=5000)
    assert viewer.layers["worms"].data.max() > 0
    viewer.layers["worms"].undo()
    assert viewer.layers["worms"].data.max() == 0 and not widget.session().worms


def test_click_redraws_only_its_region_and_undo_restores(widget, worms, qtbot):
    """A click writes the new worm's pixels only (partial refresh), as one undo step."""
    import numba

    viewer = widget.viewer
    widget.run_model(blocking=True)
    session = widget.session()
    labels = session.labels_layer
    click(qtbot, viewer, *inner_pixel(worms.masks, 0))
    before = labels.data.copy()
    partial, full = [], []
    labels.events.labels_update.connect(lambda e: partial.append((e.offset, e.data.shape)))
    labels.events.set_data.connect(lambda e: full.append(e))
    click(qtbot, viewer, *inner_pixel(worms.masks, 1))
    grown = session.worm(2).mask
    assert not full and len(partial) == 1  # no full refresh of the label image
    (r0, c0), (h, w) = partial[0][0][-2:], partial[0][1][:2]
    rows, cols = np.nonzero(grown & (labels.data == 2))
    assert r0 == rows.min() and c0 == cols.min()  # the updated box is the new worm's
    assert r0 + h == rows.max() + 1 and c0 + w == cols.max() + 1
    changed = np.argwhere(labels.data != before)
    assert changed.min(0).tolist() == [r0, c0]  # exactly the pixels of the update box changed
    assert changed.max(0).tolist() == [r0 + h - 1, c0 + w - 1]
    labels.undo()
    np.testing.assert_array_equal(labels.data, before)
    assert [w.label for w in session.worms] == [1]
    labels.redo()
    assert session.worm(2) is not None and np.array_equal(session.worm(2).mask, grown)

    # napari's label colouring runs numba loops in this (GUI) thread: one thread there
    assert numba.get_num_threads() == 1
    seen = []
    thread = threading.Thread(target=lambda: seen.append(numba.get_num_threads()))
    thread.start()
    thread.join()
    assert seen == [numba.config.NUMBA_NUM_THREADS]  # other threads keep the default


def test_seeds_layer_follows_seeds_only(widget, worms, qtbot):
    viewer = widget.viewer
    widget.run_model(blocking=True)
    session = widget.session()
    seeds = viewer.layers["seeds"]
    draws, changes = [], []
    viewer.window._qt_viewer.canvas._scene_canvas.events.draw.connect(lambda e: draws.append(1))
    seeds.events.data.connect(lambda e: changes.append(len(draws)))
    p = inner_pixel(worms.masks, 0)
    click(qtbot, viewer, *p)
    assert session.labels_layer.data[p] == 1
    qtbot.waitUntil(lambda: seeds.data.tolist() == [list(p)], timeout=2000)
    assert changes[0] >= 1  # the canvas drew the new mask before the seed marker came
    np.testing.assert_allclose(seeds.face_color[0], [0, 1, 0, 1])
    n = len(changes)
    widget.set_tool("select")
    click(qtbot, viewer, *p)
    widget.mark_reviewed()
    qtbot.wait(150)
    assert len(changes) == n  # selecting and reviewing do not touch the seeds layer
    rows, cols = np.nonzero(worms.masks[0] & ~worms.masks[1:].any(0))
    far = int(np.argmax((rows - p[0]) ** 2 + (cols - p[1]) ** 2))
    neg = (int(rows[far]), int(cols[far]))
    widget.set_tool("negative")
    click(qtbot, viewer, *neg)
    qtbot.waitUntil(lambda: len(seeds.data) == 2, timeout=2000)
    assert seeds.data.tolist() == [list(p), list(neg)]
    np.testing.assert_allclose(seeds.face_color, [[0, 1, 0, 1], [1, 0, 0, 1]])
    session.labels_layer.undo()
    assert seeds.data.tolist() == [list(p)]

    # the score of a clicked worm is best_tau_class at that pixel
    _, cls, score = session.prediction.best_tau_class()
    for q in (p, neg, (0, 0)):
        assert session._score_at(q) == (pytest.approx(float(score[q])), int(cls[q]))


def tiny_model(path, seed=0):
    """A tiny untrained network saved to ``path``, initialised from ``seed``.

    Seeded: an untrained head of 4 channels gives a constant foreground map (every ReLU
    dead, the output its bias) for about one initialisation in eight, and a constant map
    is the same with test-time augmentation; unseeded, a test comparing them failed at
    random (torch's seed differs per process). The global RNG is left as it was.
    """
    import torch

    from napari_instseg.core.model import InstSegNet, ModelConfig
    from napari_instseg.core.weights import save_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = InstSegNet(ModelConfig(channels=(4, 8), embedding_dim=4, head_channels=4))
    return save_model(net, path)


def test_prediction_disk_cache_after_restart(make_napari_viewer, worms, tmp_path, qtbot):
    """A real (tiny) model: the second run after clearing memory reads the zarr cache."""
    from napari_instseg._napari.widget import MODEL_FILE, InstSegWidget

    compute.clear_cache()
    path = tiny_model(tmp_path / "tiny.safetensors")
    viewer = make_napari_viewer()
    viewer.add_image(worms.image[:64, :96], name="img")
    widget = InstSegWidget(viewer)
    widget.model_combo.setCurrentText(MODEL_FILE)
    widget.model_path.setText(str(path))
    with qtbot.waitSignal(widget.prediction_shown, timeout=60000):
        widget.run_model()
    first = widget.session().prediction
    assert first.metadata["cached"] is False
    assert np.ptp(first.foreground) > 0  # not a constant map (TTA would not change it)
    assert len(list(compute.cache_dir().glob("*.zarr"))) == 1
    assert compute.cache_dir().is_relative_to(tmp_path)

    compute.clear_cache()  # as after restarting napari
    with qtbot.waitSignal(widget.prediction_shown, timeout=60000):
        widget.run_model()
    second = widget.session().prediction
    assert second is not first and second.metadata["cached"] is True
    np.testing.assert_array_equal(second.embeddings, first.embeddings)
    assert "cache" in widget.status.text()

    # test-time augmentation is another result (memory and disk), same embeddings
    widget.tta_check.setChecked(True)
    assert not compute.is_cached(worms.image[:64, :96], str(path), 8)
    with qtbot.waitSignal(widget.prediction_shown, timeout=60000):
        widget.run_model()
    third = widget.session().prediction
    assert third.metadata["tta"] == 8 and third.metadata["cached"] is False
    np.testing.assert_array_equal(third.embeddings, first.embeddings)
    assert not np.array_equal(third.foreground, first.foreground)
    np.testing.assert_array_equal(widget.viewer.layers["foreground"].data, third.foreground)
    assert len(list(compute.cache_dir().glob("*.zarr"))) == 2
    widget.tta_check.setChecked(False)
    with qtbot.waitSignal(widget.prediction_shown, timeout=60000):
        widget.run_model()
    assert widget.session().prediction is second  # from memory, not recomputed


def test_scale_field_runs_the_model_at_another_scale(make_napari_viewer, worms, tmp_path, qtbot):
    """The scale field resizes the image for the network; layers stay on the image grid."""
    from napari_instseg._napari.widget import MODEL_FILE, InstSegWidget

    compute.clear_cache()
    path = tiny_model(tmp_path / "tiny.safetensors")  # no object_width: no "auto"
    viewer = make_napari_viewer()
    viewer.add_image(worms.image[:64, :96], name="img")
    widget = InstSegWidget(viewer)
    widget.model_combo.setCurrentText(MODEL_FILE)
    widget.model_path.setText(str(path))
    assert widget.scale() == 1.0
    widget.scale_spin.setValue(0.5)
    assert widget.scale() == 0.5
    with qtbot.waitSignal(widget.prediction_shown, timeout=60000):
        widget.run_model()
    prediction = widget.session().prediction
    assert prediction.metadata["scale"] == 0.5 and prediction.shape == (64, 96)
    assert widget.viewer.layers["foreground"].data.shape == (64, 96)
    assert "scale 0.5" in widget.status.text()
    # clicks grow on the network's grid, whose grow cache was built with the layers
    from napari_instseg.core import grow as grow_module

    assert any(ref() is prediction.model_grid for ref, _, _ in grow_module._CACHE)
    label = widget.session().grow_new((32, 48))
    grown = widget.session().worm(label).mask
    assert grown.shape == (64, 96) and grown[32, 48]  # on the image's grid, the click in it
    # corrected labels exported from it carry the scale, so training resizes them alike
    assert widget.session().to_sample().metadata["scale"] == 0.5
    assert compute.is_cached(worms.image[:64, :96], str(path), 1, 0.5)
    assert not compute.is_cached(worms.image[:64, :96], str(path), 1, 1.0)

    widget.scale_spin.setValue(0.0)
    assert widget.scale_spin.text() == "auto" and widget.scale() == "auto"
    assert widget.run_model() is not None  # a worker
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60000)
    assert "object_width" in widget.status.text()  # the model cannot estimate: said so


def test_cache_dir_env_and_prune(tmp_path, monkeypatch):
    monkeypatch.setenv(compute.CACHE_ENV, "off")
    assert compute.cache_dir() is None
    monkeypatch.setenv(compute.CACHE_ENV, str(tmp_path))
    folder = compute.cache_dir()
    assert folder == tmp_path / "predictions"
    folder.mkdir()
    import os

    for i in range(3):
        entry = folder / f"{i}.zarr"
        entry.mkdir()
        (entry / "data").write_bytes(b"x" * 1000)
        os.utime(entry, (1000 + i, 1000 + i))
    removed = compute.prune_cache(folder, max_gb=2500 / 1e9)
    assert removed == [folder / "0.zarr"]  # the oldest goes first, until it fits
    assert sorted(p.name for p in folder.iterdir()) == ["1.zarr", "2.zarr"]
    assert compute.prune_cache(folder, max_gb=0) == [folder / "1.zarr"]  # never the newest


def test_progress_bar_state():
    from napari_instseg._napari.widget import bar_state

    assert bar_state("predicting", 0.4, 3, 4) == (4, 3, "predicting: %p%")
    assert bar_state("predicting", 2.0, done=1, total=1) == (1, 1, "predicting: %p%")
    assert bar_state("predicting", 2.0, 0.25) == (100, 25, "predicting: %p%")
    # no fraction known: a still bar whose text counts seconds (no busy animation)
    assert bar_state("segmenting", 3.7) == (100, 0, "segmenting... 3 s")
    assert bar_state("predicting", 1.2, stage="showing layers") == (
        100,
        0,
        "predicting: showing layers... 1 s",
    )


def test_set_layer_data_and_state_key(make_napari_viewer):
    from napari_instseg._napari.session import set_layer_data, state_key

    viewer = make_napari_viewer()
    layer = viewer.add_image(np.zeros((20, 30), np.float32))
    seen, extents = [], []
    layer.events.data.connect(lambda e: seen.append(e))
    update = viewer._on_layers_change  # the viewer-wide dims update napari runs on data events
    viewer._on_layers_change = lambda *args: (extents.append(1), update())
    set_layer_data(viewer, layer, np.ones((20, 30), np.float32))  # same shape: quiet extent
    assert seen and layer.data.max() == 1  # other listeners still hear about it
    assert not extents
    before = viewer.dims.range[-1].stop
    set_layer_data(viewer, layer, np.ones((40, 50), np.float32))  # new shape: dims follow
    assert extents and viewer.dims.range[-1].stop > before

    a = np.zeros((5, 6), np.int32)
    b = a.copy()
    b[2, 3] = 1
    assert state_key(a) == state_key(a.copy()) and state_key(a) != state_key(b)
    assert state_key(a) != state_key(a.astype(np.int64))


def test_untangle_toggle_reaches_the_boundary_and_hybrid_methods(widget):
    widget.run_model(blocking=True)
    combo = widget.method_combo
    combo.setCurrentText("boundary")
    assert widget.untangle.isEnabled() and widget.untangle.isChecked()
    assert "untangle_factor" not in widget.segment_params()  # the pipeline's default: on
    widget.untangle.setChecked(False)
    assert widget.segment_params()["untangle_factor"] == 0.0
    combo.setCurrentText("hybrid")
    assert widget.segment_params()["untangle_factor"] == 0.0
    assert widget.segment(blocking=True) >= 1  # segment_hybrid takes the parameter
    combo.setCurrentText("seeds")
    assert not widget.untangle.isEnabled()
    assert "untangle_factor" not in widget.segment_params()


def test_images_share_one_set_of_map_layers(make_napari_viewer, monkeypatch, qtbot):
    """Choosing an image makes its edit layers; its maps reuse the map layers already shown."""
    from napari_instseg._napari.widget import InstSegWidget

    compute.clear_cache()
    first = make_worms(shape=(160, 160), n_worms=4, seed=3)
    second = make_worms(shape=(160, 160), n_worms=3, seed=4)
    oracles = [(s.image, prediction_from_masks(s.masks, noise=0.1)) for s in (first, second)]

    def fake_predict(image, model=None, device="auto", progress=None, tta=1, scale=1.0):
        return next(p for im, p in oracles if np.array_equal(np.asarray(image), im))

    monkeypatch.setattr(compute, "predict_image", fake_predict)
    viewer = make_napari_viewer(show=True)
    viewer.add_image(first.image, name="first")
    widget = InstSegWidget(viewer)
    viewer.window.add_dock_widget(widget, name="instseg")
    viewer.add_image(second.image, name="second")

    def chosen_ready():
        session = widget.session(create=False)
        return session is not None and session.seeds_layer in viewer.layers

    qtbot.waitUntil(chosen_ready)  # the worms and seeds layers come with the choice, no Run
    a = widget.session(create=False)
    assert a.image_layer.name == "first" and a.prediction is None
    assert a.labels_layer in viewer.layers
    widget.run_model(blocking=True)
    maps = dict(a.map_layers)
    assert set(maps) >= {"embeddings", "seediness", "boundary", "foreground"}
    n_layers = len(viewer.layers)

    widget.image_combo.setCurrentText("second")
    qtbot.waitUntil(chosen_ready)
    b = widget.session(create=False)
    assert b is not a and len(viewer.layers) == n_layers + 2  # its own worms and seeds
    widget.run_model(blocking=True)
    assert len(viewer.layers) == n_layers + 2  # no second set of maps
    assert all(b.map_layers[key] is layer for key, layer in maps.items())
    assert b.maps_shown and not a.maps_shown
    np.testing.assert_array_equal(maps["seediness"].data, b.prediction.seediness)
    assert not np.array_equal(maps["foreground"].data, a.prediction.foreground)

    widget.image_combo.setCurrentText("first")  # its maps come back, from memory
    qtbot.waitUntil(lambda: a.maps_shown and widget._showing is None)
    np.testing.assert_array_equal(maps["seediness"].data, a.prediction.seediness)
    np.testing.assert_array_equal(maps["foreground"].data, a.prediction.foreground)
    assert len(viewer.layers) == n_layers + 2
    assert viewer.layers.selection.active is a.labels_layer

    # a run in the worker whose image is no longer chosen when it ends: its maps wait
    third = make_worms(shape=(160, 160), n_worms=3, n_crossings=0, seed=5)
    oracles.append((third.image, prediction_from_masks(third.masks, noise=0.1)))
    release = threading.Event()
    monkeypatch.setattr(
        compute,
        "predict_image",
        lambda image, **kwargs: release.wait(10) and fake_predict(image),
    )
    viewer.add_image(third.image, name="third")
    widget.image_combo.setCurrentText("third")
    qtbot.waitUntil(chosen_ready)
    c = widget.session(create=False)
    worker = widget.run_model()
    widget.image_combo.setCurrentText("first")
    release.set()
    qtbot.waitUntil(lambda: widget.worker is None and widget._showing is None, timeout=10000)
    assert worker is not None and c.prediction is oracles[-1][1]
    assert a.maps_shown and not c.maps_shown  # the maps on screen are still first's
    np.testing.assert_array_equal(maps["foreground"].data, a.prediction.foreground)
    assert "third" in widget.status.text()
    widget.image_combo.setCurrentText("third")  # now its maps are shown, without a run
    qtbot.waitUntil(lambda: c.maps_shown and widget._showing is None)
    np.testing.assert_array_equal(maps["foreground"].data, c.prediction.foreground)


def test_chosen_image_gets_empty_map_layers_that_a_run_fills(
    make_napari_viewer, monkeypatch, qtbot
):
    """Map layers are added hidden and empty on choice; a run fills them and adds none."""
    from napari_instseg._napari.layers import MAP_LAYER_STYLE
    from napari_instseg._napari.widget import InstSegWidget

    compute.clear_cache()
    sample = make_worms(shape=(120, 150), n_worms=3, seed=5)
    oracle = prediction_from_masks(sample.masks, noise=0.1)
    monkeypatch.setattr(compute, "predict_image", lambda image, **kwargs: oracle)
    viewer = make_napari_viewer(show=True)
    viewer.add_image(sample.image, name="worms image")
    turns = []  # layers present at each turn of the event loop
    timer = QTimer()
    timer.timeout.connect(lambda: turns.append(len(viewer.layers)))
    timer.start(0)
    widget = InstSegWidget(viewer)
    viewer.window.add_dock_widget(widget, name="instseg")

    # generous timeouts: the layers come one per event-loop turn, slow on a loaded machine
    qtbot.waitUntil(lambda: len(widget._map_layers) == len(MAP_LAYER_STYLE), timeout=30000)
    qtbot.waitUntil(lambda: widget._showing is None, timeout=30000)
    timer.stop()
    # image, then worms + seeds at once, then one map layer per event-loop turn
    assert set(range(3, len(viewer.layers) + 1)) <= set(turns)
    maps = dict(widget._map_layers)
    for layer in maps.values():
        assert layer in viewer.layers and not layer.visible
        assert layer.data.shape[:2] == (120, 150) and not np.any(layer.data)
    session = widget.session(create=False)
    assert not session.maps_shown  # empty maps belong to no image
    names = [layer.name for layer in viewer.layers]
    # stacked image < maps < worms < seeds
    assert names.index("worms image") < names.index(maps["embeddings"].name)
    assert names.index(maps["foreground"].name) < names.index(session.labels_layer.name)
    n_layers = len(viewer.layers)

    widget.run_model(blocking=True)
    assert len(viewer.layers) == n_layers
    assert all(widget._map_layers[key] is layer for key, layer in maps.items())
    assert session.maps_shown
    np.testing.assert_array_equal(maps["boundary"].data, oracle.boundary)
    np.testing.assert_array_equal(maps["seediness"].data, oracle.seediness)
    assert maps["class_score"].name.startswith("mask score (tau=")


def test_run_during_empty_map_layers_adds_each_map_once(make_napari_viewer, monkeypatch, qtbot):
    """A run while the empty map layers are still being added neither doubles nor blanks them."""
    from napari_instseg._napari.layers import MAP_LAYER_STYLE
    from napari_instseg._napari.widget import InstSegWidget

    compute.clear_cache()
    sample = make_worms(shape=(120, 150), n_worms=3, seed=6)
    oracle = prediction_from_masks(sample.masks, noise=0.1)
    monkeypatch.setattr(compute, "predict_image", lambda image, **kwargs: oracle)
    viewer = make_napari_viewer(show=True)
    viewer.add_image(sample.image, name="img")
    widget = InstSegWidget(viewer)
    viewer.window.add_dock_widget(widget, name="instseg")
    qtbot.waitUntil(lambda: len(widget._map_layers) >= 1)  # some empty maps added, not all
    widget.run_model(blocking=True)
    qtbot.waitUntil(lambda: widget._showing is None)
    qtbot.wait(50)
    names = [layer.name for layer in viewer.layers]
    assert len(names) == len(set(names))
    assert len(widget._map_layers) == len(MAP_LAYER_STYLE)
    np.testing.assert_array_equal(widget._map_layers["foreground"].data, oracle.foreground)


def test_outline_refinement_toggle_reaches_segmentation_and_clicks(widget, worms):
    from napari_instseg.core.edges import local_contrast

    image = np.asarray(worms.image, np.float32)
    oracle = compute.predict_image(image)  # the fixture's oracle: shared by every call
    oracle.contrast = local_contrast(image if image.ndim == 2 else image[0])
    oracle.metadata["recommended_method"] = "boundary"
    oracle.metadata["segment_params"] = {"boundary": {"edge_thresholds": [0.88, 0.98]}}
    widget.run_model(blocking=True)
    session = widget.session()
    assert widget.refine_edges.isEnabled() and widget.refine_edges.isChecked()
    assert "edge_thresholds" not in widget.segment_params()  # the model's tuned ones apply
    assert session.refine_edges
    refined = widget.segment(blocking=True)
    widget.refine_edges.setChecked(False)
    assert widget.segment_params()["edge_thresholds"] is None
    assert not session.refine_edges  # clicks grow without it too
    widget.method_combo.setCurrentText("seeds")
    assert widget.segment_params()["edge_thresholds"] is None
    widget.method_combo.setCurrentText("auto")
    assert widget.segment(blocking=True) == refined  # same worms, outlines may differ
    # a model without tuned thresholds: nothing to switch
    oracle.metadata["segment_params"] = {}
    widget.method_combo.setCurrentText("boundary")
    assert not widget.refine_edges.isEnabled()


def test_debris_toggle_keeps_or_drops_a_round_blob(widget, worms, monkeypatch):
    from scipy import ndimage

    shape = worms.image.shape[-2:]
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    free = ndimage.distance_transform_edt(~worms.masks.any(axis=0)) > 12
    free[:12], free[-12:], free[:, :12], free[:, -12:] = False, False, False, False
    centre = np.argwhere(free)[0]
    blob = (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= 9**2
    oracle = prediction_from_masks(np.concatenate([worms.masks, blob[None]]))
    oracle.metadata["recommended_method"] = "seeds"
    oracle.metadata["segment_params"] = {"seeds": {"blob_filter": [2.5, 0.8]}}
    monkeypatch.setattr(compute, "predict_image", lambda *args, **kwargs: oracle)
    widget.run_model(blocking=True)
    assert widget.drop_debris.isEnabled() and widget.drop_debris.isChecked()
    dropped = widget.segment(blocking=True)
    assert "blob_filter" not in widget.segment_params()  # the model's tuned filter applies
    widget.drop_debris.setChecked(False)
    assert widget.segment_params()["blob_filter"] is None
    assert widget.segment(blocking=True) == dropped + 1


def test_segment_all_says_when_the_model_has_no_tuned_parameters(widget, worms):
    """A model from ``train`` has no segmentation parameters: Segment all says so and how
    to tune it; a tuned model's segmentation says nothing of it."""
    oracle = compute.predict_image(np.asarray(worms.image, np.float32))  # the fixture's
    oracle.metadata.pop("segment_params", None)
    widget.run_model(blocking=True)
    n = widget.segment(blocking=True)
    text = widget.status.text()
    assert text.startswith(f"{n} instances, with default parameters")
    assert "napari-instseg evaluate --model WEIGHTS" in text and "--tune --write" in text
    oracle.metadata["segment_params"] = {"hybrid": {"min_size": 30}}
    n = widget.segment(blocking=True)
    assert widget.status.text().startswith(f"{n} instances. Review them")


def test_clicks_start_from_the_automatic_segments_when_the_model_is_tuned(widget, worms, qtbot):
    from napari_instseg.core.pick import automatic_segments

    oracle = compute.predict_image(np.asarray(worms.image, np.float32))  # the fixture's
    oracle.metadata["recommended_method"] = "boundary"
    oracle.metadata["segment_params"] = {"boundary": {"min_size": 30}}
    widget.run_model(blocking=True)
    session = widget.session()
    assert widget.click_segments.isEnabled() and widget.click_segments.isChecked()
    assert session.click_segments
    viewer = widget.viewer
    point = inner_pixel(worms.masks, 0)
    segments = automatic_segments(oracle)
    under = [m for m in segments.masks if m[point]]
    assert len(under) == 1
    click(qtbot, viewer, *point)
    label = session.selected
    assert np.array_equal(session.worm(label).mask, under[0])  # the segment, as it is
    widget.set_tau(0.9)  # a segment does not move with tau, and the status says why
    assert np.array_equal(session.worm(label).mask, under[0])
    assert f"tau leaves instance {label}" in widget.status.text()
    widget.set_tau(0.5)
    widget.click_segments.setChecked(False)
    assert not session.click_segments
    grown = session.grow_new(point)
    from napari_instseg.core.grow import grow

    expected = grow(oracle, [point], tau=session.tau, edge_thresholds="auto")
    assert np.array_equal(session.worm(grown).mask, expected)  # the embedding growth
    assert not np.array_equal(expected, under[0])  # (the two differ on these worms)
    oracle.metadata["segment_params"] = {}
    widget.method_combo.setCurrentText("boundary")
    assert not widget.click_segments.isEnabled()


def test_negative_click_cuts_a_merged_segment_along_the_boundary(widget, worms):
    from scipy import ndimage

    oracle = compute.predict_image(np.asarray(worms.image, np.float32))  # the fixture's
    oracle.metadata["recommended_method"] = "boundary"
    oracle.metadata["segment_params"] = {"boundary": {"min_size": 30}}
    masks = worms.masks
    # the touching pair of the synthetic image (no shared pixel), given one embedding as
    # real merged worms have: a cut by similarity would take both
    i, j = next(
        (i, j)
        for i in range(len(masks))
        for j in range(i + 1, len(masks))
        if not (masks[i] & masks[j]).any() and (ndimage.binary_dilation(masks[i]) & masks[j]).any()
    )
    a, b = inner_pixel(masks, i), inner_pixel(masks, j)
    embeddings = np.array(oracle.embeddings)
    embeddings[:, masks[j]] = embeddings[:, a[0], a[1]][:, None]
    oracle.embeddings = embeddings
    widget.run_model(blocking=True)
    widget.segment(blocking=True)
    session = widget.session()
    merged = session.merge(session.label_at(a), session.label_at(b))
    assert session.worm(merged).mask[a] and session.worm(merged).mask[b]
    session.add_negative(b, label=merged)
    kept = session.worm(merged).mask
    assert iou(kept, masks[i]) > 0.8 and (kept & masks[j]).sum() < 0.1 * masks[j].sum()


def test_split_parts_keep_their_masks_when_clicks_start_from_segments(widget, worms):
    oracle = compute.predict_image(np.asarray(worms.image, np.float32))  # the fixture's
    oracle.metadata["recommended_method"] = "boundary"
    oracle.metadata["segment_params"] = {"boundary": {"min_size": 30}}
    widget.run_model(blocking=True)
    widget.segment(blocking=True)
    session = widget.session()
    masks = worms.masks
    i = int(np.argmax(masks.sum((1, 2))))
    label = session.label_at(inner_pixel(masks, i))
    rows, cols = np.nonzero(session.worm(label).mask)
    order = np.argsort(rows * 1000 + cols)
    p = (int(rows[order[len(order) // 4]]), int(cols[order[len(order) // 4]]))
    q = (int(rows[order[3 * len(order) // 4]]), int(cols[order[3 * len(order) // 4]]))
    first, second = session.split(p, q)
    part = session.worm(first).mask.copy()
    session.select(first)
    assert session.regrow_selected(0.7) is False  # the slider does not undo the split
    assert np.array_equal(session.worm(first).mask, part)
    session.add_seed(q, label=first)  # takes back the other part's pixels near q only
    grown = session.worm(first).mask
    assert grown[q] and (grown & ~part).sum() < session.worm(second).mask.sum() + 50
    assert (grown & ~part).sum() > 0


def test_widget_from_the_plugins_menu_keeps_its_session_and_keys_work(
    make_napari_viewer, monkeypatch, worms, qtbot
):
    """Opened as napari opens it (a proxy viewer): one session per image; shortcuts work."""
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    oracle = prediction_from_masks(worms.masks, noise=0.1)
    monkeypatch.setattr(compute, "predict_image", lambda image, *a, **k: oracle)
    compute.clear_cache()
    viewer = make_napari_viewer(show=True)
    viewer.add_image(worms.image, name="worms image")
    _, widget = viewer.window.add_plugin_dock_widget("napari-instseg", "Worm segmentation")
    widget.run_model(blocking=True)
    session = widget.session()
    assert session is not None and session.prediction is not None
    assert widget.session() is session and len(widget.sessions) == 1
    viewer.layers.selection.active = viewer.layers["worms image"]
    click(qtbot, viewer, *inner_pixel(worms.masks, 0))
    assert session.labels_layer.data.max() == 1
    assert viewer.layers.selection.active is session.labels_layer  # Ctrl+Z undoes the click
    edit_layers = [
        layer.name for layer in viewer.layers if layer.name.startswith(("worms ", "seeds "))
    ]
    assert edit_layers == ["worms image"]  # no "worms [1]" / "seeds [1]" of a second session

    # the documented keys, pressed on the canvas: a tool key, napari's undo
    canvas = viewer.window._qt_viewer.canvas.native
    canvas.setFocus()
    errors = []
    monkeypatch.setattr("sys.excepthook", lambda *exc: errors.append(exc))
    QTest.keyClick(canvas, Qt.Key.Key_R)
    qtbot.wait(20)
    assert widget.tool == "remove"
    QTest.keyClick(canvas, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    qtbot.wait(20)
    assert session.labels_layer.data.max() == 0 and not errors


def test_run_on_a_stack_segments_the_plane_shown(widget, worms, qtbot):
    """A stack (as Open Folder makes of a BBBC010 folder) runs on the plane in view."""
    from napari_instseg._napari.io import META

    viewer = widget.viewer
    stack = np.stack([worms.image * 0.5, worms.image, worms.image * 0.25])
    truth = np.stack([np.zeros(worms.image.shape, np.int32)] * 3)
    truth[1] = (worms.masks[0] * 7).astype(np.int32)
    names = {"names": ["W01", "W02", "W03"]}
    viewer.add_image(stack, name="images", metadata={META: names})
    viewer.add_labels(truth, name="worms", metadata={META: dict(names)})
    viewer.dims.set_current_step(0, 1)

    def edit_layers():
        return [la.name for la in viewer.layers if la._type_string in ("labels", "points")]

    before = edit_layers()
    widget.image_combo.setCurrentText("images")
    qtbot.wait(50)  # choosing a stack adds no worms/seeds layers of its own
    assert edit_layers() == before and "stack" in widget.status.text()
    widget.run_model(blocking=True)
    session = widget.session()
    assert session.image_layer.name == "W02" and widget.image_combo.currentText() == "W02"
    np.testing.assert_array_equal(session.image, worms.image)
    assert widget.calls[-1] == worms.image.shape  # the model saw one 2D plane
    assert session.labels_layer.name == "W02 worms"  # its worms came along, adopted
    assert [w.label for w in session.worms] == [7]
    # again on the same plane, after a rename: the same layer and session, no copy
    session.image_layer.name = "mine"
    widget.image_combo.setCurrentText("images")
    widget.run_model(blocking=True)
    assert widget.session() is session and session.image_layer.name == "mine"
    assert "W02" not in viewer.layers
    # a 4D layer (time x z) without names: the plane shown, named by its indices
    viewer.add_image(np.stack([stack, stack]), name="movie")
    viewer.dims.set_current_step(0, 1)
    viewer.dims.set_current_step(1, 2)
    widget.image_combo.setCurrentText("movie")
    widget.run_model(blocking=True)
    assert widget.session().image_layer.name == "movie [1, 2]"
    np.testing.assert_array_equal(widget.session().image, stack[2])


def test_widget_follows_what_the_user_does_to_its_layers(widget, worms, qtbot):
    """Renames, deleted layers, napari's undo, a second image: the widget keeps up."""
    viewer = widget.viewer
    image = viewer.layers["worms image"]
    click(qtbot, viewer, *inner_pixel(worms.masks, 0))  # before any run: it says so
    assert "Run the model first" in widget.status.text()
    widget.run_model(blocking=True)
    session = widget.session()
    # the plugin's own map layers are never offered as images to segment
    items = [widget.image_combo.itemText(i) for i in range(widget.image_combo.count())]
    assert items == ["worms image"]
    # a renamed image stays chosen, with its session
    image.name = "renamed"
    assert widget.image_combo.currentText() == "renamed" and widget.session() is session
    # the review count follows napari's undo; the Undo button says what it did
    click(qtbot, viewer, *inner_pixel(worms.masks, 0))
    click(qtbot, viewer, *inner_pixel(worms.masks, 1))
    assert widget.review_label.text() == "0 / 2 reviewed"
    session.labels_layer.undo()
    assert widget.review_label.text() == "0 / 1 reviewed"
    assert widget.status.text().startswith("Worms layer edited")
    widget.undo()
    assert widget.status.text() == "Undone the last edit." and not session.worms
    widget.redo()
    assert widget.status.text() == "Redone." and len(session.worms) == 1
    # a deleted map layer comes back with Run; a deleted seeds layer with the next click
    viewer.layers.remove("foreground")
    widget.run_model()
    qtbot.waitUntil(lambda: "foreground" in viewer.layers and widget._showing is None)
    viewer.layers.remove(session.seeds_layer)
    click(qtbot, viewer, *inner_pixel(worms.masks, 2))
    qtbot.waitUntil(lambda: session.seeds_layer in viewer.layers)
    assert len(session.seeds_layer.data) == 2
    # a deleted worms layer takes its worms with it
    viewer.layers.remove(session.labels_layer)
    assert not session.worms
    widget.next_to_review()
    assert widget.status.text().startswith("No instances to review")
    click(qtbot, viewer, *inner_pixel(worms.masks, 0))
    assert [w.label for w in session.worms] == [1]
    assert set(np.unique(session.labels_layer.data)) == {0, 1}
    # choosing another image shows it and hides the first one with its worms
    viewer.add_image(worms.image[::-1].copy(), name="other")
    widget.image_combo.setCurrentText("other")
    assert viewer.layers["other"].visible and not image.visible
    assert not session.labels_layer.visible
    widget.image_combo.setCurrentText("renamed")
    assert image.visible and session.labels_layer.visible and not viewer.layers["other"].visible


def test_a_widget_opened_again_carries_on_and_the_removed_one_is_deaf(widget, worms, qtbot):
    """Close the widget, open a new one: same worms and seeds; one click, one worm."""
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    from napari_instseg._napari.widget import InstSegWidget

    viewer = widget.viewer
    widget.run_model(blocking=True)
    old = widget.session()
    click(qtbot, viewer, *inner_pixel(worms.masks, 0))
    first = old.worms[0]
    viewer.window.remove_dock_widget(widget)
    assert widget._on_mouse_drag not in viewer.mouse_drag_callbacks

    viewer.add_image(worms.image[::-1].copy(), name="another")  # listed first? no matter
    viewer.layers.move(len(viewer.layers) - 1, 0)
    names = [layer.name for layer in viewer.layers]
    again = InstSegWidget(viewer)
    viewer.window.add_dock_widget(again, name="instseg again")
    qtbot.wait(50)
    assert again.image_combo.currentText() == "worms image"  # where the work was
    session = again.session()
    assert session is old and session.worms[0] is first  # seeds and all
    assert again.review_label.text() == "0 / 1 reviewed"
    assert [layer.name for layer in viewer.layers] == names  # no second set of layers
    again.run_model(blocking=True)
    click(qtbot, viewer, *inner_pixel(worms.masks, 1))
    assert [w.label for w in session.worms] == [1, 2]  # the removed widget did not click too
    canvas = viewer.window._qt_viewer.canvas.native
    canvas.setFocus()
    QTest.keyClick(canvas, Qt.Key.Key_R)
    qtbot.wait(20)
    assert again.tool == "remove" and widget.tool == "new"
    # a hidden panel's tools rest: a click on a worm removes nothing, keys are napari's
    again.hide()
    click(qtbot, viewer, *inner_pixel(worms.masks, 1))
    assert len(session.worms) == 2
    QTest.keyClick(canvas, Qt.Key.Key_N)
    qtbot.wait(20)
    assert again.tool == "remove"
    again.show()
    click(qtbot, viewer, *inner_pixel(worms.masks, 1))
    assert [w.label for w in session.worms] == [1]


def test_an_image_opened_twice_gets_its_own_worms_layer(widget, worms, qtbot):
    """napari names a second copy 'X [1]' / 'X worms [1]': each image adopts its own."""
    viewer = widget.viewer
    truth = Instances(masks=worms.masks).to_labels()
    for _ in range(2):  # as the reader opens an export twice
        viewer.add_image(worms.image, name="plate")
        viewer.add_labels(truth.copy(), name="plate worms")
    assert "plate [1]" in viewer.layers and "plate worms [1]" in viewer.layers
    widget.image_combo.setCurrentText("plate [1]")
    session = widget.session()
    assert session.labels_layer is viewer.layers["plate worms [1]"]
    assert len(session.worms) == len(worms.masks)
    widget.image_combo.setCurrentText("plate")
    assert widget.session().labels_layer is viewer.layers["plate worms"]


def test_closing_the_widget_mid_work_loses_nothing(widget, worms, qtbot, monkeypatch):
    """A tau drag, a run and the tau value survive the widget's removal and reopening."""
    from napari_instseg._napari.widget import InstSegWidget

    viewer = widget.viewer
    widget.run_model(blocking=True)
    session = widget.session()
    widget.click_segments.setChecked(False)  # grown worms: tau moves them
    click(qtbot, viewer, *inner_pixel(worms.masks, 0))
    before = session.worms[0].mask.copy()
    widget.set_tau(0.75, live=True)  # a drag the widget's removal interrupts
    assert session._preview_start is not None
    assert not np.array_equal(session.worms[0].mask, before)
    # a run on another image that ends after the widget is gone
    other = make_worms(shape=(160, 160), n_worms=3, n_crossings=0, seed=7)
    late = prediction_from_masks(other.masks, noise=0.1)
    release = threading.Event()
    monkeypatch.setattr(
        compute, "predict_image", lambda image, **kwargs: release.wait(10) and late
    )
    viewer.add_image(other.image, name="later")
    widget.image_combo.setCurrentText("later")
    qtbot.waitUntil(lambda: widget.session(create=False) is not None)
    worker = widget.run_model()
    assert worker is not None
    viewer.window.remove_dock_widget(widget)
    assert session._preview_start is None  # the drag is one undo step, sync works again
    again = InstSegWidget(viewer)
    viewer.window.add_dock_widget(again, name="instseg again")
    again.image_combo.setCurrentText("worms image")
    assert again.session() is session
    maps = dict(again._map_layers)
    foreground = maps["foreground"].data.copy()
    release.set()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=10000)
    qtbot.wait(50)
    later = next(s for s in again.sessions.values() if s.image_layer.name == "later")
    assert later.prediction is late  # kept for its image...
    np.testing.assert_array_equal(maps["foreground"].data, foreground)  # ...not shown over
    assert session.maps_shown
    # the tau of the work carries over to the reopened widget
    assert again.tau == 0.75
    session.labels_layer.undo()  # the drag was one undo step, and the worms follow it
    np.testing.assert_array_equal(session.worms[0].mask, before)
    # a worms layer made again while "worms" is taken is named after its image
    viewer.layers.remove(session.labels_layer)
    viewer.add_labels(np.zeros((4, 4), np.uint8), name="worms")
    click(qtbot, viewer, *inner_pixel(worms.masks, 1))
    assert session.labels_layer.name == "worms image worms"


def test_export_gathers_several_images_in_one_training_folder(widget, worms, qtbot, tmp_path):
    """A second image exported into a training folder is added; a name in it is asked about."""
    from qtpy.QtWidgets import QFileDialog, QMessageBox

    from napari_instseg.core.training_folder import read_training_folder

    viewer, out = widget.viewer, tmp_path / "train"
    widget.run_model(blocking=True)
    widget.segment(blocking=True)
    assert widget.export(out) == out
    n = len(widget.session().worms)
    # fine-tuning leaves unreviewed worms out: the user learns it when exporting, not later
    assert f"{n} instances (0 reviewed)" in widget.status.text()
    assert f"the {n} unreviewed are left out" in widget.status.text()
    viewer.add_image(worms.image[::-1].copy(), name="second")
    widget.image_combo.setCurrentText("second")
    widget.run_model(blocking=True)
    widget.segment(blocking=True)
    assert widget.export(out) == out  # added, nothing asked, nothing replaced
    assert "2 images in the folder" in widget.status.text()
    assert [s.name for s in read_training_folder(out)] == ["worms image", "second"]
    with pytest.raises(FileExistsError, match="already holds an image named 'second'"):
        widget.export(out)
    # the button: the dialog names what would be replaced; No writes nothing and says so
    asked = []
    answer = QMessageBox.StandardButton.No
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(out))
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or answer)
    manifest = (out / "manifest.json").read_text()
    widget.export_btn.click()
    assert "Replace that image" in asked[-1] and "other images stay" in asked[-1]
    assert "cancelled" in widget.status.text()
    assert (out / "manifest.json").read_text() == manifest
    widget.session().remove(label=widget.session().worms[0].label)
    answer = QMessageBox.StandardButton.Yes
    widget.export_btn.click()
    monkeypatch.undo()
    samples = {s.name: s for s in read_training_folder(out)}
    assert list(samples) == ["worms image", "second"]
    assert len(samples["second"].masks) == len(widget.session().worms)
    # a folder of other files is not taken over without asking
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a training folder"):
        widget.export(other)


def test_reopened_export_of_several_images_keeps_reviews_and_overlaps(widget, worms, tmp_path):
    """An export of two images opens as a stack; each plane's worms keep their reviews."""
    import dataclasses

    from napari_instseg._napari.io import read
    from napari_instseg.core.training_folder import read_training_folder, write_training_folder

    assert (worms.masks.sum(0) > 1).any()  # crossing worms: an overlap to keep
    n = len(worms.masks)
    first = dataclasses.replace(worms, name="W01", reviewed=np.zeros(n, bool))
    second = dataclasses.replace(
        worms, name="W02", image=worms.image * 0.5, reviewed=np.arange(n) % 2 == 0
    )
    out = write_training_folder(tmp_path / "export", [first, second])
    viewer = widget.viewer
    for data, kwargs, kind in read(str(out)):  # File > Open Folder
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    viewer.dims.set_current_step(0, 1)
    widget.image_combo.setCurrentText("images")
    widget.run_model(blocking=True)
    session = widget.session()
    assert session.image_layer.name == "W02"
    assert [w.reviewed for w in session.worms] == second.reviewed.tolist()
    np.testing.assert_array_equal(session.instances.masks, worms.masks)  # overlaps whole
    assert widget.review_label.text() == f"{second.reviewed.sum()} / {n} reviewed"
    # exported again (e.g. after more corrections), the reviews are still there
    widget.export(tmp_path / "again")
    [back] = read_training_folder(tmp_path / "again")
    assert back.reviewed.tolist() == second.reviewed.tolist()
    assert (back.masks.sum(0) > 1).any()


def test_reexport_of_reopened_labels_keeps_the_scale_they_were_made_at(
    widget, worms, tmp_path, qtbot
):
    """Labels exported at scale 0.5, reopened and run at scale 1: exported again at 0.5.

    The scale belongs to the worms: running the model at another scale changes none;
    Segment all (replacing them) makes them at the prediction's scale, undo brings it back.
    """
    import dataclasses

    from napari_instseg._napari.io import read, write_training
    from napari_instseg.core.training_folder import read_training_folder, write_training_folder

    n = len(worms.masks)
    made = dataclasses.replace(
        worms, name="W01", reviewed=np.arange(n) < 2, metadata={"scale": 0.5}
    )
    out = write_training_folder(tmp_path / "export", [made])
    viewer = widget.viewer
    for data, kwargs, kind in read(str(out)):  # File > Open Folder
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget.image_combo.setCurrentText("W01")
    assert widget.scale() == 0.5  # the export's scale...
    widget.scale_spin.setValue(1.0)  # ...but the user runs the model at 1
    widget.run_model(blocking=True)  # the maps at scale 1 (the fixture's model)
    session = widget.session()
    assert len(session.worms) == n

    widget.export(tmp_path / "again")
    [back] = read_training_folder(tmp_path / "again")
    assert back.metadata.get("scale") == 0.5  # was dropped: the maps shown were at 1
    assert session.prediction_scale() == 1.0 and session.labels_scale() == 0.5
    assert "Scale 0.5 recorded: the worms were made at it" in widget.status.text()
    # napari's writer (File > Save Selected Layers) records it too
    labels = session.labels_layer
    write_training(
        str(tmp_path / "saved"),
        [(labels.data, {"name": labels.name, "metadata": labels.metadata}, "labels")],
    )
    assert read_training_folder(tmp_path / "saved")[0].metadata["scale"] == 0.5

    # a worm clicked on the scale-1 maps: most worms are still the reopened ones
    session.remove(label=session.worms[-1].label)
    assert session.grow_new(inner_pixel(worms.masks, n - 1)) is not None
    assert session.worms[-1].scale == 1.0 and session.labels_scale() == 0.5

    # re-segmented at scale 1 (every worm replaced): the labels are now made at scale 1
    widget.keep_edited.setChecked(False)
    widget.segment(blocking=True)
    assert {w.scale for w in session.worms} == {1.0}
    widget.export(tmp_path / "resegmented")
    assert "scale" not in read_training_folder(tmp_path / "resegmented")[0].metadata
    labels.undo()  # Segment all undone: the reopened worms and their scale are back
    assert session.labels_scale() == 0.5
    assert session.to_sample().metadata["scale"] == 0.5


def bbbc010_well(root, worms, well="A01"):
    """A BBBC010-style folder of one well: w2 bright-field, w1 Sytox (one worm dead), masks.

    Returns the w1 and w2 file paths (w1 first, as a sorted file dialog gives them) and
    which worms are dead (the one that touches no other takes up the stain).
    """
    import tifffile
    from PIL import Image as PILImage

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    stem = f"1649_1109_0003_Amp5-1_B_20070424_{well}_{{}}_9E84F49F-1B25-4E7E-8040-D1BB2D7E73EA"
    rng = np.random.default_rng(0)
    sytox = rng.normal(100, 10, worms.image.shape).clip(0).astype(np.uint16)
    others = [np.delete(worms.masks, i, axis=0).any(0) for i in range(len(worms.masks))]
    dead = np.array([not (m & o).any() for m, o in zip(worms.masks, others, strict=True)])
    dead &= np.cumsum(dead) == 1  # the first worm alone
    assert dead.sum() == 1
    sytox[worms.masks[dead][0]] = 1000  # a dead worm takes up the stain
    w1 = root / "images" / f"{stem.format('w1')}.tif"
    w2 = root / "images" / f"{stem.format('w2')}.tif"
    tifffile.imwrite(w1, sytox)
    tifffile.imwrite(w2, worms.image.astype(np.uint16))
    for i, mask in enumerate(worms.masks):
        path = root / "masks" / f"{well}_{i + 1:02d}_ground_truth.png"
        PILImage.fromarray(mask.astype(np.uint8) * 255).save(path)
    return w1, w2, dead.tolist()


def test_bbbc010_fluorescence_is_a_measure_channel_not_the_image(
    make_napari_viewer, worms, tmp_path, qtbot
):
    """Both files of a BBBC010 well dragged in (w1 first): w2 is segmented, w1 measured."""
    from napari_instseg._napari import widget as widget_module

    w1, w2, dead = bbbc010_well(tmp_path / "bbbc010", worms)
    viewer = make_napari_viewer()
    widget = widget_module.InstSegWidget(viewer)
    # as dragging both files in: napari's own TIFF reader names each layer after its file,
    # and w1 sorts first
    from napari.plugins import _initialize_plugins

    _initialize_plugins()
    viewer.open(str(w1))
    assert widget.image_combo.currentText() == w1.stem  # the only image, for now
    viewer.open(str(w2))
    assert w1.stem in viewer.layers and w2.stem in viewer.layers
    items = [widget.image_combo.itemText(i) for i in range(widget.image_combo.count())]
    assert items == [w2.stem, w1.stem]  # still offered, below the bright-field image
    assert widget.image_combo.currentText() == w2.stem
    assert widget.channel_combo.currentText() == w1.stem
    # the chosen image gets its session (and layers) once the event loop runs the widget's
    # deferred preparation; w1 never gets one
    qtbot.waitUntil(lambda: len(widget.sessions) > 0, timeout=5000)
    qtbot.wait(50)
    assert [s.image_layer.name for s in widget.sessions.values()] == [w2.stem]  # none for w1
    NO_CHANNEL = widget_module.NO_CHANNEL  # noqa: N806
    session = widget.session()
    session.set_prediction(prediction_from_masks(worms.masks), model_name="oracle")
    for i in range(len(worms.masks)):
        session.grow_new(inner_pixel(worms.masks, i))
    table = widget.measure()
    assert "mean_w1" in table and table["dead"].tolist() == dead
    assert "1 dead" in widget.status.text()
    # no measure channel: no stain columns
    widget.channel_combo.setCurrentText(NO_CHANNEL)
    widget.channel_combo.activated.emit(widget.channel_combo.currentIndex())
    assert "dead" not in widget.measure()
    # the user may insist on segmenting the fluorescence: it stays chosen, with a word
    widget.image_combo.setCurrentText(w1.stem)
    assert "fluorescence channel (w1)" in widget.status.text()
    viewer.add_image(worms.image[::-1].copy(), name="another")
    assert widget.image_combo.currentText() == w1.stem
    assert widget.channel_combo.currentText() == NO_CHANNEL  # w1 is the image now


def test_bbbc010_well_opened_with_the_reader_tags_w1(make_napari_viewer, worms, tmp_path):
    """The plugin's reader: the well's w1 layer is tagged as its stain channel."""
    from napari_instseg._napari import io as nio
    from napari_instseg._napari.widget import InstSegWidget

    w1, w2, dead = bbbc010_well(tmp_path / "bbbc010", worms, well="B03")
    viewer = make_napari_viewer()
    widget = InstSegWidget(viewer)
    reader = nio.get_reader(str(w2))
    assert reader is not None
    layers = reader(str(w2))
    for data, kwargs, kind in reversed(layers):  # the channel first: order must not matter
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    assert widget.image_combo.currentText() == "B03"
    assert widget.channel_combo.currentText() == "B03 w1"
    assert [nio.stain_channel(viewer.layers[n]) for n in ("B03", "B03 w1")] == [None, "w1"]
    assert len(widget.session().worms) == len(worms.masks)  # the well's masks, adopted
    assert widget.measure()["dead"].tolist() == dead


def test_a_model_chosen_while_another_runs_is_not_taken_for_the_maps_shown(
    widget, worms, qtbot, monkeypatch, tmp_path
):
    """Choosing a new version mid-run: the maps that arrive say whose they are."""
    release = threading.Event()
    oracle = prediction_from_masks(worms.masks, noise=0.1)
    monkeypatch.setattr(
        compute, "predict_image", lambda image, **kwargs: release.wait(10) and oracle
    )
    version = tmp_path / "models" / "bbbc010-ft1" / "model.safetensors"
    assert widget.run_model() is not None
    widget.add_model_version(version, select=False)  # announced by the fine-tune widget
    widget.model_combo.setCurrentText("version: bbbc010-ft1")  # the user picks it now
    release.set()
    qtbot.waitUntil(lambda: widget.worker is None and widget._showing is None, timeout=10000)
    assert widget.session().model_name == "shipped"
    text = widget.status.text()
    assert "shows model shipped; bbbc010-ft1 is chosen: Run model to see it" in text
    widget.model_combo.setCurrentIndex(0)  # back to the shipped model: nothing to say
    assert "is chosen" not in widget.status.text()
    assert "shows model shipped, as chosen" in widget.status.text()


def test_closing_napari_stops_a_running_prediction(widget, monkeypatch, qtbot):
    """napari's window close cancels its tasks: the model stops at its next tile."""
    import time

    tiles = []

    def slow_predict(image, progress=None, **kwargs):
        for i in range(400):  # 400 tiles of 25 ms: 10 s unless cancelled
            progress(i, 400)
            tiles.append(i)
            time.sleep(0.025)
        raise AssertionError("the prediction was not stopped")

    monkeypatch.setattr(compute, "predict_image", slow_predict)
    worker = widget.run_model()
    qtbot.waitUntil(lambda: len(tiles) >= 2, timeout=5000)
    widget.viewer.window._task_status_manager.cancel_all()  # what closing the window does
    qtbot.waitUntil(lambda: widget.worker is None, timeout=5000)
    assert len(tiles) < 100 and not worker.is_running


def test_an_rgb_layer_runs_on_its_luminance_as_the_cli_does(widget, worms):
    from napari_instseg.core.predict import as_model_input

    viewer = widget.viewer
    rng = np.random.default_rng(0)
    rgb = np.stack([worms.image, worms.image * 0.8, rng.uniform(0, 50, worms.image.shape)], -1)
    viewer.add_image(rgb.astype(np.float32), name="colour", rgb=True)
    widget.image_combo.setCurrentText("colour")
    widget.run_model(blocking=True)
    session = widget.session()
    assert session.image_layer.name == "colour" and session.shape == worms.image.shape
    assert widget.calls[-1] == worms.image.shape  # one grey plane, not three planes
    # the same grey values as `napari-instseg predict` on a colour file
    np.testing.assert_allclose(session.image, as_model_input(rgb, 1)[0], rtol=1e-5)


def test_a_click_hashes_the_worms_layer_once_and_painting_still_syncs(
    widget, worms, qtbot, monkeypatch
):
    """A click does not read the whole label image for its digest (for undo): the digest is
    updated from the pixels it wrote (on a 4160 x 5568 image a full hash is ~30 ms). An
    edit napari makes (painting) still makes the next click re-read the layer, and the
    digests updated edit by edit equal those of the whole image."""
    from napari_instseg._napari import session as session_module

    viewer = widget.viewer
    widget.run_model(blocking=True)
    session = widget.session()
    widget.set_tool("new")
    calls = []
    real = session_module.state_key
    monkeypatch.setattr(session_module, "state_key", lambda a: calls.append(1) or real(a))
    a = inner_pixel(worms.masks, 0)
    click(qtbot, viewer, *a)
    assert len(session.worms) == 1
    assert len(calls) == 0  # the new state's digest from the pixels written (3, then 1)
    assert session._digest == real(session.labels_layer.data)
    # paint a worm by hand (napari's brush emits ``paint``): the next click sees it
    labels = session.labels_layer
    b = inner_pixel(worms.masks, 1)
    labels.data_setitem((np.array([b[0]]), np.array([b[1]])), [77])
    calls.clear()
    c = inner_pixel(worms.masks, 2)
    click(qtbot, viewer, *c)
    assert any(w.label == 77 for w in session.worms)  # the hand-painted pixel is a worm
    assert len(session.worms) == 3
    assert len(calls) == 1  # the painted state read back; the new one from its pixels
    assert session._digest == real(session.labels_layer.data)
    widget.undo()
    assert session._digest == real(session.labels_layer.data)
    widget.undo()
    assert [w.label for w in session.worms] == [session.worms[0].label]
    widget.redo()
    assert len(session.worms) == 2 and session._digest == real(session.labels_layer.data)


def test_undo_reads_the_worms_layer_once_and_follows_a_hidden_layer(
    widget, worms, qtbot, monkeypatch
):
    """Undo/redo hash the label image once (napari's data event syncs; on a densely
    labelled 4160 x 5568 image a full hash is ~140 ms), and still follow the layer when
    it is hidden and napari sends no data event."""
    from napari_instseg._napari import session as session_module

    viewer = widget.viewer
    widget.run_model(blocking=True)
    session = widget.session()
    widget.set_tool("new")
    for k in range(2):
        click(qtbot, viewer, *inner_pixel(worms.masks, k))
    assert len(session.worms) == 2
    calls = []
    real = session_module.state_key
    monkeypatch.setattr(session_module, "state_key", lambda a: calls.append(1) or real(a))
    for step, n in ((widget.undo, 1), (widget.redo, 2)):
        calls.clear()
        step()
        assert len(session.worms) == n and len(calls) == 1
        assert session._digest == real(session.labels_layer.data)
    session.labels_layer.visible = False
    for step, n in ((widget.undo, 1), (widget.redo, 2), (widget.undo, 1)):
        synced = session.set_data_syncs
        step()
        assert session.set_data_syncs == synced  # no event: the widget synced by itself
        assert len(session.worms) == n
        assert session._digest == real(session.labels_layer.data)


def test_run_model_pressed_between_returned_and_finished_starts_a_run(
    widget, worms, qtbot, monkeypatch
):
    """napari emits ``returned`` then ``finished``: a Run model in between is not refused.

    The worker was let go only at ``finished``: a click while the result was shown (the
    worker thread held off before ``finished``) answered "already running". And a late
    ``finished`` of the first run must not let the second run's worker go. Segment all
    likewise gets its button back with its result.
    """
    go, release = threading.Event(), threading.Event()
    oracle = prediction_from_masks(worms.masks, noise=0.1)
    calls = []

    def gated_predict(image, model=None, device="auto", progress=None, tta=1, scale=1.0):
        calls.append(tta)
        (go if len(calls) == 1 else release).wait(10)
        return oracle

    monkeypatch.setattr(compute, "predict_image", gated_predict)
    first = widget.run_model()
    seen, second = [], []

    def press_run(result):  # connected after the widget's handler: runs right after it
        seen.append((widget.worker, widget.run_btn.isEnabled()))
        widget.tta_check.setChecked(True)  # not cached: a real second run
        second.append(widget.run_model())

    first.returned.connect(press_run)
    with qtbot.waitSignal(first.finished, timeout=10000):
        go.set()
    assert seen == [(None, True)]
    assert second[0] is not None and second[0] is not first, widget.status.text()
    assert "already running" not in widget.status.text()
    # the first worker's late ``finished`` did not let the second one go
    assert widget.worker is second[0] and not widget.run_btn.isEnabled()
    assert widget.cancel_btn.isEnabled()
    with qtbot.waitSignal(widget.prediction_shown, timeout=10000):
        release.set()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=5000)
    assert widget.run_btn.isEnabled() and calls == [1, 8]

    # Segment all: its button is back once the worms are in, and stays off for a newer run
    from napari_instseg.core import pick

    segment = pick.segment_all  # what Segment all runs (the clicks' segments when the same)
    hold = threading.Event()
    runs = []

    def gated_segment(prediction, **kwargs):
        runs.append(1)
        if len(runs) > 1:
            hold.wait(10)
        return segment(prediction, **kwargs)

    monkeypatch.setattr(pick, "segment_all", gated_segment)
    first = widget.segment()
    states, again = [], []

    def press_segment(found):
        states.append(widget.segment_btn.isEnabled())
        again.append(widget.segment())

    first.returned.connect(press_segment)
    with qtbot.waitSignal(first.finished, timeout=20000):
        pass
    assert states == [True] and again[0] is not None and again[0] is not first
    assert not widget.segment_btn.isEnabled()  # the second is running
    with qtbot.waitSignal(again[0].finished, timeout=20000):
        hold.set()
    assert widget.segment_btn.isEnabled() and widget.session().worms


def test_a_reopened_export_made_at_another_scale_sets_the_scale_field(
    widget, worms, tmp_path, qtbot, monkeypatch
):
    """File > Open of an export made at scale 0.5: Run model runs at 0.5 unless told not to.

    The field takes the export's scale (the status line says so) while the user has set
    none for that image; a scale the user sets wins, for that image, from then on.
    """
    import dataclasses

    from napari_instseg._napari.io import read
    from napari_instseg.core.training_folder import write_training_folder

    oracle = prediction_from_masks(worms.masks, noise=0.1)
    scales = []

    def recording_predict(image, model=None, device="auto", progress=None, tta=1, scale=1.0):
        scales.append(scale)
        return dataclasses.replace(oracle, metadata={**oracle.metadata, "scale": scale})

    monkeypatch.setattr(compute, "predict_image", recording_predict)
    viewer = widget.viewer
    assert widget.image_combo.currentText() == "worms image" and widget.scale() == 1.0
    made = dataclasses.replace(worms, name="W01", metadata={"scale": 0.5})
    plain = dataclasses.replace(worms, name="W02")  # exported at scale 1: nothing recorded
    for sample, folder in ((made, "half"), (plain, "one")):
        out = write_training_folder(tmp_path / folder, [sample])
        for data, kwargs, kind in read(str(out)):  # File > Open Folder
            getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget.image_combo.setCurrentText("W01")
    assert widget.scale() == 0.5
    assert "scale 0.5 from the export" in widget.status.text()
    widget.run_model(blocking=True)
    assert scales == [0.5]  # the maps the worms were made on
    assert "at scale 0.5 (from the export)" in widget.status.text()
    # other images keep the scale the user set (the default 1 here)
    widget.image_combo.setCurrentText("W02")
    assert widget.scale() == 1.0
    widget.image_combo.setCurrentText("worms image")
    assert widget.scale() == 1.0
    widget.image_combo.setCurrentText("W01")
    assert widget.scale() == 0.5 and "scale 0.5 from the export" in widget.status.text()

    # the user's choice wins, for that image, whatever the export says
    widget.scale_spin.setValue(0.8)
    widget.image_combo.setCurrentText("W02")
    assert widget.scale() == 0.8  # the scale the user last set: the field as before
    widget.scale_spin.setValue(1.0)
    widget.image_combo.setCurrentText("W01")
    assert widget.scale() == 0.8
    assert "scale 0.8 as you set it (its export was made at 0.5)" in widget.status.text()
    widget.run_model(blocking=True)
    assert scales == [0.5, 0.8]


def test_a_plane_of_a_reopened_export_stack_runs_at_its_recorded_scale(
    widget, worms, tmp_path, monkeypatch
):
    """An export of several same-size images opens as a stack: each plane's scale counts."""
    import dataclasses

    from napari_instseg._napari.io import read
    from napari_instseg.core.training_folder import write_training_folder

    oracle = prediction_from_masks(worms.masks, noise=0.1)
    scales = []

    def recording_predict(image, model=None, device="auto", progress=None, tta=1, scale=1.0):
        scales.append(scale)
        return oracle

    monkeypatch.setattr(compute, "predict_image", recording_predict)
    samples = [
        dataclasses.replace(worms, name=name, metadata={"scale": 0.5}) for name in ("A", "B")
    ]
    out = write_training_folder(tmp_path / "export", samples)
    viewer = widget.viewer
    for data, kwargs, kind in read(str(out)):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget.image_combo.setCurrentText("images")  # the stack
    widget.run_model(blocking=True)  # its plane shown, A, as a layer of its own
    assert widget.image_combo.currentText() == "A" and scales == [0.5]
    assert widget.session().labels_scale() == 0.5
    # a scale the user sets on the stack goes for its planes
    widget.image_combo.setCurrentText("images")
    widget.scale_spin.setValue(0.7)
    viewer.dims.set_point(0, 1)
    widget.run_model(blocking=True)
    assert widget.image_combo.currentText() == "B" and scales == [0.5, 0.7]


def test_undo_right_after_k_takes_the_review_back(widget, worms, qtbot, monkeypatch):
    """K is a step of the worms layer's undo history: Ctrl+Z un-reviews, Ctrl+Shift+Z again.

    Pixel edits keep undoing in turn, in the order they were made with the reviews; the
    keys are pressed on napari's canvas, as a user does.
    """
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    viewer = widget.viewer
    widget.run_model(blocking=True)
    widget.segment(blocking=True)
    session = widget.session()
    labels = session.labels_layer
    n = len(session.worms)
    segmented = np.array(labels.data, copy=True)
    viewer.layers.selection.active = labels  # (as a click makes it)
    canvas = viewer.window._qt_viewer.canvas.native
    canvas.setFocus()
    errors = []
    monkeypatch.setattr("sys.excepthook", lambda *exc: errors.append(exc))

    def key(k, modifiers=Qt.KeyboardModifier.NoModifier):
        QTest.keyClick(canvas, k, modifiers)
        qtbot.wait(20)

    ctrl = Qt.KeyboardModifier.ControlModifier
    first = widget.next_to_review()
    key(Qt.Key.Key_K)
    assert session.worm(first).reviewed and widget.review_label.text() == f"1 / {n} reviewed"
    key(Qt.Key.Key_Z, ctrl)  # undoes the review, not Segment all
    assert not session.worm(first).reviewed
    np.testing.assert_array_equal(labels.data, segmented)
    assert len(session.worms) == n and widget.review_label.text() == f"0 / {n} reviewed"
    assert f"Review of instance {first} undone" in widget.status.text()
    key(Qt.Key.Key_Z, ctrl | Qt.KeyboardModifier.ShiftModifier)  # redo: reviewed again
    assert session.worm(first).reviewed and widget.review_label.text() == f"1 / {n} reviewed"
    assert f"Review of instance {first} redone" in widget.status.text()

    # reviews and pixel edits undo in the order they were made
    second = widget.next_to_review()
    widget.set_tool("remove")
    widget.click(_inside(session, first))
    assert session.worm(first) is None and session.worm(second) is not None
    key(Qt.Key.Key_K)  # (the selected worm: the second)
    assert session.worm(second).reviewed
    key(Qt.Key.Key_Z, ctrl)  # the second's review
    assert not session.worm(second).reviewed and session.worm(first) is None
    key(Qt.Key.Key_Z, ctrl)  # the removal: the first is back, with its review
    assert session.worm(first) is not None and session.worm(first).reviewed
    key(Qt.Key.Key_Z, ctrl)  # the first's review
    assert not session.worm(first).reviewed
    np.testing.assert_array_equal(labels.data, segmented)
    key(Qt.Key.Key_Z, ctrl)  # Segment all
    assert labels.data.max() == 0 and not session.worms
    # the widget's Undo / Redo buttons walk the same history
    widget.redo()
    widget.redo()
    assert session.worm(first).reviewed and widget.status.text().startswith("Review of")
    widget.undo()
    assert not session.worm(first).reviewed and len(session.worms) == n
    # a new review after an undo clears what could be redone, as a new edit does
    session.select(second)
    widget.mark_reviewed()
    widget.redo()
    assert widget.status.text() == "Nothing to redo." and session.worm(second).reviewed
    assert session.to_sample().reviewed.sum() == 1 and not errors


def _inside(session, label):
    """A pixel of the worm ``label`` that the label image shows as it."""
    rows, cols = np.nonzero(np.asarray(session.labels_layer.data) == label)
    return int(rows[len(rows) // 2]), int(cols[len(cols) // 2])


def test_similarity_preview_follows_a_zoom_without_a_mouse_move(widget, worms, qtbot):
    """Zooming in (the wheel, no mouse move) recomputes the live similarity for the new
    view once the canvas has drawn it: one value per pixel, placed over the visible part."""
    viewer = widget.viewer
    widget.run_model(blocking=True)
    session = widget.session()
    widget.hover_check.setChecked(True)
    p = inner_pixel(worms.masks, 0)
    viewer.camera.zoom = 0.05  # far out: every step-th pixel
    viewer.window._qt_viewer.canvas.on_draw(None)
    widget._hover = p
    widget._update_hover()
    layer = viewer.layers["similarity to cursor"]
    assert layer.scale[-1] > 1
    viewer.camera.center = (p[0], p[1])
    viewer.camera.zoom = 8.0
    viewer.window._qt_viewer.canvas.on_draw(None)  # napari updates the corners
    (r0, r1, c0, c1), step = session.visible_window()
    assert step == 1 and r1 - r0 < session.shape[0]
    qtbot.waitUntil(lambda: layer.data.shape == (r1 - r0, c1 - c0), timeout=3000)
    assert tuple(layer.scale[-2:]) == (1.0, 1.0)
    widget.hover_check.setChecked(False)  # the preview off: a zoom computes nothing
    calls = []
    session.similarity_to = lambda point: calls.append(point)
    viewer.camera.zoom = 2.0
    qtbot.wait(200)
    assert not calls


def test_similarity_preview_covers_what_the_canvas_shows(widget, worms, qtbot):
    """The live similarity is computed for the visible part of the image, one value per
    screen pixel when zoomed out, and placed over those pixels: its values are those of the
    whole map there."""
    from napari_instseg.core.grow import similarity

    viewer = widget.viewer
    widget.run_model(blocking=True)
    session = widget.session()
    image = session.image_layer
    p = inner_pixel(worms.masks, 0)
    whole = similarity(session.prediction, p)
    layer_of = viewer.layers
    for zoom in (8.0, 0.05, None):
        if zoom is None:
            viewer.reset_view()
        else:
            viewer.camera.center = (p[0], p[1])
            viewer.camera.zoom = zoom
        viewer.window._qt_viewer.canvas.on_draw(None)  # napari updates the corners
        (r0, r1, c0, c1), step = session.visible_window()
        if zoom == 8.0:
            assert (r1 - r0) < whole.shape[0] and step == 1  # zoomed in: a part
        if zoom == 0.05:
            assert step > 1  # zoomed out: every step-th pixel
        sim = session.similarity_to(p)
        layer = layer_of["similarity to cursor"]
        np.testing.assert_array_equal(layer.data, sim)
        np.testing.assert_allclose(sim, whole[r0:r1:step, c0:c1:step], rtol=0, atol=1e-5)
        # the layer's pixel (i, j) lies over the image's (r0 + step i, c0 + step j)
        np.testing.assert_allclose(
            layer.data_to_world((1, 2)), image.data_to_world((r0 + step, c0 + 2 * step))
        )


def test_blocking_run_prepares_what_the_first_click_needs(widget, worms, qtbot, monkeypatch):
    """``run_model(blocking=True)`` (scripts, the demo, benchmarks) leaves the automatic
    segments clicks start from ready, as the worker does: the first click segments
    nothing (on a 4160 x 5568 mosaic it took 8-25 s in the GUI thread)."""
    from napari_instseg.core import instances, pick

    session = widget.session()
    oracle = compute.predict_image(worms.image)
    oracle.metadata["segment_params"] = {"boundary": {}}  # a model tuned for segmenting
    calls = []
    real = instances.segment_cropped

    def counting(prediction, *args, **kwargs):
        calls.append(prediction)
        return real(prediction, *args, **kwargs)

    monkeypatch.setattr(instances, "segment_cropped", counting)
    pick._CACHE.clear()
    widget.run_model(blocking=True)
    assert pick.starts_from_segments(session.prediction)
    assert [p is session.prediction for p in calls] == [True]  # segmented once, in the run
    r, c = inner_pixel(worms.masks, 0)
    click(qtbot, widget.viewer, r, c)
    assert len(calls) == 1  # the click used the segments made by the run
    assert iou(session.labels_layer.data == 1, worms.masks[0]) > 0.8


def _error_notifications():
    from napari.utils.notifications import ErrorNotification, notification_manager

    return [n for n in notification_manager.records if isinstance(n, ErrorNotification)]


def test_a_failed_run_model_is_said_once_and_the_widget_is_usable_again(
    widget, worms, qtbot, monkeypatch
):
    """A worker's error: one status line (what failed, what to do), no traceback, no re-raise.

    Without an ``errored`` handler given when the worker is made, superqt re-raised the
    error in the main thread (a traceback notification in napari, an aborted process in a
    script without ``napari.run()``) beside the widget's own status line.
    """
    before = len(_error_notifications())
    good = compute.predict_image

    def missing(image, model=None, device="auto", progress=None, tta=1, scale=1.0):
        raise FileNotFoundError("Model weights file not found: /nonexistent/x.safetensors")

    monkeypatch.setattr(compute, "predict_image", missing)
    worker = widget.run_model()
    assert worker is not None and not widget.run_btn.isEnabled()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=10_000)
    qtbot.wait(50)  # napari's later ``finished``
    text = widget.status.text()
    assert text.startswith("Prediction failed: Model weights file not found: /nonexistent/")
    assert "weights file" in text.split("safetensors", 1)[1]  # what to do
    assert widget.run_btn.isEnabled() and not widget.cancel_btn.isEnabled()
    assert widget.progress_bar.isHidden()
    assert len(_error_notifications()) == before  # said once: no traceback notification

    # the widget is usable again: the model runs, then Segment all fails the same way
    monkeypatch.setattr(compute, "predict_image", good)
    assert widget.run_model(blocking=True) is not None
    import napari_instseg.core.pick as pick

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(pick, "segment_all", broken)
    worker = widget.segment()
    assert worker is not None and not widget.segment_btn.isEnabled()
    qtbot.waitUntil(lambda: widget.segment_worker is None, timeout=10_000)
    qtbot.wait(50)
    text = widget.status.text()
    assert text.startswith("Segmentation failed: RuntimeError: out of memory. ")
    assert "Segment all" in text.split("memory", 1)[1]
    assert widget.segment_btn.isEnabled() and widget.progress_bar.isHidden()
    assert len(_error_notifications()) == before


def test_export_records_the_method_auto_chose_its_parameters_and_the_model_hash(
    widget, worms, monkeypatch, tmp_path
):
    """Provenance: the method ``auto`` resolved to, every parameter used, ``name@sha``.

    The manifest recorded ``{"method": "auto"}`` (only the boxes switched off) and
    ``"model": "shipped"``, though the user guide promises the method and its parameters
    and data-format shows a model as ``name@sha``.
    """
    import dataclasses
    import inspect
    import json

    from napari_instseg.core import instances

    sha = "6ec1e05110fcd58b38cb07946043812273bb8ca34ffcfca13e2a98489d8c536a"
    oracle = prediction_from_masks(worms.masks, noise=0.1)
    tuned = {"boundary": {"min_size": 40, "boundary_threshold": 0.8}}
    prediction = dataclasses.replace(
        oracle,
        metadata={
            **oracle.metadata,
            "model": "bbbc010",
            "model_sha256": sha,
            "recommended_method": "boundary",
            "segment_params": tuned,
        },
    )
    monkeypatch.setattr(compute, "predict_image", lambda image, **kwargs: prediction)
    widget.run_model(blocking=True)
    assert widget.method_combo.currentText() == "auto"
    widget.untangle.setChecked(False)
    assert widget.segment(blocking=True) > 0
    out = widget.export(tmp_path / "out")
    entry = json.loads((out / "manifest.json").read_text())["images"]["worms image"]
    assert entry["model"] == entry["metadata"]["model"] == "bbbc010@6ec1e051"
    seg = entry["metadata"]["segmentation"]
    assert seg["method"] == "boundary" and seg["requested"] == "auto"
    params = seg["params"]
    defaults = {
        name: p.default
        for name, p in inspect.signature(instances.segment_boundary).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    assert set(defaults) <= set(params)  # every parameter, not only the ones changed
    assert params["min_size"] == 40 and params["boundary_threshold"] == 0.8  # tuned
    assert params["untangle_factor"] == 0.0  # the box switched off
    for name in set(defaults) - {"min_size", "boundary_threshold", "untangle_factor"}:
        assert params[name] == json.loads(json.dumps(defaults[name])), name
    # no contrast in this prediction: no outline refinement was made, none is recorded
    assert params["edge_thresholds"] is None and "blob_filter" in params

    # a method chosen by hand: it, and the fields' values
    widget.method_combo.setCurrentText("seeds")
    widget.min_size.setValue(33)
    widget.segment(blocking=True)
    widget.export(tmp_path / "out", overwrite=True)
    entry = json.loads((out / "manifest.json").read_text())["images"]["worms image"]
    seg = entry["metadata"]["segmentation"]
    assert seg["method"] == seg["requested"] == "seeds"
    assert seg["params"]["min_size"] == 33 and "min_score" in seg["params"]


def test_measure_has_one_mean_intensity_column_for_the_image(widget, worms, qtbot):
    """With measure channel (none): ``mean_intensity`` once, not also ``mean_image``."""
    widget.run_model(blocking=True)
    widget.segment(blocking=True)
    assert widget.channel_combo.currentText() == "(none)"
    table = widget.measure()
    means = [c for c in table.columns if c.startswith("mean")]
    assert means == ["mean_intensity"]
    session = widget.session()
    worm = sorted(session.worms, key=lambda w: w.label)[0]
    assert np.isclose(table["mean_intensity"].iloc[0], session.image[worm.mask].mean())
    features = session.labels_layer.features
    assert [c for c in features.columns if c.startswith("mean")] == ["mean_intensity"]
    # a measure channel adds its own column beside it (also one named like the image)
    widget.viewer.add_image(worms.image * 2, name="image")
    widget.channel_combo.setCurrentText("image")
    table = widget.measure()
    assert [c for c in table.columns if c.startswith("mean")] == ["mean_intensity", "mean_image"]
    assert np.allclose(table["mean_image"], 2 * table["mean_intensity"], rtol=1e-5)


def test_an_image_renamed_before_the_widget_opens_keeps_its_worms_and_channel(
    make_napari_viewer, worms, tmp_path, qtbot
):
    """The reader links its layers by an id in their metadata, not by their names.

    Renaming ``B03`` before opening the widget made it create a new, empty ``worms`` layer
    beside the reader's ``B03 worms`` (and lose ``B03 w1`` as the measure channel).
    """
    from napari_instseg._napari import io as nio
    from napari_instseg._napari.widget import InstSegWidget

    w1, w2, dead = bbbc010_well(tmp_path / "bbbc010", worms, well="B03")
    viewer = make_napari_viewer()
    for data, kwargs, kind in nio.get_reader(str(w2))(str(w2)):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    viewer.layers["B03"].name = "plate2-B03"
    widget = InstSegWidget(viewer)
    qtbot.wait(50)  # the widget's deferred preparation of the chosen image
    assert widget.image_combo.currentText() == "plate2-B03"
    session = widget.session()
    assert session.labels_layer is viewer.layers["B03 worms"]
    assert len(session.worms) == len(worms.masks)  # the well's masks, adopted
    assert "worms" not in viewer.layers  # no new, empty worms layer
    assert widget.channel_combo.currentText() == "B03 w1"
    assert widget.measure()["dead"].tolist() == dead
    # renaming with the widget open still works (the worms stay with their image)
    viewer.layers["plate2-B03"].name = "plate3-B03"
    assert widget.session() is session and session.labels_layer is viewer.layers["B03 worms"]
    out = widget.export(tmp_path / "out")
    assert [s.name for s in __import__("napari_instseg").read_training_folder(out)] == [
        "plate3-B03"
    ]

    # the well opened again: each image keeps its own worms (the ids differ), also renamed
    for data, kwargs, kind in nio.get_reader(str(w2))(str(w2)):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    assert "B03 worms [1]" in viewer.layers or "B03 worms" in viewer.layers
    second = viewer.layers[-3]
    assert nio.stain_channel(second) is None and second is not viewer.layers["plate3-B03"]
    second.name = "again"
    widget.image_combo.setCurrentText("again")
    qtbot.wait(50)
    assert widget.session().labels_layer is viewer.layers[-2]
    assert widget.session().labels_layer is not session.labels_layer


def _uint16_wells(root, worms, wells=("B03",)):
    """A BBBC010-style folder whose w2 images are uint16 (as BBBC010's are), with masks."""
    import tifffile
    from PIL import Image as PILImage

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    images = {}
    for k, well in enumerate(wells):
        stem = (
            f"1649_1109_0003_Amp5-1_B_20070424_{well}_{{}}_9E84F49F-1B25-4E7E-8040-D1BB2D7E73E{k}"
        )
        image = (worms.image + 7 * k).astype(np.uint16)
        tifffile.imwrite(root / "images" / f"{stem.format('w2')}.tif", image)
        for i, mask in enumerate(worms.masks):
            path = root / "masks" / f"{well}_{i + 1:02d}_ground_truth.png"
            PILImage.fromarray(mask.astype(np.uint8) * 255).save(path)
        images[well] = image
    return images


def test_export_of_a_bbbc010_well_keeps_the_files_uint16(make_napari_viewer, worms, tmp_path):
    """The reader gives float32 (as the core reads BBBC010); the export writes uint16 again.

    data-format.md: ``images/<name>.tif`` is the image as given, in its own dtype; the
    widget wrote BBBC010's uint16 wells as float32 (twice the size).
    """
    import tifffile

    from napari_instseg._napari import io as nio
    from napari_instseg._napari.widget import InstSegWidget
    from napari_instseg.core.training_folder import read_training_folder

    root = tmp_path / "bbbc010"
    images = _uint16_wells(root, worms, wells=("B03", "B04"))
    w2 = next((root / "images").glob("*_B03_w2_*.tif"))
    viewer = make_napari_viewer()
    for data, kwargs, kind in nio.get_reader(str(w2))(str(w2)):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    assert viewer.layers["B03"].data.dtype == np.float32  # what the core reads
    widget = InstSegWidget(viewer)
    assert len(widget.session().worms) == len(worms.masks)
    out = widget.export(tmp_path / "out")
    written = tifffile.imread(out / "images" / "B03.tif")
    assert written.dtype == np.uint16 and np.array_equal(written, images["B03"])
    manifest = (out / "manifest.json").read_text()
    assert '"image_dtype": "uint16"' in manifest
    assert len(read_training_folder(out)[0].masks) == len(worms.masks)

    # File > Save Selected Layers with the plugin's writer: the same
    layers = [viewer.layers["B03"], viewer.layers["B03 worms"]]
    layer_data = [(layer.data, layer._get_base_state(), layer._type_string) for layer in layers]
    nio.write_training(str(tmp_path / "saved"), layer_data)
    assert tifffile.imread(tmp_path / "saved" / "images" / "B03.tif").dtype == np.uint16

    # a plane of the whole folder read as a stack
    for data, kwargs, kind in nio.get_reader(str(root))(str(root)):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    viewer.dims.set_point(0, 1)
    plane = widget.plane_layer(viewer.layers["images"])
    assert plane.name == "B04" and plane.data.dtype == np.float32
    widget.image_combo.setCurrentText("B04")
    assert len(widget.session().worms) == len(worms.masks)
    assert widget.export(out) == out
    written = tifffile.imread(out / "images" / "B04.tif")
    assert written.dtype == np.uint16 and np.array_equal(written, images["B04"])

    # values that uint16 cannot hold exactly stay as they are
    assert nio.as_source_dtype(np.float32([0.5, 2]), "uint16").dtype == np.float32
    assert nio.as_source_dtype(np.float32([70000, 2]), "uint16").dtype == np.float32
    assert nio.as_source_dtype(np.float32([-1, 2]), "uint16").dtype == np.float32
    assert nio.as_source_dtype(np.float32([3, 2]), "uint16").dtype == np.uint16
    assert nio.as_source_dtype(np.float32([3, 2]), None).dtype == np.float32
