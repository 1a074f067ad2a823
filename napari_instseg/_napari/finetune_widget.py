"""Dock widget "Fine-tune model": corrected training folders -> a new model version.

A thin Qt front end over :func:`napari_instseg.core.finetune.finetune`. Training runs in
napari's ``thread_worker``; after every epoch the worker reports the log row, which moves
napari's progress bar and draws the loss and validation-AP curves; *Stop* ends training
after the current epoch and keeps the best checkpoint so far. The new version is saved in
``<first folder>/models/<name>/`` and announced on :data:`model_versions`, which the main
widget listens to (its model list gains the version).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from napari.utils import progress
from psygnal import Signal
from qtpy.QtCore import QObject, QPointF, Qt
from qtpy.QtCore import Signal as QtSignal
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .layers import real_viewer
from .workers import failure_message, make_worker

PARENT_SHIPPED = "shipped model (BBBC010 bright-field)"
PARENT_FILE = "weights file..."
FREEZE_CHOICES = {
    "nothing (all layers learn)": "",
    "encoder": "encoder",
    "encoder + decoder": "backbone",
}


class _ModelVersions:
    """Announces new model versions (``trained.emit(path)``) to every widget.

    ``paths`` keeps every version announced in this session, in order, so that a main
    widget opened later (closed and opened again from the Plugins menu) lists them too.
    """

    trained = Signal(str)
    #: Emitted with the folder of every export of the main widget (training data).
    exported = Signal(str)

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.exports: list[str] = []
        self.trained.connect(self._remember)
        self.exported.connect(self._remember_export)

    def _remember(self, path: str) -> None:
        if path not in self.paths:
            self.paths.append(path)

    def _remember_export(self, folder: str) -> None:
        if folder not in self.exports:
            self.exports.append(folder)


#: Emitted with the weights path of every version a fine-tune widget produces.
model_versions = _ModelVersions()


def reviewed_counts(folder: str | Path) -> tuple[int, int, int] | None:
    """Images, worms and reviewed worms of an exported training folder, from its manifest.

    Parameters
    ----------
    folder : str or Path
        A folder listed for fine-tuning.

    Returns
    -------
    (int, int, int) or None
        None when the folder has no readable manifest (e.g. a BBBC010-style folder) or
        records no review flags: then every worm is trusted.
    """
    import json

    from ..core.training_folder import MANIFEST

    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
        entries = list(manifest["images"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    images = worms = reviewed = 0
    for entry in entries:
        flags = entry.get("reviewed")
        n = int(entry.get("n_instances") or 0)
        if flags is None:
            return None  # unknown: all trusted
        images, worms, reviewed = images + 1, worms + n, reviewed + sum(map(bool, flags))
    return images, worms, reviewed


class _Run(QObject):
    """One fine-tuning run; it outlives the panel that started it.

    Closing the *Fine-tune model* panel does not stop training (napari's progress bar goes
    on, the new version is still announced); a panel opened again takes the run over
    (:data:`_running`): its curves, its Stop button, its result. Log rows come from the
    worker thread through the queued ``row`` signal.
    """

    row = QtSignal(dict)

    def __init__(self, folders: list[str], epochs: int) -> None:
        super().__init__()
        self.folders = folders
        self.rows: list[dict[str, Any]] = []
        self.stop = False
        self.owner: Any = None  # the panel showing the run
        self.worker: Any = None
        self.ended = False  # its result handled, or its worker finished without one
        self.progress: Any = progress(total=epochs, desc="Fine-tuning")
        self.row.connect(self._on_row)

    def _tell(self, method: str, *args: Any) -> None:
        owner = self.owner
        if owner is None:
            return
        try:
            getattr(owner, method)(*args)
        except RuntimeError:  # its Qt parts were deleted (the panel was closed)
            self.owner = None

    def _on_row(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.progress is not None:
            self.progress.update(1)
        self._tell("_on_row", row)

    def on_returned(self, result: Any) -> None:
        """Announce the new version (even with no panel open), show it, end the run.

        The run ends here, not at the worker's later ``finished`` signal: a Fine-tune
        pressed in between (the result is shown) starts a new run instead of being taken
        for this one.
        """
        try:
            model_versions.trained.emit(str(result.path))
            self._tell("_on_done", result)
        finally:
            self.on_finished()

    def on_errored(self, error: Exception) -> None:
        """Fine-tuning raised: say it in the panel (once), end the run."""
        try:
            self._tell("_on_error", error)
        finally:
            self.on_finished()

    def on_finished(self) -> None:
        """Close the progress bar, free the slot for the next run, enable the buttons.

        Once per run: after :meth:`on_returned` has ended it, the worker's ``finished``
        changes nothing (a newer run may hold the slot and the panel by then).
        """
        global _running
        if self.ended:
            return
        self.ended = True
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if _running is self:
            _running = None
        self._tell("_on_finished", self)


#: The fine-tuning run in progress in this napari (one at a time), or None.
_running: _Run | None = None


class CurvePlot(QWidget):
    """Training loss (blue) and validation AP (orange) per epoch, drawn with QPainter."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.losses: list[float] = []
        self.val_ap: list[float] = []
        self.setMinimumHeight(110)
        self.setToolTip("blue: training loss (scaled to its maximum); orange: validation AP")

    def clear(self) -> None:
        """Forget the curves."""
        self.losses, self.val_ap = [], []
        self.update()

    def add(self, row: dict[str, Any]) -> None:
        """Append one epoch's log row."""
        self.losses.append(float(row.get("loss_total", 0.0)))
        if "val_ap" in row:
            self.val_ap.append(float(row["val_ap"]))
        self.update()

    def _polyline(self, values: list[float], top: float) -> QPolygonF:
        w, h = max(self.width() - 8, 1), max(self.height() - 8, 1)
        n = max(len(self.losses), 2)
        return QPolygonF(
            [
                QPointF(4 + w * i / (n - 1), 4 + h * (1 - v / top if top else 1))
                for i, v in enumerate(values)
            ]
        )

    def paintEvent(self, event: Any) -> None:
        """Draw the two curves."""
        painter = QPainter(self)
        painter.fillRect(self.rect(), QColor(38, 41, 48))
        for values, color, top in (
            (self.losses, QColor(80, 160, 255), max(self.losses, default=1.0)),
            (self.val_ap, QColor(255, 160, 60), 1.0),
        ):
            if len(values) >= 1:
                painter.setPen(QPen(color, 2))
                painter.drawPolyline(self._polyline(values, top))
        painter.end()


class FinetuneWidget(QWidget):
    """Fine-tune a model on corrected labels (training folders exported by the plugin).

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer (napari passes it).
    """

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = real_viewer(napari_viewer)
        self.worker: Any = None
        self.version: Any = None
        self.last_error: str = ""
        self._run: _Run | None = None

        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("Training folders (exports of corrected labels):"))
        self.folders = QListWidget()
        self.folders.setMaximumHeight(90)
        layout.addWidget(self.folders)
        row = QHBoxLayout()
        add, remove = QPushButton("Add folder..."), QPushButton("Remove")
        add.clicked.connect(self._browse_folder)
        remove.clicked.connect(self._remove_folder)
        row.addWidget(add)
        row.addWidget(remove)
        layout.addLayout(row)

        form = QFormLayout()
        self.parent_model = QComboBox()
        self.parent_model.addItems([PARENT_SHIPPED, PARENT_FILE])
        self.parent_model.activated.connect(self._parent_chosen)
        self._parent_path: str | None = None
        form.addRow("Start from", self.parent_model)
        self.steps = QSpinBox()
        self.steps.setRange(1, 100000)
        self.steps.setValue(200)
        self.steps.setToolTip(
            "optimiser steps of 4 random 256 x 256 crops (about 1 s each on CPU)"
        )
        form.addRow("Steps", self.steps)
        self.freeze = QComboBox()
        self.freeze.addItems(list(FREEZE_CHOICES))
        self.freeze.setToolTip("parts of the network kept fixed while fine-tuning")
        form.addRow("Freeze", self.freeze)
        self.val_fraction = QDoubleSpinBox()
        self.val_fraction.setRange(0.0, 0.9)
        self.val_fraction.setSingleStep(0.05)
        self.val_fraction.setValue(0.2)
        self.val_fraction.setToolTip(
            "fraction of the images held out to choose the checkpoint (at least one when "
            "there are two or more; with one image, or 0, the last epoch's weights are kept)"
        )
        form.addRow("Held out", self.val_fraction)
        self.replay = QCheckBox("mix in the parent's training images")
        self.replay.setToolTip(
            "half of the crops come from the images the parent model was trained on, when "
            "they are on this computer: the corrections add to what it knew (left out when "
            "the parent scores less than half its own validation AP on your held-out "
            "images: images unlike its own, where replay held fine-tuning back)"
        )
        form.addRow("Replay", self.replay)
        layout.addLayout(form)
        self._update_replay()

        row = QHBoxLayout()
        self.start_button, self.stop_button = QPushButton("Fine-tune"), QPushButton("Stop")
        self.start_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.stop)
        self.stop_button.setEnabled(False)
        row.addWidget(self.start_button)
        row.addWidget(self.stop_button)
        layout.addLayout(row)
        self.curve = CurvePlot()
        layout.addWidget(self.curve)
        self.status = QLabel("Add one or more training folders, then Fine-tune.")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.status)
        layout.addStretch(1)
        # the folders exported in this session are the data to fine-tune on: listed already
        for folder in model_versions.exports:
            if Path(folder).is_dir():
                self.folders.addItem(str(Path(folder)))
        if self.data_folders():
            self._refresh_parents()
            self.status.setText(self._data_summary())
        exported = self._on_exported
        model_versions.exported.connect(exported)
        self.destroyed.connect(
            lambda *_: model_versions.exported.disconnect(exported, missing_ok=True)
        )
        if _running is not None:  # started by a panel that was closed: carry on showing it
            self._take_over(_running)

    def _on_exported(self, folder: str) -> None:
        """The main widget exported into ``folder``: list it (the data to fine-tune on)."""
        self.add_folder(folder)

    def _take_over(self, run: _Run) -> None:
        """Show a run in progress: its folders, curves and Stop button."""
        self._run, self.worker = run, run.worker
        run.owner = self
        for folder in run.folders:
            if folder not in self.data_folders():
                self.folders.addItem(folder)
        for row in run.rows:
            self.curve.add(row)
        self.start_button.setEnabled(False)
        self.stop_button.setEnabled(not run.stop)
        self.status.setText(
            "Stopping after this step..." if run.stop else
            f"Fine-tuning on {len(run.folders)} folder(s) (started before this panel "
            f"opened), {len(run.rows)} epoch(s) done..."
        )  # fmt: skip

    # -- inputs -------------------------------------------------------------------------
    def add_folder(self, folder: str | Path) -> None:
        """Add a training folder (ignored if already listed); say what it holds."""
        folder = str(Path(folder))
        if folder not in self.data_folders():
            self.folders.addItem(folder)
        self._refresh_parents()
        if self.worker is None:
            self.status.setText(self._data_summary())

    def _data_summary(self) -> str:
        """What the listed folders hold for training, with a warning when nothing is reviewed."""
        images = worms = reviewed = 0
        for folder in self.data_folders():
            counts = reviewed_counts(folder)
            if counts is None:  # not an export: every worm is trusted
                return f"{len(self.data_folders())} folder(s) listed. Fine-tune when ready."
            images, worms, reviewed = (
                a + b for a, b in zip((images, worms, reviewed), counts, strict=True)
            )
        text = f"{images} image(s), {worms} worms, {reviewed} reviewed."
        if worms and not reviewed:
            return (
                f"{text} Fine-tuning learns only from reviewed worms: mark the worms you "
                "checked with K (Worm segmentation, 4. Review) and export again."
            )
        return f"{text} Fine-tune when ready (unreviewed worms are left out)."

    def data_folders(self) -> list[str]:
        """The folders listed."""
        return [self.folders.item(i).text() for i in range(self.folders.count())]

    def _browse_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Training folder")
        if folder:
            self.add_folder(folder)

    def _remove_folder(self) -> None:
        for item in self.folders.selectedItems():
            self.folders.takeItem(self.folders.row(item))
        self._refresh_parents()

    def set_parent(self, path: str | Path | None) -> None:
        """Start from these weights (None: the shipped model)."""
        self._parent_path = None if path is None else str(path)
        if path is None:
            self.parent_model.setCurrentIndex(0)
            self._update_replay()
            return
        text = f"{Path(path).parent.name}/{Path(path).name}"
        index = self.parent_model.findText(text)
        if index < 0:
            self.parent_model.addItem(text, str(path))
            index = self.parent_model.count() - 1
        self.parent_model.setCurrentIndex(index)
        self._update_replay()

    def _parent_chosen(self, index: int) -> None:
        text = self.parent_model.itemText(index)
        if text == PARENT_SHIPPED:
            self._parent_path = None
        elif text == PARENT_FILE:
            path, _ = QFileDialog.getOpenFileName(self, "Weights", "", "*.safetensors")
            self.set_parent(path or None)
        else:
            self._parent_path = self.parent_model.itemData(index)
        self._update_replay()

    def _update_replay(self) -> None:
        """Offer replay only when the parent's training images are found."""
        from ..core.finetune import parent_training_data
        from ..core.weights import shipped_weights_path

        try:
            found = parent_training_data(self._parent_path or shipped_weights_path())
        except (OSError, ValueError):
            found = None
        self.replay.setEnabled(found is not None)
        self.replay.setChecked(found is not None)
        self.replay.setText(
            "mix in the parent's training images"
            + ("" if found is not None else " (not on this computer)")
        )

    def _refresh_parents(self) -> None:
        from ..core.finetune import list_model_versions

        for folder in self.data_folders():
            for version in list_model_versions(folder):
                text = f"{version.path.parent.name}/{version.path.name}"
                if self.parent_model.findText(text) < 0:
                    self.parent_model.addItem(text, str(version.path))

    # -- running ------------------------------------------------------------------------
    def start(self) -> Any:
        """Fine-tune in a worker thread; returns the worker (None when nothing to do)."""
        global _running
        if self.worker is not None:
            return self.worker
        if _running is not None:  # (another panel's; one run at a time)
            self._take_over(_running)
            return self.worker
        folders = self.data_folders()
        if not folders:
            self.status.setText("Add at least one training folder first.")
            return None
        counts = [reviewed_counts(folder) for folder in folders]
        if all(c is not None and c[1] > 0 and c[2] == 0 for c in counts):
            # every worm would be left out of the loss: the model would learn background only
            self.status.setText(f"Nothing to learn from. {self._data_summary()}")
            return None
        from ..core.finetune import finetune

        kwargs = {
            "steps": self.steps.value(),
            "freeze": FREEZE_CHOICES[self.freeze.currentText()],
            "val_fraction": self.val_fraction.value(),
        }
        kwargs["replay"] = "auto" if self.replay.isEnabled() and self.replay.isChecked() else None
        parent = self._parent_path
        self.version, self.last_error = None, ""
        self.curve.clear()
        run = _running = self._run = _Run(folders, epochs=max(1, -(-kwargs["steps"] // 20)))
        run.owner = self

        def callback(row: dict[str, Any]) -> bool:
            try:
                run.row.emit(dict(row))
            except RuntimeError:  # Qt is gone (napari quit): keep what was learnt, stop
                return True
            return stop_asked()

        def stop_asked() -> bool:
            # Stop, or napari asking its workers to quit as its window closes: the step
            # ends the epoch, and the best weights so far become the version instead of
            # training on, unseen, for all the steps asked (asked after every step)
            return run.stop or bool(getattr(run.worker, "abort_requested", False))

        def work() -> Any:
            return finetune(folders, parent, callback=callback, should_stop=stop_asked, **kwargs)

        # an error is said once in the panel's status line, not re-raised (make_worker)
        self.worker = run.worker = make_worker(work, run.on_errored)
        self.worker.returned.connect(run.on_returned)
        self.worker.finished.connect(run.on_finished)
        self.start_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.status.setText(f"Fine-tuning on {len(folders)} folder(s)...")
        self.worker.start()
        return self.worker

    def stop(self) -> None:
        """Stop after the current step (the best weights so far become the version)."""
        if self._run is None or self.worker is None:
            return
        self._run.stop = True
        self.stop_button.setEnabled(False)
        self.status.setText("Stopping after this step...")

    def _on_row(self, row: dict[str, Any]) -> None:
        self.curve.add(row)
        val = f", validation AP {row['val_ap']:.3f}" if "val_ap" in row else ""
        stopping = " (stopping after this step)" if self._run and self._run.stop else ""
        self.status.setText(
            f"epoch {row.get('epoch')}: loss {row.get('loss_total', float('nan')):.3f}{val}"
            f"{stopping}"
        )

    def _on_done(self, version: Any) -> None:
        self.version = version
        early = "Stopped early: " if self._run is not None and self._run.stop else ""
        unjudged = (
            ""
            if "val_ap" in (version.metrics or {})
            else " (no image held out, so no validation AP: the last epoch's weights)"
        )
        from ..core.weights import read_metadata

        try:
            skipped = (read_metadata(version.path).get("finetune") or {}).get("replay_skipped")
        except (OSError, ValueError):  # (removed meanwhile: the announcement stands)
            skipped = None
        replay = f"\nReplay left out: {skipped}." if skipped else ""
        self.status.setText(
            f"{early}New model version {version.label}{unjudged}\n{version.path}\n"
            f"Choose it under model in Worm segmentation and Run model.{replay}"
        )
        self._refresh_parents()

    def _on_error(self, error: Exception) -> None:
        self.last_error = f"{type(error).__name__}: {error}"
        self.status.setText(
            failure_message(
                "Fine-tuning",
                error,
                "Check the folders listed and the parent model, then Fine-tune again.",
            )
        )

    def _on_finished(self, run: _Run | None = None) -> None:
        if run is not None and run is not self._run:
            return  # an earlier run of this panel ending late: the newer one goes on
        self.worker = None
        self.start_button.setEnabled(True)
        self.stop_button.setEnabled(False)
