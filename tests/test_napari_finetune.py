"""The fine-tune dock widget: runs in a worker, draws curves, stops, announces the version."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_instseg.core.model import InstSegNet, ModelConfig
from napari_instseg.core.synthetic import make_worms
from napari_instseg.core.training_folder import write_training_folder
from napari_instseg.core.weights import save_model

pytest.importorskip("napari")


@pytest.fixture(autouse=True)
def _fresh_session_lists(monkeypatch):
    """Versions and exports announced by earlier tests are not this test's."""
    from napari_instseg._napari.finetune_widget import model_versions

    monkeypatch.setattr(model_versions, "paths", [])
    monkeypatch.setattr(model_versions, "exports", [])


@pytest.fixture
def export(tmp_path):
    samples = [
        dataclasses.replace(
            make_worms((96, 96), n_worms=3, length=(40, 60), n_crossings=0, seed=i),
            name=f"img{i}",
        )
        for i in range(2)
    ]
    return write_training_folder(tmp_path / "export", samples)


@pytest.fixture
def parent(tmp_path):
    torch.manual_seed(0)
    model = InstSegNet(ModelConfig(channels=(8, 8, 8), embedding_dim=4, head_channels=8))
    return save_model(model, tmp_path / "tiny.safetensors", {"name": "tiny"})


@pytest.fixture
def widget(make_napari_viewer, monkeypatch):
    from napari_instseg._napari.finetune_widget import FinetuneWidget

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    viewer = make_napari_viewer(show=True)
    w = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(w, name="finetune")
    return w


def test_finetune_widget_trains_a_version(widget, export, parent, qtbot):
    from napari_instseg._napari.finetune_widget import model_versions

    announced = []
    model_versions.trained.connect(announced.append)
    assert widget.start() is None  # no folder yet: nothing happens, the user is told
    assert "training folder" in widget.status.text()
    widget.add_folder(export)
    widget.add_folder(export)  # listed once
    assert widget.data_folders() == [str(export)]
    widget.set_parent(parent)
    widget.steps.setValue(2)
    worker = widget.start()
    assert worker is not None and not widget.start_button.isEnabled()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert widget.last_error == ""
    assert widget.version is not None and widget.version.path.is_file()
    assert widget.version.path.parent.parent == export / "models"
    assert announced == [str(widget.version.path)]
    assert len(widget.curve.losses) == 1 and np.isfinite(widget.curve.losses[0])
    assert widget.version.name in widget.status.text()
    # the new version can be the parent of the next run
    index = widget.parent_model.findText(f"{widget.version.path.parent.name}/model.safetensors")
    assert index >= 0
    model_versions.trained.disconnect(announced.append)


def test_finetune_widget_stop_keeps_best_so_far(widget, export, parent, qtbot):
    widget.add_folder(export)
    widget.set_parent(parent)
    widget.steps.setValue(60)  # three epochs of 20 steps
    widget.start()
    widget.stop()  # honoured after the first epoch
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert len(widget.curve.losses) == 1
    assert widget.version is not None and widget.version.path.is_file()
    assert widget.start_button.isEnabled() and not widget.stop_button.isEnabled()


def test_finetune_widget_reports_errors(widget, tmp_path, parent, qtbot):
    empty = tmp_path / "empty"
    empty.mkdir()
    widget.add_folder(empty)
    widget.set_parent(parent)
    widget.start()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.version is None
    assert "failed" in widget.status.text() and widget.last_error


def test_main_widget_lists_and_uses_new_versions(make_napari_viewer, tmp_path):
    from napari_instseg._napari.finetune_widget import model_versions
    from napari_instseg._napari.widget import MODEL_SHIPPED, InstSegWidget

    torch.manual_seed(0)
    tiny = InstSegNet(ModelConfig(channels=(8, 8, 8), embedding_dim=4, head_channels=8))
    path = save_model(tiny, tmp_path / "models" / "tiny-ft1" / "model.safetensors", {})
    viewer = make_napari_viewer(show=True)
    viewer.add_image(make_worms((64, 64), n_worms=3, length=(20, 30), seed=0).image, name="img")
    widget = InstSegWidget(viewer)
    viewer.window.add_dock_widget(widget, name="instseg")
    model_versions.trained.emit(str(path))  # what the fine-tune widget does when done
    index = widget.model_combo.findText("version: tiny-ft1")
    assert index >= 0
    assert widget.model_combo.currentText() == MODEL_SHIPPED  # listed, not forced on the user
    widget.add_model_version(path)
    assert widget.model_choice() == str(path)
    assert widget.model_combo.count() == index + 1  # not listed twice
    prediction = widget.run_model(blocking=True)
    assert prediction.embeddings.shape == (4, 64, 64)  # the version's D, not the shipped 16


def _parent_with_training_images(parent, tmp_path, val_ap=None):
    """The parent saved again, recording a folder of its own training images (``img0``)."""
    from napari_instseg.core.weights import load_model, read_metadata

    trained_on = write_training_folder(
        tmp_path / "trained_on",
        [
            dataclasses.replace(
                make_worms((96, 96), n_worms=3, length=(40, 60), n_crossings=0, seed=9),
                name="img0",
            )
        ],
    )
    meta = read_metadata(parent)
    meta["training"] = {"data": [str(trained_on)], "train_wells": "img0"}
    if val_ap is not None:  # what it scores on its own validation images
        meta["metrics"] = {"val_ap": val_ap}
    return save_model(load_model(parent), tmp_path / "trained.safetensors", meta)


def _finetune_two_steps(widget, export, qtbot):
    """Fine-tune on ``export`` for 2 steps through the panel; it must end without error."""
    widget.add_folder(export)
    widget.steps.setValue(2)
    widget.start()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert widget.last_error == ""


def test_finetune_widget_offers_replay_only_when_the_parents_images_exist(
    widget, export, parent, tmp_path, qtbot
):
    from napari_instseg.core.weights import read_metadata

    widget.set_parent(parent)  # records no training data
    assert not widget.replay.isEnabled() and "not on this computer" in widget.replay.text()
    # the parent's own training images: another folder (the folders fine-tuned on now are
    # never replayed)
    widget.set_parent(_parent_with_training_images(parent, tmp_path))
    assert widget.replay.isEnabled() and widget.replay.isChecked()
    _finetune_two_steps(widget, export, qtbot)
    replay = read_metadata(widget.version.path)["finetune"]["replay"]
    assert replay["names"] == "img0" and replay["fraction"] == 0.5


def test_finetune_widget_says_when_replay_was_left_out(widget, export, parent, tmp_path, qtbot):
    """The parent finds nothing on the held-out corrections: replay is left out, and said."""
    from napari_instseg.core.weights import read_metadata

    widget.set_parent(_parent_with_training_images(parent, tmp_path, val_ap=0.9))
    assert widget.replay.isEnabled() and widget.replay.isChecked()
    _finetune_two_steps(widget, export, qtbot)
    assert read_metadata(widget.version.path)["finetune"]["replay"] is None
    assert "Replay left out: the parent scores AP 0.00" in widget.status.text()


def test_closed_main_widget_no_longer_hears_about_new_versions(make_napari_viewer, qtbot):
    from napari_instseg._napari.finetune_widget import model_versions
    from napari_instseg._napari.widget import InstSegWidget

    viewer = make_napari_viewer(show=True)
    main = InstSegWidget(viewer)
    n = len(model_versions.trained)
    assert n >= 1
    with qtbot.waitSignal(main.destroyed, timeout=5000):
        main.deleteLater()
    assert len(model_versions.trained) == n - 1
    model_versions.trained.emit("/nowhere/model.safetensors")  # no error from a dead widget


def test_opening_a_training_folder_lists_its_model_versions(make_napari_viewer, export):
    from napari_instseg._napari.io import read
    from napari_instseg._napari.widget import MODEL_SHIPPED, InstSegWidget

    torch.manual_seed(0)
    tiny = InstSegNet(ModelConfig(channels=(8, 8, 8), embedding_dim=4, head_channels=8))
    path = save_model(tiny, export / "models" / "earlier-ft1" / "model.safetensors", {})
    viewer = make_napari_viewer(show=True)
    widget = InstSegWidget(viewer)
    viewer.window.add_dock_widget(widget, name="instseg")
    assert widget.model_combo.findText("version: earlier-ft1") < 0
    for data, kwargs, kind in read(str(export)):  # what File > Open does with the reader
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    index = widget.model_combo.findText("version: earlier-ft1")
    assert index >= 0
    assert widget.model_combo.itemData(index) == str(path)
    assert widget.model_combo.currentText() == MODEL_SHIPPED  # listed, not chosen
    count = widget.model_combo.count()
    viewer.add_image(np.zeros((96, 96), np.float32), name="another")
    assert widget.model_combo.count() == count  # a folder's versions are listed once


def test_finetune_widget_refuses_folders_without_a_reviewed_worm(widget, parent, tmp_path, qtbot):
    """Exports whose worms nobody reviewed would teach background only: the user is told."""
    samples = [
        dataclasses.replace(
            make_worms((96, 96), n_worms=3, length=(40, 60), n_crossings=0, seed=i),
            name=f"img{i}",
            reviewed=np.zeros(3, bool),
        )
        for i in range(2)
    ]
    unreviewed = write_training_folder(tmp_path / "unreviewed", samples)
    widget.set_parent(parent)
    widget.add_folder(unreviewed)
    assert "2 image(s), 6 worms, 0 reviewed" in widget.status.text()
    assert "mark the worms you checked with K" in widget.status.text()
    widget.steps.setValue(1)
    assert widget.start() is None and widget.worker is None
    assert "Nothing to learn from" in widget.status.text()
    # one reviewed worm is something to learn from
    samples[1] = dataclasses.replace(samples[1], reviewed=np.array([True, False, False]))
    write_training_folder(unreviewed, samples[1:], overwrite=True)
    widget.add_folder(unreviewed)
    assert "1 reviewed" in widget.status.text()
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert widget.last_error == "" and widget.version is not None


def test_a_panel_opened_again_takes_over_the_running_fine_tune(widget, export, parent, qtbot):
    """Closing the panel mid-run loses nothing; the next panel shows and stops that run."""
    from napari_instseg._napari.finetune_widget import FinetuneWidget, model_versions

    announced = []
    model_versions.trained.connect(announced.append)
    viewer = widget.viewer
    widget.add_folder(export)
    widget.set_parent(parent)
    widget.steps.setValue(60)  # three epochs: time to close and reopen the panel
    worker = widget.start()
    viewer.window.remove_dock_widget(widget)  # the panel's close button
    again = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(again, name="finetune again")
    assert again.data_folders() == [str(export)]
    assert not again.start_button.isEnabled() and again.stop_button.isEnabled()
    assert "started before this panel opened" in again.status.text()
    assert again.start() is worker  # no second run on the same data
    again.stop()
    assert not again.stop_button.isEnabled()  # pressed once: it is honoured
    qtbot.waitUntil(lambda: again.worker is None, timeout=120_000)
    assert again.version is not None and again.version.path.is_file()
    assert again.status.text().startswith("Stopped early: New model version")
    assert len(again.curve.losses) == 1  # the epoch it showed
    assert announced == [str(again.version.path)]  # the main widget hears of it once
    assert again.start_button.isEnabled()
    model_versions.trained.disconnect(announced.append)


def test_closing_napari_mid_run_keeps_the_best_epoch_as_a_version(widget, export, parent, qtbot):
    """napari's window close cancels its tasks: training stops after its epoch, not later."""
    from napari_instseg.core.finetune import list_model_versions

    widget.add_folder(export)
    widget.set_parent(parent)
    widget.steps.setValue(60)  # three epochs
    worker = widget.start()
    finished = []
    worker.finished.connect(lambda: finished.append(True))
    assert widget.viewer.window._task_status_manager.is_busy()  # napari's close asks first
    widget.viewer.window._task_status_manager.cancel_all()  # what closing the window does
    qtbot.waitUntil(lambda: bool(finished), timeout=120_000)
    [version] = list_model_versions(export)
    assert version.path.is_file()
    log = (version.path.parent / "log.csv").read_text().strip().splitlines()
    assert len(log) == 2  # header + the one epoch that was running


def test_finetune_widget_on_one_image_says_nothing_was_held_out(widget, export, parent, qtbot):
    """With one image nothing validates the weights: the user is told it is the last epoch."""
    from napari_instseg.core.training_folder import read_training_folder

    one = write_training_folder(export.parent / "one", read_training_folder(export)[:1])
    widget.add_folder(one)
    widget.set_parent(parent)
    widget.steps.setValue(1)
    widget.start()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert widget.version is not None and "val_ap" not in widget.version.metrics
    assert "no image held out" in widget.status.text()
    assert widget.curve.val_ap == []  # no orange curve either


def test_a_main_widget_opened_later_lists_the_versions_of_this_session(
    make_napari_viewer, tmp_path
):
    """Close Worm segmentation, fine-tune, open it again: the new version is in its list."""
    from napari_instseg._napari.finetune_widget import model_versions
    from napari_instseg._napari.widget import MODEL_SHIPPED, InstSegWidget

    torch.manual_seed(0)
    tiny = InstSegNet(ModelConfig(channels=(8, 8, 8), embedding_dim=4, head_channels=8))
    path = save_model(tiny, tmp_path / "models" / "later-ft1" / "model.safetensors", {})
    viewer = make_napari_viewer(show=True)
    model_versions.trained.emit(str(path))  # announced while no main widget was open
    widget = InstSegWidget(viewer)
    viewer.window.add_dock_widget(widget, name="instseg")
    index = widget.model_combo.findText("version: later-ft1")
    assert index >= 0 and widget.model_combo.itemData(index) == str(path)
    assert widget.model_combo.currentText() == MODEL_SHIPPED  # listed, not chosen


def test_the_fine_tune_panel_lists_the_folders_exported_in_this_session(
    make_napari_viewer, monkeypatch, tmp_path
):
    """Export in Worm segmentation, open Fine-tune model: the folder is there already."""
    from napari_instseg._napari import compute
    from napari_instseg._napari.finetune_widget import FinetuneWidget
    from napari_instseg._napari.widget import InstSegWidget
    from napari_instseg.core.oracle import prediction_from_masks

    sample = make_worms((96, 96), n_worms=3, length=(40, 60), n_crossings=0, seed=0)
    oracle = prediction_from_masks(sample.masks)
    monkeypatch.setattr(compute, "predict_image", lambda image, **kwargs: oracle)
    monkeypatch.setenv(compute.CACHE_ENV, "off")
    viewer = make_napari_viewer(show=True)
    viewer.add_image(sample.image, name="plate")
    main = InstSegWidget(viewer)
    viewer.window.add_dock_widget(main, name="instseg")
    open_before = FinetuneWidget(viewer)  # a panel open while exporting
    viewer.window.add_dock_widget(open_before, name="finetune")
    main.run_model(blocking=True)
    main.segment(blocking=True)
    main.session().mark_reviewed(main.session().worms[0].label)
    main.export(tmp_path / "corrected")
    assert open_before.data_folders() == [str(tmp_path / "corrected")]
    assert (
        "1 image(s), " in open_before.status.text() and "1 reviewed" in open_before.status.text()
    )
    viewer.window.remove_dock_widget(open_before)
    opened_after = FinetuneWidget(viewer)  # opened from the Plugins menu afterwards
    assert opened_after.data_folders() == [str(tmp_path / "corrected")]


def test_fine_tune_pressed_as_the_last_run_returns_starts_a_new_run(
    widget, export, qtbot, monkeypatch, tmp_path
):
    """napari emits ``returned`` then ``finished``: Fine-tune in between starts a new run.

    It was taken for the old run (whose worker was only let go at ``finished``), and the
    old run's late ``finished`` then let the new run's worker go.
    """
    import threading
    import time
    from types import SimpleNamespace

    from napari_instseg._napari import finetune_widget
    from napari_instseg.core import finetune as finetune_module

    go, release = threading.Event(), threading.Event()
    calls = []

    def fake_finetune(folders, parent=None, callback=None, should_stop=None, **kwargs):
        calls.append(list(folders))
        gate = go if len(calls) == 1 else release
        while not gate.is_set() and not should_stop():
            time.sleep(0.005)
        path = tmp_path / f"tiny-ft{len(calls)}" / "model.safetensors"
        return SimpleNamespace(path=path, label=path.parent.name, metrics={"val_ap": 0.5})

    monkeypatch.setattr(finetune_module, "finetune", fake_finetune)
    widget.add_folder(export)
    first = widget.start()
    seen, second = [], []

    def press_fine_tune(result):  # connected after the panel's: runs once it is shown
        seen.append((widget.worker, widget.start_button.isEnabled(), widget.status.text()))
        second.append(widget.start())

    first.returned.connect(press_fine_tune)
    with qtbot.waitSignal(first.finished, timeout=10_000):
        go.set()
    [(worker, enabled, text)] = seen
    assert worker is None and enabled and "New model version tiny-ft1" in text
    assert second[0] is not None and second[0] is not first
    qtbot.waitUntil(lambda: len(calls) == 2, timeout=5000)
    # the first run's late ``finished`` let nothing of the second go
    assert widget.worker is second[0] and finetune_widget._running is widget._run
    assert not widget.start_button.isEnabled() and widget.stop_button.isEnabled()
    release.set()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=10_000)
    assert "tiny-ft2" in widget.status.text() and finetune_widget._running is None
