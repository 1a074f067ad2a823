"""The dock widget: run the model, segment automatically, click to grow and fix, export.

The widget is a thin Qt front end over :class:`~napari_instseg._napari.session.Session`;
every action is also a method (``run_model``, ``click``, ``segment``, ``export``, ...) so
that scripts and tests drive it without a mouse.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtCore import QEvent, QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSlider,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..core.scale import MAX_SCALE
from . import compute
from .finetune_widget import model_versions
from .io import META, is_channel_of, layer_link, stain_channel
from .layers import LAYER_NAMES, OWN_LAYER, prediction_layers, real_viewer
from .session import (
    MapLayers,
    Point,
    Session,
    export_conflict,
    live_session_for,
    live_sessions,
    recorded_scale,
    segmentation_record,
)
from .workers import failure_message, make_worker

#: Click tools: key -> (shortcut key, button text, help).
TOOLS: dict[str, tuple[str, str, str]] = {
    "new": ("N", "New", "click a worm: a new instance (the automatic segment there, or grown)"),
    "add": ("A", "+ seed", "click: add a positive seed (a missing piece) to the selected one"),
    "negative": (
        "Q",
        "- seed",
        "click: add a negative seed (cut a leak, a merge) to the selected",
    ),
    "remove": ("R", "Remove", "click an instance to delete it"),
    "merge": ("J", "Merge", "click two instances to join them"),
    "split": ("S", "Split", "click twice inside one instance: cut it along the boundary map"),
    "select": ("I", "Select", "click an instance to select it (tau slider acts on it)"),
}

#: Other keys: key -> help.
KEYS: dict[str, str] = {
    "T": "toggle live similarity to the pixel under the cursor",
    "K": "mark the selected instance reviewed (again: take the review back)",
    ".": "centre on the next (least certain) unreviewed instance",
    "Shift+click": "add a positive seed to the selected instance (any tool)",
    "Ctrl+Z / Ctrl+Shift+Z": "undo / redo (the worms layer's history, reviews included)",
}

METHODS = ("auto", "hybrid", "seeds", "boundary")
MODEL_SHIPPED = "shipped model (BBBC010 bright-field)"
MODEL_FILE = "weights file..."
#: Delay between two layer-showing steps. A real timer, not 0: Qt runs a chain of 0 ms
#: single shots as posted events ahead of every timer, so several layer insertions (and
#: their repaints) ran back to back in one event-loop turn and the viewer froze for
#: 0.3 s; with 1 ms each step gets its own turn (one insertion, ~0.1 s, at a time).
_STEP_DELAY_MS = 1
#: The ``measure channel`` choice meaning no channel.
NO_CHANNEL = "(none)"


def keys_help() -> str:
    """One line per key, as shown in the widget and the user guide."""
    lines = [f"{k}: {TOOLS[t][2]}" for t, (k, _, _) in ((t, TOOLS[t]) for t in TOOLS)]
    lines += [f"{k}: {v}" for k, v in KEYS.items()]
    return "\n".join(lines)


class InstSegWidget(QWidget):
    """Dock widget of napari-instseg.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer (napari passes it when the widget is opened from the Plugins menu).
    """

    #: Emitted (with the session) once a prediction's layers are all shown.
    prediction_shown = Signal(object)

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        _one_numba_thread()
        self.viewer = real_viewer(napari_viewer)
        self.sessions: dict[int, Session] = {}
        self._chosen_layer: Any = None  # the image layer chosen (followed through renames)
        #: the image name the widget chose by itself (not the user): a stain channel chosen
        #: so (the only image when it was opened) gives way to a bright-field image
        self._auto_image: str | None = None
        #: image name -> the measure channel the user chose for it
        self._channel_choice: dict[str, str] = {}
        #: image name -> the scale the user set while it was chosen (their choice wins
        #: over the scale an export recorded)
        self._scale_choice: dict[str, float] = {}
        #: the scale the user last set: the field's value for images without a choice of
        #: their own or an export's scale
        self._user_scale = 1.0
        self._setting_scale = False  # the widget, not the user, is setting the field
        #: the image whose scale field value is its export's (said in the status line)
        self._scale_from_export: str | None = None
        self._bound_keys: dict[str, Any] = {}  # key -> our callback, while connected
        self._removed = False  # taken out of the window (a later widget may take over)
        #: one set of map layers for all images: it shows the maps of the image last run or
        #: chosen (adding layers is slow in napari; changing their data is not)
        self._map_layers = MapLayers()
        self._version_folders: set[str] = set()  # folders whose model versions are listed
        self.tool = "new"
        self._pending: tuple[str, Point, int] | None = None
        self._cancel = False
        self.worker: Any = None  # the Run model worker, until its result is handled
        self.segment_worker: Any = None  # the Segment all worker, likewise
        self._hover: Point | None = None
        self._hover_timer = QTimer(self)
        self._hover_timer.setSingleShot(True)
        self._hover_timer.setInterval(30)
        self._hover_timer.timeout.connect(self._update_hover)
        #: the preview covers the visible part of the image: after a zoom or pan without
        #: a mouse move it is computed again once the canvas has drawn the new view
        self._view_timer = QTimer(self)
        self._view_timer.setSingleShot(True)
        self._view_timer.setInterval(80)
        self._view_timer.timeout.connect(self._update_hover)
        self.table_data: Any = None
        self._progress_state: Any = None
        self._bar_what = ""
        self._bar_start = time.monotonic()
        self._bar_shown: tuple[int, int, str] | None = None
        self._showing: Any = None
        self._after_paint: list[Any] = []
        self._paint_watch = _PaintWatch(self._paint_started)
        self._watched: list[Any] = []
        #: steps that show layers one per event-loop turn: (steps, done, interruptible)
        self._show_timer = QTimer(self)
        self._show_timer.setSingleShot(True)
        self._show_timer.setInterval(_STEP_DELAY_MS)
        self._show_timer.timeout.connect(self._show_step)
        self._bar_timer = QTimer(self)
        self._bar_timer.setInterval(100)
        self._bar_timer.timeout.connect(self._tick_bar)
        self._build()
        self._connect_viewer()
        earlier = self._take_over_earlier_sessions()
        self._refresh_images()
        if earlier is not None:  # back on the image the earlier widget showed, at its tau
            self.image_combo.setCurrentText(earlier.image_layer.name)
            self.tau_slider.blockSignals(True)
            self.tau_slider.setValue(int(round(earlier.tau * 100)))
            self.tau_slider.blockSignals(False)
            self.tau_label.setText(f"{earlier.tau:.2f}")

    # =============================================================== building
    def _build(self) -> None:
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        inner = QWidget()
        lay = QVBoxLayout(inner)
        scroll.setWidget(inner)
        outer.addWidget(scroll)

        # --- 1. model
        box = QGroupBox("1. Model")
        form = QFormLayout(box)
        self.image_combo = QComboBox()
        self.image_combo.setToolTip(
            "The image layer to segment (2D, bright-field). Fluorescence channels (e.g. "
            "BBBC010's Sytox w1) are listed last: measure them with 'measure channel' below"
        )
        form.addRow("image", self.image_combo)
        self.model_combo = QComboBox()
        self.model_combo.addItems([MODEL_SHIPPED, MODEL_FILE])
        form.addRow("model", self.model_combo)
        row = QHBoxLayout()
        self.model_path = QLineEdit()
        self.model_path.setPlaceholderText("path to .safetensors weights")
        self.model_path.setEnabled(False)
        self.browse_btn = QPushButton("Browse...")
        self.browse_btn.setEnabled(False)
        row.addWidget(self.model_path)
        row.addWidget(self.browse_btn)
        form.addRow("", row)
        row = QHBoxLayout()
        self.device_combo = QComboBox()
        self.device_combo.addItems(_available_devices())
        self.device_label = QLabel()
        row.addWidget(self.device_combo)
        row.addWidget(self.device_label)
        form.addRow("device", row)
        self.tta_check = QCheckBox("test-time augmentation (8 passes)")
        self.tta_check.setToolTip(
            "Average the boundary, foreground and class maps over 8 flips/rotations of the "
            "image: better automatic segmentation (shipped model on BBBC010 validation: AP "
            "0.63 -> 0.66, AP50 0.90 -> 0.94), 8x the network time. Clicks are about as good "
            "either way."
        )
        form.addRow("", self.tta_check)
        self.scale_spin = QDoubleSpinBox()
        self.scale_spin.setRange(0.0, MAX_SCALE)
        self.scale_spin.setDecimals(2)
        self.scale_spin.setSingleStep(0.1)
        self.scale_spin.setSpecialValueText("auto")  # shown at the minimum, 0
        self.scale_spin.setValue(1.0)
        self.scale_spin.setToolTip(
            "Resize the image by this factor before the model sees it, for worms wider or "
            "narrower than the model's (the shipped model's: about 8 px; a worm twice as "
            "wide wants 0.5). Layers and labels stay on your image's pixels; sizes in "
            "the segmentation options are in the model's pixels. 'auto' (0) estimates the "
            "factor from three to six quick passes of the model."
        )
        form.addRow("scale", self.scale_spin)
        row = QHBoxLayout()
        self.run_btn = QPushButton("Run model")
        self.run_btn.setToolTip("Predict embeddings, seediness, boundaries (cached per image)")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        row.addWidget(self.run_btn)
        row.addWidget(self.cancel_btn)
        form.addRow(row)
        self.progress_bar = QProgressBar()
        self.progress_bar.setVisible(False)
        self.progress_bar.setTextVisible(True)
        form.addRow(self.progress_bar)
        lay.addWidget(box)

        # --- 2. automatic segmentation
        box = QGroupBox("2. Automatic segmentation")
        form = QFormLayout(box)
        self.method_combo = QComboBox()
        self.method_combo.addItems(METHODS)
        self.method_combo.setToolTip(
            "auto: the model's recommended method and tuned parameters; seeds: Fathi et al. "
            "seed sampling; boundary: BAISeg watershed; hybrid: both"
        )
        form.addRow("method", self.method_combo)
        defaults = _segment_defaults()
        self.min_score = QDoubleSpinBox()
        self.min_score.setRange(0.0, 1.0)
        self.min_score.setSingleStep(0.05)
        self.min_score.setValue(defaults.get("min_score", 0.5))
        self.min_score.setToolTip("drop instances whose class score is lower (seeds, hybrid)")
        form.addRow("min score", self.min_score)
        self.min_seediness = QDoubleSpinBox()
        self.min_seediness.setRange(0.0, 1.0)
        self.min_seediness.setSingleStep(0.05)
        self.min_seediness.setValue(defaults.get("min_seediness", 0.5))
        self.min_seediness.setToolTip("only pixels this seedy become seeds (seeds, hybrid)")
        form.addRow("min seediness", self.min_seediness)
        self.min_size = QSpinBox()
        self.min_size.setRange(0, 100000)
        self.min_size.setValue(int(defaults.get("min_size", 30)))
        form.addRow("min size (px)", self.min_size)
        self.untangle = _option(
            "untangle crossing / touching worms",
            "boundary, hybrid: cut segments much larger than a worm where their skeleton "
            "shows two worms crossing or touching (both keep a crossing)",
        )
        form.addRow(self.untangle)
        self.refine_edges = _option(
            "outlines from the image's contrast",
            "re-decide the pixels on every mask's outline (segmentation and clicks) by how "
            "dark they are against the local background, with the thresholds tuned for the "
            "model (BBBC010: better masks; other data: try both)",
        )
        self.refine_edges.toggled.connect(lambda on: self._set_on_sessions("refine_edges", on))
        form.addRow(self.refine_edges)
        self.click_segments = _option(
            "clicks start from the automatic segments",
            "a click takes the automatic segment under it, later clicks correct it (a "
            "negative click cuts a merged pair along the boundary map, a positive one takes "
            "back a missed piece); off, or a model never tuned: the embedding growth",
        )
        self.click_segments.toggled.connect(lambda on: self._set_on_sessions("click_segments", on))
        form.addRow(self.click_segments)
        self.drop_debris = _option(
            "drop round debris",
            "leave out compact, convex instances (clumps of debris, bubbles): a worm is "
            "long or curled, never both short and convex (where the model was tuned with it)",
        )
        form.addRow(self.drop_debris)
        self.keep_edited = _option("keep edited / reviewed instances")
        form.addRow(self.keep_edited)
        self.segment_btn = QPushButton("Segment all")
        form.addRow(self.segment_btn)
        lay.addWidget(box)

        # --- 3. interactive editing
        box = QGroupBox("3. Click to grow and fix")
        vbox = QVBoxLayout(box)
        grid = QHBoxLayout()
        self.tool_group = QButtonGroup(self)
        self.tool_group.setExclusive(True)
        self.tool_buttons: dict[str, QPushButton] = {}
        for i, (name, (key, text, tip)) in enumerate(TOOLS.items()):
            btn = QPushButton(f"{text} [{key}]")
            btn.setCheckable(True)
            btn.setToolTip(tip)
            self.tool_group.addButton(btn, i)
            self.tool_buttons[name] = btn
            grid.addWidget(btn)
            if i == 3:
                vbox.addLayout(grid)
                grid = QHBoxLayout()
        vbox.addLayout(grid)
        self.tool_buttons["new"].setChecked(True)
        row = QHBoxLayout()
        row.addWidget(QLabel("tau"))
        self.tau_slider = QSlider(Qt.Orientation.Horizontal)
        self.tau_slider.setRange(5, 95)
        self.tau_slider.setValue(50)
        self.tau_slider.setToolTip("similarity threshold: higher = tighter masks")
        self.tau_label = QLabel("0.50")
        row.addWidget(self.tau_slider)
        row.addWidget(self.tau_label)
        vbox.addLayout(row)
        self.hover_check = QCheckBox("live similarity to cursor [T]")
        vbox.addWidget(self.hover_check)
        row = QHBoxLayout()
        self.undo_btn = QPushButton("Undo")
        self.redo_btn = QPushButton("Redo")
        row.addWidget(self.undo_btn)
        row.addWidget(self.redo_btn)
        vbox.addLayout(row)
        self.keys_label = QLabel(keys_help())
        self.keys_label.setWordWrap(True)
        self.keys_label.setStyleSheet("font-size: 10px")
        vbox.addWidget(self.keys_label)
        lay.addWidget(box)

        # --- 4. review
        box = QGroupBox("4. Review")
        row = QHBoxLayout(box)
        self.reviewed_btn = QPushButton("Mark reviewed [K]")
        self.next_btn = QPushButton("Next to review [.]")
        self.review_label = QLabel("0 / 0")
        row.addWidget(self.reviewed_btn)
        row.addWidget(self.next_btn)
        row.addWidget(self.review_label)
        lay.addWidget(box)

        # --- 5. measure and export
        box = QGroupBox("5. Measure and export")
        vbox = QVBoxLayout(box)
        row = QHBoxLayout()
        self.measure_btn = QPushButton("Measure")
        self.csv_btn = QPushButton("Save CSV...")
        self.export_btn = QPushButton("Export training folder...")
        self.seeds_btn = QPushButton("Save seeds...")
        self.seeds_btn.setToolTip(
            "The clicks of the worms grown from clicks, as a CSV for napari-instseg grow"
        )
        row.addWidget(self.measure_btn)
        row.addWidget(self.csv_btn)
        row.addWidget(self.seeds_btn)
        channel_row = QFormLayout()
        self.channel_combo = QComboBox()
        self.channel_combo.setToolTip(
            "An image layer measured in every worm (its mean_<channel> column), e.g. the "
            "fluorescence taken with the bright-field image; a stain channel (BBBC010's "
            "Sytox w1) also calls each worm dead or alive (the dead column)"
        )
        channel_row.addRow("measure channel", self.channel_combo)
        vbox.addLayout(channel_row)
        vbox.addLayout(row)
        vbox.addWidget(self.export_btn)
        self.table = QTableWidget()
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setMinimumHeight(120)
        vbox.addWidget(self.table)
        lay.addWidget(box)

        self.status = QLabel("Choose an image and run the model.")
        self.status.setWordWrap(True)
        lay.addWidget(self.status)
        lay.addStretch(1)

        # --- signals
        self.model_combo.currentIndexChanged.connect(self._on_model_choice)
        self.browse_btn.clicked.connect(self._browse_model)
        for path in model_versions.paths:  # fine-tuned in this session before it opened
            if Path(path).is_file():
                self.add_model_version(path, select=False)
        announced = self._on_version_trained
        model_versions.trained.connect(announced)
        # a closed widget must not hear about versions trained later (its Qt parts are gone)
        self.destroyed.connect(
            lambda *_: model_versions.trained.disconnect(announced, missing_ok=True)
        )
        self.device_combo.currentTextChanged.connect(self._update_device_label)
        self.run_btn.clicked.connect(lambda: self.run_model())
        self.cancel_btn.clicked.connect(self.cancel)
        self.segment_btn.clicked.connect(lambda: self.segment())
        self.tool_group.idClicked.connect(lambda i: self.set_tool(list(TOOLS)[i]))
        self.tau_slider.sliderPressed.connect(self._tau_pressed)
        self.tau_slider.sliderReleased.connect(self._tau_released)
        self.tau_slider.valueChanged.connect(self._tau_changed)
        self.hover_check.toggled.connect(self._on_hover_toggled)
        self.undo_btn.clicked.connect(self.undo)
        self.redo_btn.clicked.connect(self.redo)
        self.reviewed_btn.clicked.connect(lambda: self.mark_reviewed())
        self.next_btn.clicked.connect(lambda: self.next_to_review())
        self.measure_btn.clicked.connect(lambda: self.measure())
        self.csv_btn.clicked.connect(lambda: self.save_csv())
        self.export_btn.clicked.connect(lambda: self.export())
        self.seeds_btn.clicked.connect(lambda: self.save_seeds())
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        self.channel_combo.activated.connect(self._on_channel_chosen)
        self.method_combo.currentTextChanged.connect(lambda *_: self._sync_param_fields())
        self.scale_spin.valueChanged.connect(self._on_scale_set)
        self._update_device_label()
        self._sync_param_fields()

    def _connect_viewer(self) -> None:
        v = self.viewer
        if self._bound_keys:
            return  # connected already
        for ev in (v.layers.events.inserted, v.layers.events.removed):
            ev.connect(self._refresh_images)
        v.mouse_drag_callbacks.append(self._on_mouse_drag)
        v.mouse_move_callbacks.append(self._on_mouse_move)
        for ev in (v.camera.events.zoom, v.camera.events.center):
            ev.connect(self._on_view_moved)
        # named functions: napari's shortcut handling reads each callback's __name__ (a
        # functools.partial has none, and every key press in the viewer then failed)
        keys = {TOOLS[t][0]: _tool_key(self, t) for t in TOOLS}
        keys["T"] = _key_action(self.hover_check.toggle, "toggle_similarity")
        keys["K"] = _key_action(self.mark_reviewed, "mark_reviewed")
        keys["."] = _key_action(self.next_to_review, "next_to_review")
        for key, func in keys.items():
            v.bind_key(key, func, overwrite=True)
        self._bound_keys = keys

    def _take_over_earlier_sessions(self) -> Session | None:
        """Carry on where an earlier widget on this viewer left off (it was closed).

        Its sessions (worms, seeds, reviews, predictions) become this widget's, and so do
        the map layers it made, instead of a second set. Returns the session whose maps
        are shown, or None.
        """
        earlier = live_sessions(self.viewer)
        maps = next((s.map_layers for s in earlier if s.map_layers), None)
        if maps is None:  # no session left: the map layers the plugin made, by their mark
            maps = MapLayers()
            for layer in self.viewer.layers:
                key = layer.metadata.get(OWN_LAYER)
                if key in LAYER_NAMES and key not in ("similarity", "worms", "seeds"):
                    maps[key] = layer
        for key, layer in maps.items():
            self._map_layers[key] = layer
        self._map_layers.owner = maps.owner
        for session in earlier:
            self._attach(session)
            self.sessions[id(session.image_layer)] = session
        owner = self._map_layers.owner
        return owner if owner in earlier else (earlier[0] if earlier else None)

    def _attach(self, session: Session) -> None:
        """Give a session this widget's shared map layers, callbacks and switches."""
        session.end_preview()  # (an earlier widget's tau drag that never ended)
        session.map_layers = self._map_layers
        session.defer = self.after_next_paint
        session.on_worms_changed = self._on_worms_edited
        session.refine_edges = self.refine_edges.isChecked()
        session.click_segments = self.click_segments.isChecked()

    def _disconnect_viewer(self) -> None:
        """Stop hearing the viewer's mouse, keys and layer events (the widget was removed).

        napari's close button on a dock widget takes the widget out of the window; a
        widget opened again from the Plugins menu is a new one, and the old one must not
        edit the worms too.
        """
        from napari.utils.key_bindings import coerce_keybinding

        v = self.viewer
        for session in self.sessions.values():  # a tau drag left open: one undo step now
            session.end_preview()
        for ev in (v.layers.events.inserted, v.layers.events.removed):
            ev.disconnect(self._refresh_images)
        for ev in (v.camera.events.zoom, v.camera.events.center):
            ev.disconnect(self._on_view_moved)
        self._view_timer.stop()
        for callbacks, func in (
            (v.mouse_drag_callbacks, self._on_mouse_drag),
            (v.mouse_move_callbacks, self._on_mouse_move),
        ):
            while func in callbacks:
                callbacks.remove(func)
        for key, func in self._bound_keys.items():
            if v.keymap.get(coerce_keybinding(key)) is func:  # not a later widget's
                v.bind_key(key, None)
        self._bound_keys = {}

    def event(self, event: Any) -> bool:  # noqa: D102 - Qt's
        kind = event.type()
        if kind == QEvent.Type.ParentChange:
            self._removed = self.parent() is None
            if self._removed:
                self._disconnect_viewer()
            else:
                self._connect_viewer()
        elif kind == QEvent.Type.Hide and not event.spontaneous():
            # the panel hidden (napari's "hide this panel"): clicks and keys are napari's
            self._disconnect_viewer()
        elif kind == QEvent.Type.Show and not event.spontaneous():
            self._connect_viewer()
            self._refresh_images()
        return super().event(event)

    # ============================================================ draw order
    def after_next_paint(self, callback: Any) -> None:
        """Run ``callback`` once the viewer's canvas has painted (within 0.1 s anyway).

        Edits use it to put what matters (a click's mask) on screen first and what can
        wait a frame (seed markers) right after.
        """
        canvases = self._canvases()
        if not canvases:
            callback()
            return
        self._after_paint.append(callback)
        QTimer.singleShot(100, self._run_after_paint)  # no paint coming: do not wait longer

    def _canvases(self) -> list[Any]:
        """The window's OpenGL widgets (napari's canvas), watched for paint events."""
        live = [w for w in self._watched if _visible(w)]
        if live:  # searching the window's widget tree costs milliseconds: do it once
            return live
        try:
            from qtpy.QtOpenGLWidgets import QOpenGLWidget
        except ImportError:  # pragma: no cover - Qt without OpenGL widgets
            return []
        window = self.window()
        if window is self:  # not docked yet
            return []
        self._watched = [w for w in window.findChildren(QOpenGLWidget) if _visible(w)]
        for canvas in self._watched:
            canvas.installEventFilter(self._paint_watch)
        return list(self._watched)

    def _paint_started(self) -> None:
        if self._after_paint:
            QTimer.singleShot(0, self._run_after_paint)  # runs once this paint has finished

    def _run_after_paint(self) -> None:
        callbacks, self._after_paint = self._after_paint, []
        for callback in callbacks:
            callback()

    # ================================================================ helpers
    def _say(self, text: str) -> None:
        self.status.setText(text)
        try:
            self.viewer.status = text
        except Exception:  # noqa: BLE001 - status is cosmetic
            pass

    def _refresh_images(self, event: Any = None) -> None:
        current = self.image_combo.currentText()
        chosen = self._chosen_layer
        if chosen is not None and chosen in self.viewer.layers:
            current = chosen.name  # also after it was renamed
        layers = self._user_images()
        # images to segment first; stain channels (fluorescence, for Measure) after them
        stains = [layer for layer in layers if stain_channel(layer)]
        images = [layer for layer in layers if not stain_channel(layer)]
        names = [layer.name for layer in images + stains]
        for layer in self.viewer.layers:
            if isinstance(layer, Image):
                layer.events.name.connect(self._refresh_images)  # once: napari dedups
        # the widget's own choice of a stain channel (the only image when it was opened)
        # gives way to a bright-field image; a choice of the user's stays
        auto = current not in names or (
            current == self._auto_image
            and current in {layer.name for layer in stains}
            and bool(images)
            and not self._worked_on(current)
        )
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        for i, layer in enumerate(stains, start=len(images)):
            self.image_combo.setItemData(
                i,
                f"{stain_channel(layer)}: a fluorescence channel, measured with 'measure "
                "channel'; the model is for bright-field images",
                Qt.ItemDataRole.ToolTipRole,
            )
        if names:
            self.image_combo.setCurrentText(names[0] if auto else current)
        self.image_combo.blockSignals(False)
        self._list_versions_beside_images()
        for session in self.sessions.values():
            if session.forget_deleted_layers() and session is self.session(create=False):
                self._update_review_label()
        # forget sessions whose image is gone
        for key in [
            k for k, s in self.sessions.items() if s.image_layer not in self.viewer.layers
        ]:
            if self._map_layers.owner is self.sessions[key]:
                self._map_layers.owner = None
            del self.sessions[key]
        if self.image_combo.currentText() != current:
            self._on_image_changed()
        if auto:
            self._auto_image = self.image_combo.currentText() or None
        self._chosen_layer = self.image_layer()
        self._refresh_channels()
        self._refresh_scale()  # (a reopened export's worms layer comes after its image)

    def _user_images(self) -> list[Any]:
        """The viewer's Image layers that are the user's (not maps the plugin made)."""
        return [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, Image)
            and not layer.metadata.get(OWN_LAYER)
            and not any(layer is m for s in self.sessions.values() for m in _own_layers(s))
        ]

    def _worked_on(self, name: str) -> bool:
        """Whether the image layer ``name`` has been run or has worms in this widget."""
        for session in self.sessions.values():
            if session.image_layer.name == name:
                return session.prediction is not None or bool(session.worms)
        return False

    def _refresh_channels(self) -> None:
        """List the layers the chosen image can be measured in (``measure channel``).

        Image layers of the chosen image's height and width: its own stain channels first
        (chosen by default: BBBC010's w1 of the same well), then other stain channels, then
        other images. A channel the user chose for this image stays chosen.
        """
        image = self.image_layer()
        candidates = []
        if image is not None:
            shape = _plane_shape(image)
            candidates = [
                layer
                for layer in self._user_images()
                if layer is not image
                and not getattr(layer, "rgb", False)
                and np.ndim(layer.data) == 2
                and tuple(layer.data.shape) == shape
            ]
        candidates.sort(
            key=lambda layer: (
                not (stain_channel(layer) and is_channel_of(layer, image)),
                not stain_channel(layer),
            )
        )
        names = [NO_CHANNEL] + [layer.name for layer in candidates]
        own = candidates[0] if candidates else None
        default = (
            own.name if own is not None and stain_channel(own) and is_channel_of(own, image)
            else NO_CHANNEL
        )  # fmt: skip
        chosen = self._channel_choice.get(image.name) if image is not None else None
        self.channel_combo.blockSignals(True)
        self.channel_combo.clear()
        self.channel_combo.addItems(names)
        self.channel_combo.setCurrentText(chosen if chosen in names else default)
        self.channel_combo.blockSignals(False)

    def _on_channel_chosen(self, index: int = -1) -> None:
        image = self.image_layer()
        if image is not None:
            self._channel_choice[image.name] = self.channel_combo.currentText()

    def measure_channel(self) -> Any:
        """The Image layer chosen in ``measure channel`` (None for none)."""
        name = self.channel_combo.currentText()
        if name and name != NO_CHANNEL and name in self.viewer.layers:
            return self.viewer.layers[name]
        return None

    def _list_versions_beside_images(self) -> None:
        """List the model versions kept beside the folders the image layers were read from."""
        from ..core.finetune import list_model_versions

        folders = {
            layer.metadata[META]["folder"]
            for layer in self.viewer.layers
            if isinstance(layer, Image) and "folder" in (layer.metadata.get(META) or {})
        }
        for folder in sorted(folders - self._version_folders):
            self._version_folders.add(folder)
            for version in reversed(list_model_versions(folder)):  # newest ends up last
                self.add_model_version(version.path, select=False)

    def image_layer(self) -> Any:
        """The image layer chosen in the widget (or None)."""
        name = self.image_combo.currentText()
        if name and name in self.viewer.layers:
            return self.viewer.layers[name]
        return None

    def session(self, create: bool = True) -> Session | None:
        """The editing session of the chosen image (created on first use)."""
        layer = self.image_layer()
        if layer is None:
            return None
        key = id(layer)
        if key not in self.sessions and create:
            session = Session(self.viewer, layer)
            self._attach(session)
            worms = self._worms_layer_for(layer)
            if worms is not None:
                session.adopt_labels_layer(worms)
            self.sessions[key] = session
        return self.sessions.get(key)

    def _worms_layer_for(self, image_layer: Any) -> Any | None:
        """A Labels layer holding this image's worms that no other session edits.

        Read with the image by the plugin's reader (the same :func:`~.io.layer_link` id in
        both layers' metadata, whatever their names are now), else named ``<image> worms``
        (as napari's duplicate suffix makes it: ``A04 [1]`` and ``A04 worms [1]``) or made
        for this image by the plugin (``metadata["napari_instseg"]["image"]``), of the
        image's height and width.
        """
        link = layer_link(image_layer)
        names = {f"{image_layer.name} worms"}
        suffixed = re.fullmatch(r"(.*) \[(\d+)\]", image_layer.name)
        if suffixed:
            names.add(f"{suffixed[1]} worms [{suffixed[2]}]")
        shape = tuple(image_layer.data.shape[-2:])
        if getattr(image_layer, "rgb", False):
            shape = tuple(image_layer.data.shape[-3:-1])
        for other in self.viewer.layers:
            if not isinstance(other, Labels) or other.data.shape != shape:
                continue
            other_link = layer_link(other)
            if link is not None and other_link is not None:
                if other_link != link:  # the worms of another image (or another reading)
                    continue
            elif (
                other.name not in names
                and (other.metadata.get(META) or {}).get("image") != image_layer.name
            ):
                continue
            holder = live_session_for(other.data)
            if holder is None or holder.image_layer is image_layer:
                return other
        return None

    def _on_image_changed(self, index: int = -1) -> None:
        self._auto_image = None  # chosen by the user (the widget's own choice sets it after)
        previous, self._chosen_layer = self._chosen_layer, self.image_layer()
        self._show_only_chosen(previous)
        self._refresh_channels()
        session = self.session(create=False)
        self._update_review_label()
        stain = stain_channel(self._chosen_layer) if self._chosen_layer is not None else None
        if stain:  # allowed (the user may know better), but say what it is
            self._say(
                f"{self._chosen_layer.name!r} is a fluorescence channel ({stain}); the model "
                "is for bright-field images. To measure it in the worms, choose it as "
                "'measure channel' below."
            )
        if session is not None and session.labels_layer in self.viewer.layers:
            self.viewer.layers.selection.active = session.labels_layer
        self._refresh_scale(say=True)
        # after the event that changed the image has been handled
        QTimer.singleShot(_STEP_DELAY_MS, self._prepare_chosen_image)

    def _show_only_chosen(self, previous: Any = None) -> None:
        """Show the chosen image and its worms, hide the other images the widget worked on.

        Images on one grid are drawn over each other: without this a click could land on
        another image's worms than the ones shown. Left alone in napari's grid mode.
        """
        chosen = self._chosen_layer
        if chosen is None or self.viewer.grid.enabled:
            return
        chosen.visible = True
        if previous is not None and previous is not chosen and previous in self.viewer.layers:
            previous.visible = False
        for other in self.sessions.values():
            mine = other.image_layer is chosen
            for layer in (other.image_layer, other.labels_layer, other.seeds_layer):
                if layer is not None and layer in self.viewer.layers:
                    layer.visible = mine

    def _prepare_chosen_image(self) -> None:
        """Give the chosen image its ``worms`` and ``seeds`` layers, and show its maps.

        Its maps are shown again if it was run before; otherwise the map layers are added
        hidden and empty if the viewer has none yet. Creating napari layers takes 0.1-0.2 s
        each; done when the image is chosen, it is not done while the model runs (the
        viewer would freeze when its results arrive).
        """
        layer = self.image_layer()
        if layer is not None and layer.name == self._auto_image and stain_channel(layer):
            return  # a fluorescence channel open alone: no worms layer for it unless asked
        if layer is not None and self.stack_axes(layer):  # its planes get their own layers
            self._say(
                f"{layer.name!r} is a stack: Run model segments the plane shown, as an image "
                "layer of its own."
            )
            return
        session = self.session()
        if session is None:
            return
        try:
            session.ensure_edit_layers()
        except ValueError as err:  # e.g. a 3D layer: say so now, not at Run
            self._say(str(err))
            return
        busy = self._showing is not None and not self._showing[2]
        if session.prediction is not None and not session.maps_shown and not busy:
            session.tau = self.tau
            self._start_showing(session.iter_show_maps(), lambda: self._maps_reshown(session))
        elif self._showing is None:  # hidden, empty map layers now: a run only fills them
            self._start_showing(session.iter_add_empty_maps(), lambda: None, interruptible=True)
        self._update_review_label()

    def _maps_reshown(self, session: Session) -> None:
        if self.worker is None:
            self._stop_bar()
        self._say(f"Showing the maps of {session.image_layer.name!r}.")

    def model_channels(self) -> int:
        """Input channels of the chosen model (1 when its metadata cannot be read)."""
        from ..core.weights import read_metadata, shipped_weights_path

        path = self.model_choice() or shipped_weights_path()
        try:
            return int(read_metadata(path)["architecture"]["in_channels"])
        except (OSError, ValueError, KeyError, TypeError):
            return 1

    def stack_axes(self, layer: Any) -> int:
        """How many leading axes of an Image layer are planes (wells, z, time), not channels.

        0 for a 2D image, an RGB one, or (C, H, W) with the model's C channels.
        """
        data = layer.data
        if getattr(layer, "rgb", False) or data.ndim < 3:
            return 0
        channels = self.model_channels()
        lead = data.ndim - 2
        if channels > 1 and data.shape[-3] == channels:
            lead -= 1
        elif channels == 1 and data.ndim == 3 and data.shape[0] == 1:
            lead = 0
        return lead

    def plane_layer(self, layer: Any) -> Any | None:
        """For a stack (planes, time points, wells), the 2D layer of the plane shown.

        An Image layer with more leading axes than the model's channels (e.g. the
        ``images`` stack that **Open Folder** makes of a BBBC010 folder) is segmented one
        plane at a time: the plane the viewer shows becomes an Image layer of its own
        (named after the well when the reader recorded the names), with the matching plane
        of a Labels stack of the same shape as its ``worms`` layer, so the session adopts
        those worms. Added once; the same plane later returns the same layer.

        Returns
        -------
        napari.layers.Image or None
            None when ``layer`` is not a stack (2D, RGB, or (C, H, W) channels).
        """
        lead = self.stack_axes(layer)
        if lead == 0:
            return None
        data = layer.data
        point = layer.world_to_data(self.viewer.dims.point[-data.ndim :])
        index = tuple(
            int(np.clip(round(float(c)), 0, n - 1))
            for c, n in zip(point[:lead], data.shape[:lead], strict=True)
        )
        names = (layer.metadata.get(META) or {}).get("names")
        if lead == 1 and names and len(names) == data.shape[0] and names[index[0]]:
            name = str(names[index[0]])
        else:
            name = f"{layer.name} {list(index)}"
        plane_meta = {"stack": layer.name, "plane": list(index)}
        for existing in self.viewer.layers:  # made before (perhaps renamed since)
            meta = existing.metadata.get(META) or {}
            if isinstance(existing, Image) and {k: meta.get(k) for k in plane_meta} == plane_meta:
                return existing
        if name in self.viewer.layers:  # the name is taken by another layer
            name = f"{layer.name} {list(index)}"
        plane_labels, labels_meta = None, {}
        for other in self.viewer.layers:
            if (
                isinstance(other, Labels)
                and other.data.shape == data.shape[:lead] + data.shape[-2:]
                and f"{name} worms" not in self.viewer.layers
            ):
                stack_meta = other.metadata.get(META) or {}
                same_names = stack_meta.get("names") == names
                if other.name == f"{layer.name} worms" or (names and same_names):
                    plane_labels = np.asarray(other.data[index])
                    # the reader's full masks, reviews and provenance of this plane (the
                    # session uses them while they agree with the plane's labels)
                    planes = stack_meta.get("planes")
                    if lead == 1 and planes and len(planes) == data.shape[0]:
                        labels_meta = {META: planes[index[0]]}
                    break
        # the stack's file dtype (BBBC010's uint16, read as float32): what an export writes
        recorded = (layer.metadata.get(META) or {}).get("dtype")
        dtype = {"dtype": recorded} if recorded else {}
        plane = self.viewer.add_image(
            np.asarray(data[index]),
            name=name,
            contrast_limits=layer.contrast_limits,
            colormap=layer.colormap.name,
            metadata={META: {**plane_meta, **dtype}},
        )
        if plane_labels is not None:
            self.viewer.add_labels(plane_labels, name=f"{name} worms", metadata=labels_meta)
        return plane

    def model_choice(self) -> str | None:
        """``None`` for the shipped model, else the weights path (version, typed or browsed)."""
        if self.model_combo.currentText() == MODEL_SHIPPED:
            return None
        version = self.model_combo.currentData()
        if version:
            return str(version)
        path = self.model_path.text().strip()
        return path or None

    def scale(self) -> float | str:
        """The resizing factor for the model: the scale field, or ``"auto"`` at its 0."""
        value = round(self.scale_spin.value(), 2)
        return "auto" if value == 0.0 else value

    def export_scale(self, layer: Any) -> float | None:
        """The scale an export recorded for an image's worms, when it is not 1.

        The worms of a training folder opened with the plugin's reader (File > Open) were
        made on a prediction at that scale (``"scale"`` in the export's metadata).

        Parameters
        ----------
        layer : napari.layers.Image
            An image layer.

        Returns
        -------
        float or None
            None when its worms come from no export, or from one made at scale 1.
        """
        worms = self._worms_layer_for(layer)
        if worms is None:
            return None
        scale = recorded_scale(worms.metadata.get(META))
        return scale if scale is not None and scale != 1.0 else None

    def _on_scale_set(self, value: float) -> None:
        """The user set the scale field: their choice for the chosen image, and the default."""
        if self._setting_scale:
            return
        value = round(float(value), 2)
        self._user_scale = value
        image = self.image_layer()
        if image is not None:
            self._scale_choice[image.name] = value
        self._scale_from_export = None

    def _refresh_scale(self, say: bool = False) -> None:
        """Give the scale field the chosen image's scale.

        The scale the user set for this image (or for the stack it is a plane of); else
        the scale its export recorded (a reopened training folder made at another scale:
        Run model then makes the maps its worms were made on), said in the status line
        when the field takes it (or, with ``say``, whenever the image is chosen); else the
        scale the user last set.
        """
        image = self.image_layer()
        if image is None:
            return
        choice = self._scale_choice.get(image.name)
        stack = (image.metadata.get(META) or {}).get("stack")
        if choice is None and stack is not None:
            choice = self._scale_choice.get(str(stack))
        recorded = self.export_scale(image)
        value = choice if choice is not None else recorded or self._user_scale
        changed = round(self.scale_spin.value(), 2) != value
        if changed:
            self._setting_scale = True
            try:
                self.scale_spin.setValue(value)
            finally:
                self._setting_scale = False
        from_export = recorded is not None and choice is None
        self._scale_from_export = image.name if from_export else None
        if from_export and (changed or say):
            self._say(
                f"{image.name!r}: scale {recorded:g} from the export (its worms were made at "
                "it: Run model makes their maps again). Set another scale to run at that one."
            )
        elif recorded is not None and say and choice != recorded:
            shown = "auto" if choice == 0.0 else f"{choice:g}"
            self._say(
                f"{image.name!r}: scale {shown} as you set it (its export was made at "
                f"{recorded:g})."
            )

    def _on_model_choice(self, index: int) -> None:
        custom = self.model_combo.currentText() == MODEL_FILE
        self.model_path.setEnabled(custom)
        self.browse_btn.setEnabled(custom)
        session = self.session(create=False)
        note = self._model_mismatch()
        if note:
            self._say(note)
        elif session is not None and session.prediction is not None and not custom:
            self._say(f"{session.image_layer.name!r} shows model {session.model_name}, as chosen.")

    def _model_mismatch(self) -> str:
        """A hint when the chosen model is not the one whose maps the chosen image shows."""
        session = self.session(create=False)
        if session is None or session.prediction is None:
            return ""
        if self.model_combo.currentText() == MODEL_FILE and self.model_choice() is None:
            return ""
        chosen = _model_name(self.model_choice())
        if chosen == session.model_name:
            return ""
        busy = " once this run is done" if self.worker is not None else ""
        return (
            f"{session.image_layer.name!r} shows model {session.model_name}; {chosen} is "
            f"chosen: Run model{busy} to see it."
        )

    def add_model_version(self, path: str | Path, select: bool = True) -> None:
        """List a fine-tuned model version; with ``select``, use it (and re-run the image).

        Parameters
        ----------
        path : str or Path
            The version's ``model.safetensors``.
        select : bool
            Make it the current model; the open image is predicted again if it had been.
        """
        path = Path(path)
        text = f"version: {path.parent.name}"
        index = self.model_combo.findText(text)
        if index < 0:
            self.model_combo.addItem(text, str(path))
            index = self.model_combo.count() - 1
        if not select:
            return
        self.model_combo.setCurrentIndex(index)
        session = self.session(create=False)
        if session is not None and session.prediction is not None:
            self.run_model()

    def _on_version_trained(self, path: str) -> None:
        self.add_model_version(path, select=False)
        self._say(f"New model version {Path(path).parent.name}: choose it under model.")

    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Model weights", "", "Weights (*.safetensors *.pt);;All files (*)"
        )
        if path:
            self.model_path.setText(path)

    def _update_device_label(self, *args: Any) -> None:
        runs = compute.device_in_use(self.device_combo.currentText() or "auto")
        self.device_label.setText(f"runs on: {runs}")

    # ================================================================= model
    def run_model(self, blocking: bool = False) -> Any:
        """Predict on the chosen image (in a worker thread unless ``blocking``).

        Results are cached per image content and model, in memory and on disk (see
        :func:`~napari_instseg._napari.compute.cache_dir`): running again, switching back to
        an image or re-opening it after a restart shows the layers without recomputing.

        In the background the worker also prepares every layer's data (PCA colours, score
        maps, the grow cache); the main thread then adds or updates one layer per turn of
        the event loop, so the viewer never freezes. :attr:`prediction_shown` is emitted
        when all layers are shown.

        Parameters
        ----------
        blocking : bool
            Run in the calling thread and return the prediction (scripts, tests, demo),
            with everything the worker prepares (:func:`prepare_layers`) done before it
            returns.

        Returns
        -------
        Prediction or worker or None
            The prediction when blocking or already shown, else the running worker.
        """
        session = self.session()
        if session is None:
            self._say("Add or open an image first.")
            return None
        plane = self.plane_layer(session.image_layer)
        if plane is not None:  # a stack: its current plane, as a layer of its own
            self.image_combo.setCurrentText(plane.name)
            session = self.session()
            self._update_review_label()  # its worms (e.g. a reopened export's) are counted
            self._say(f"{session.image_layer.name}: the plane shown of a stack, as its own layer.")
        try:
            image = session.image
        except ValueError as err:
            self._say(str(err))
            return None
        model = self.model_choice()
        device = self.device_combo.currentText() or "auto"
        tta = 8 if self.tta_check.isChecked() else 1
        scale = self.scale()
        if self.model_combo.currentText() == MODEL_FILE and model is None:
            self._say("Choose a weights file (Browse...) or the shipped model.")
            return None
        name = _model_name(model)
        if blocking:  # the worker's work in this thread: the first click waits for nothing
            prediction = compute.cached_predict(image, model, device, tta=tta, scale=scale)
            layers = prepare_layers(prediction, self.tau)
            self._show_prediction(session, prediction, name, layers=layers)
            return prediction
        if compute.is_cached(image, model, tta, scale):
            prediction = compute.cached_predict(image, model, device, tta=tta, scale=scale)
            if session.prediction is prediction and session.labels_layer is not None:
                if session.maps_shown and all(
                    layer in self.viewer.layers for layer in session.map_layers.values()
                ):
                    self._say(f"Model {name}: already shown (cached).")
                    return prediction
                # a map layer was deleted (or another image's maps are shown): show again
                self._start_showing(session.iter_show_maps(), lambda: self._maps_reshown(session))
                return prediction
        if self.worker is not None:
            self._say("The model is already running; cancel it first.")
            return None

        self._cancel = False
        self._progress_state = None
        tau = self.tau

        def report(*args: Any, **kwargs: Any) -> None:
            # Cancel, or napari's window closing (it asks its workers to quit): stop at the
            # next tile instead of keeping the closed napari's process predicting
            if self._cancel or getattr(worker, "abort_requested", False):
                raise compute.Cancelled
            self._progress_state = (args, kwargs)  # the main thread's timer shows it

        def work() -> Any:
            try:
                prediction = compute.cached_predict(
                    image, model, device, progress=report, tta=tta, scale=scale
                )
            except compute.Cancelled:
                return None
            except ValueError as err:  # the input or a choice does not fit: say why
                return f"Prediction failed: {err}"
            if self._cancel:  # pressed during the last tile: keep the result cached, show none
                return None
            self._progress_state = ((), {"stage": "preparing layers"})
            return prediction, prepare_layers(prediction, tau)

        # an error is said once in the status line (not re-raised: see make_worker)
        worker = make_worker(work, lambda err: self._on_prediction_error(err, worker))
        # the worker is let go as soon as its result (or error) is handled: napari emits
        # ``finished`` after ``returned``, and a Run model in between must not be told
        # that the model is still running; a late signal of an old worker is ignored
        worker.returned.connect(lambda result: self._on_predicted(session, result, name, worker))
        worker.finished.connect(lambda: self._on_worker_finished(worker))
        self.worker = worker
        self.run_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self._start_bar("predicting")
        self._say(f"Predicting on {compute.device_in_use(device)}...")
        worker.start()
        return worker

    def cancel(self) -> None:
        """Ask the running prediction to stop (at its next progress report)."""
        self._cancel = True  # the worker's next progress report raises Cancelled
        self._say("Cancelling...")

    def _on_predicted(self, session: Session, result: Any, name: str, worker: Any = None) -> None:
        """The prediction worker returned: show its result, then let the worker go."""
        try:
            if result is None:
                self._say("Prediction cancelled.")
                return
            if isinstance(result, str):
                self._say(result)
                return
            prediction, layers = result
            if self._removed or session is not self.session(create=False):  # not shown now
                session.keep_prediction(prediction, name, layers)
                self._stop_bar()
                self._say(
                    f"Model {name} done for {session.image_layer.name!r}: choose it to see "
                    "its maps."
                )
                return
            self._show_prediction(session, prediction, name, layers, incremental=True)
        finally:
            self._on_worker_finished(worker)

    def _on_prediction_error(self, err: Exception, worker: Any = None) -> None:
        """The prediction worker raised: say so once, make Run model usable again."""
        try:
            if isinstance(err, FileNotFoundError):
                todo = "Choose another weights file (Browse...) or the shipped model."
            elif isinstance(err, (MemoryError, RuntimeError)):
                todo = "Try TTA off, a smaller scale or device cpu, then Run model again."
            else:
                todo = "Check the image and the model choice, then Run model again."
            self._say(failure_message("Prediction", err, todo))
        finally:
            self._on_worker_finished(worker)

    # ------------------------------------------------------------- progress
    def _start_bar(self, what: str) -> None:
        """Show the progress bar.

        It is always determinate: Qt's busy animation repaints the whole window many
        times a second, which costs half a core with software OpenGL.
        """
        self._bar_what = what
        self._bar_start = time.monotonic()
        self._bar_shown = None
        self._tick_bar()
        self.progress_bar.setVisible(True)
        self._bar_timer.start()

    def _tick_bar(self) -> None:
        args, kwargs = self._progress_state or ((), {})
        elapsed = time.monotonic() - self._bar_start
        state = bar_state(self._bar_what, elapsed, *args, **kwargs)
        if state != self._bar_shown:  # repaint only what changed
            self._bar_shown = state
            maximum, value, text = state
            self.progress_bar.setRange(0, maximum)
            self.progress_bar.setValue(value)
            self.progress_bar.setFormat(text)

    def _stop_bar(self) -> None:
        self._bar_timer.stop()
        self.progress_bar.setVisible(False)

    def _on_worker_finished(self, worker: Any = None) -> None:
        """Let the prediction worker go (its result handled, or it ended without one).

        Called when its result or error has been handled, and again by its ``finished``
        signal (for a worker that ended without either, e.g. napari's window closing):
        only while ``worker`` is still :attr:`worker`, so a late signal of an earlier run
        never lets a newer run's worker go. ``None`` lets any worker go.
        """
        if worker is not None and worker is not self.worker:
            return  # an earlier run's late signal, or handled already
        self._tick_bar()
        # the bar stays for a prediction's layers still being shown, not for the empty
        # map layers of a chosen image (a run that failed or was cancelled shows none)
        if self._showing is None or self._showing[2]:
            self._stop_bar()
        self.worker = None
        self.run_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)

    # ---------------------------------------------------------- showing maps
    def _show_prediction(
        self,
        session: Session,
        prediction: Any,
        name: str,
        layers: list | None = None,
        incremental: bool = False,
    ) -> None:
        """Show a prediction's layers: at once, or one layer per event-loop turn."""
        session.tau = self.tau
        steps = session.iter_set_prediction(prediction, model_name=name, layers=layers)
        if not incremental:
            for _ in steps:
                pass
            self._prediction_done(session, prediction, name)
            return
        self._progress_state = ((), {"stage": "showing layers"})
        if not self.progress_bar.isHidden():
            self._tick_bar()
        self._start_showing(steps, lambda: self._prediction_done(session, prediction, name))

    def _start_showing(
        self, steps: Iterator[str], done: Callable[[], None], interruptible: bool = False
    ) -> None:
        """Run ``steps`` one per event-loop turn (replacing any unfinished), then ``done()``.

        ``interruptible`` steps (the empty map layers of a chosen image) give way to
        showing an image's maps again.
        """
        self._showing = (steps, done, interruptible)
        self._show_timer.start()

    def _show_step(self) -> None:
        if self._showing is None:
            return
        steps, done, _ = self._showing
        try:
            next(steps)
        except StopIteration:
            self._showing = None
            done()
            return
        except Exception as err:  # noqa: BLE001 - e.g. a layer deleted meanwhile: say so
            self._showing = None
            self._stop_bar()
            self._say(f"Showing the layers failed: {err}")
            return
        self._show_timer.start()

    def _prediction_done(self, session: Session, prediction: Any, name: str) -> None:
        if self.worker is None:
            self._stop_bar()
        self._refresh_images()
        self._sync_param_fields()
        dev = prediction.metadata.get("device", "")
        cached = " (from the cache)" if prediction.metadata.get("cached") else ""
        scale = float(prediction.metadata.get("scale") or 1.0)
        estimated = " estimated" if prediction.metadata.get("scale_estimated") else ""
        scaled = f" at scale {scale:g}{estimated}" if scale != 1.0 or estimated else ""
        if scaled and self._scale_from_export == session.image_layer.name:
            scaled += " (from the export)"
        mismatch = self._model_mismatch()  # another model was chosen while this one ran
        self._say(
            f"Model {name} done{' on ' + str(dev) if dev else ''}{scaled}{cached}. "
            + (mismatch or "Click a worm to grow it, or 'Segment all'.")
        )
        self.prediction_shown.emit(session)

    # ========================================================== segmentation
    def segment_params(self) -> dict[str, Any]:
        """Parameters of the chosen method from the widget's fields."""
        method = self.method_combo.currentText()
        untangle = {} if self.untangle.isChecked() else {"untangle_factor": 0.0}
        # the model's tuned outline thresholds, or none (the checkbox)
        edges = {} if self.refine_edges.isChecked() else {"edge_thresholds": None}
        if not self.drop_debris.isChecked():
            edges["blob_filter"] = None
        if method == "auto":
            # the parameters tuned for the model (shown in the fields)
            if self._resolved_method() in ("boundary", "hybrid"):
                return {**untangle, **edges}
            return edges
        params: dict[str, Any] = {"min_size": int(self.min_size.value()), **edges}
        if method in ("seeds", "hybrid"):
            params["min_score"] = float(self.min_score.value())
            params["min_seediness"] = float(self.min_seediness.value())
        if method in ("boundary", "hybrid"):
            params.update(untangle)
        return params

    def _resolved_method(self) -> str:
        """The method *auto* stands for with the current image's model."""
        session = self.session(create=False)
        meta = session.prediction.metadata if session and session.prediction else {}
        return str(meta.get("recommended_method") or "hybrid")

    def segment(self, blocking: bool = False) -> Any:
        """Segment the chosen image automatically into the ``worms`` layer.

        Parameters
        ----------
        blocking : bool
            Run in the calling thread.

        Returns
        -------
        int or worker or None
            Number of instances when blocking, else the worker.
        """
        session = self.session()
        if session is not None and session.prediction is None and self.worker is not None:
            self._say("The model is still running: Segment all once it is done.")
            return None
        if session is None or session.prediction is None:
            self._say("Run the model first.")
            return None
        method = self.method_combo.currentText()
        params = self.segment_params()
        keep = self.keep_edited.isChecked()
        # provenance: the method auto stands for and every parameter used, not only these
        info = segmentation_record(session.prediction, method, params)
        # each worm a crop; the model's own parameters: the segments clicks start from
        from ..core.pick import segment_all as segment

        if blocking:
            n = session.apply_segmentation(
                segment(session.prediction, method=method, **params), keep, info
            )
            self._after_segment(n)
            return n

        def work() -> Any:
            return segment(session.prediction, method=method, **params)

        def errored(err: Exception) -> None:
            try:
                self._say(
                    failure_message(
                        "Segmentation",
                        err,
                        "Try another method or other parameters, then Segment all again.",
                    )
                )
            finally:
                self._segment_finished(worker)

        self._progress_state = None
        self._start_bar(f"{method} segmentation")
        worker = make_worker(work, errored)  # an error is said once, not re-raised

        def returned(found: Any) -> None:
            try:
                self._after_segment(session.apply_segmentation(found, keep, info))
            finally:
                self._segment_finished(worker)

        # as for Run model: the button comes back once the result is in, not at napari's
        # later ``finished`` (a click in between was lost); a late signal of an earlier
        # segmentation leaves a newer one's button and bar alone
        worker.returned.connect(returned)
        worker.finished.connect(lambda: self._segment_finished(worker))
        self.segment_worker = worker
        self.segment_btn.setEnabled(False)
        self._say(f"Segmenting ({method})...")
        worker.start()
        return worker

    def _segment_finished(self, worker: Any) -> None:
        """Let the Segment all worker go (once; ignored for an earlier worker)."""
        if worker is not self.segment_worker:
            return
        self.segment_worker = None
        if self.worker is None:  # (the bar is not a running prediction's)
            self._stop_bar()
        self.segment_btn.setEnabled(True)

    def _sync_param_fields(self) -> None:
        """Show the parameters the chosen method will use (tuned for the model if any)."""
        method = self.method_combo.currentText()
        session = self.session(create=False)
        meta = session.prediction.metadata if session and session.prediction else {}
        resolved = self._resolved_method() if method == "auto" else method
        values = {
            **_segment_defaults(resolved),
            **(meta.get("segment_params") or {}).get(resolved, {}),
        }
        for key, box in (
            ("min_score", self.min_score),
            ("min_seediness", self.min_seediness),
            ("min_size", self.min_size),
        ):
            if key in values and values[key] is not None:
                box.setValue(type(box.value())(values[key]))
            box.setEnabled(method != "auto" and key in values)
        self.untangle.setEnabled(resolved in ("boundary", "hybrid"))
        tuned = (meta.get("segment_params") or {}).get(resolved, {}).get("edge_thresholds")
        self.refine_edges.setEnabled(tuned is not None)
        self.click_segments.setEnabled(bool(meta.get("segment_params")))
        blobs = (meta.get("segment_params") or {}).get(resolved, {}).get("blob_filter")
        self.drop_debris.setEnabled(blobs is not None)
        self.method_combo.setToolTip(f"{method} -> {resolved}" if method == "auto" else method)

    def _set_on_sessions(self, switch: str, checked: bool) -> None:
        """Pass a click option's switch (``refine_edges``, ``click_segments``) to every session."""
        for session in self.sessions.values():
            setattr(session, switch, bool(checked))

    def _after_segment(self, n: int) -> None:
        self._update_review_label()
        session = self.session(create=False)
        meta = session.prediction.metadata if session and session.prediction else {}
        if meta.get("segment_params"):
            self._say(f"{n} instances. Review them: '{KEYS_NEXT}' jumps to the least certain.")
            return
        # a model from `napari-instseg train` has no parameters of its own: say how to fix it
        self._say(
            f"{n} instances, with default parameters: this model has none tuned for it, and "
            "they may not fit it. Tune it once: napari-instseg evaluate --model WEIGHTS "
            "--gt LABELLED_FOLDER --tune --write (docs/retraining.md)."
        )

    # ================================================================ editing
    @property
    def tau(self) -> float:
        """The threshold of the tau slider."""
        return self.tau_slider.value() / 100.0

    def set_tool(self, tool: str) -> None:
        """Choose the click tool (a key of :data:`TOOLS`)."""
        if tool not in TOOLS:
            raise ValueError(f"unknown tool {tool!r}; choose one of {', '.join(TOOLS)}")
        self.tool = tool
        self._pending = None
        self.tool_buttons[tool].setChecked(True)
        self._say(f"Tool: {TOOLS[tool][1]} - {TOOLS[tool][2]}")

    def click(self, point: Point, shift: bool = False) -> Any:
        """Apply the current tool at an image pixel, as a mouse click does.

        Parameters
        ----------
        point : (int, int)
            (row, col) in the image.
        shift : bool
            Shift held: add a positive seed to the selected instance.

        Returns
        -------
        object
            What the session returned (a label, labels, or None).
        """
        session = self.session()
        if session is None or session.prediction is None:
            self._say("Run the model first, then click a worm.")
            return None
        session.tau = self.tau
        tool = "add" if shift else self.tool
        result: Any = None
        if tool == "new":
            result = self._grow_new(session, point)
        elif tool == "add":
            result = session.add_seed(point)
            if result is not None:
                self._say(f"Instance {result}: seed added.")
            else:
                result = self._grow_new(session, point)
        elif tool == "negative":
            result = session.add_negative(point)
            self._say(
                f"Instance {result}: negative seed added." if result else "Select an instance."
            )
        elif tool == "remove":
            result = session.remove(point=point)
            self._say(f"Removed instance {result}." if result else "No instance there.")
        elif tool == "select":
            label = session.label_at(point)
            session.select(label or None)
            result = session.selected
            self._say(f"Selected instance {result}." if result else "No instance there.")
        elif tool in ("merge", "split"):
            result = self._two_clicks(session, tool, point)
        self._update_review_label()
        layers = self.viewer.layers
        if session.labels_layer in layers and layers.selection.active is not session.labels_layer:
            layers.selection.active = session.labels_layer  # so Ctrl+Z undoes this edit
        return result

    def _grow_new(self, session: Session, point: Point) -> int | None:
        before = {worm.label for worm in session.worms}
        result = session.grow_new(point)
        if result in before:
            self._say(
                f"Instance {result} is already this worm: selected it (+ seed / - seed "
                "correct it)."
            )
        elif result:
            self._say(f"New instance {result}.")
        elif session.on_background(point):
            self._say(
                "No worm here: the model sees background at this pixel. Paint a worm it "
                "missed with the Labels layer's brush."
            )
        else:
            self._say("Nothing grew there.")
        return result

    def _two_clicks(self, session: Session, tool: str, point: Point) -> Any:
        label = session.label_at(point)
        if self._pending is None or self._pending[0] != tool:
            if label == 0:
                self._say(f"{TOOLS[tool][1]}: click inside an instance.")
                return None
            self._pending = (tool, point, label)
            session.select(label)
            self._say(f"{TOOLS[tool][1]}: now click the second point.")
            return None
        _, first, first_label = self._pending
        self._pending = None
        if tool == "merge":
            result = session.merge(first_label, label)
            self._say(f"Merged into {result}." if result else "Click two different instances.")
            return result
        result = session.split(first, point)
        self._say(
            f"Split into {result[0]} and {result[1]}." if result else
            "Split: click two points inside the same instance."
        )  # fmt: skip
        return result

    def _on_mouse_drag(self, viewer: Any, event: Any) -> Any:
        if event.button != 1:
            return
        layer = viewer.layers.selection.active
        if layer is not None and getattr(layer, "mode", "pan_zoom") != "pan_zoom":
            return  # painting / adding points: napari's own tools
        session = self.session(create=False)
        if session is None:
            return
        start_pos = np.asarray(event.pos, float)
        position = event.position
        shift = "Shift" in {str(getattr(m, "name", m)) for m in event.modifiers}
        yield
        while event.type == "mouse_move":
            if np.abs(np.asarray(event.pos, float) - start_pos).max() > 3:
                return  # a drag pans the view
            yield
        point = session.world_to_point(position)
        if point is not None:
            self.click(point, shift=shift)

    def undo(self) -> None:
        """Undo the last edit of the worms layer (napari Labels history)."""
        session = self.session(create=False)
        if session is not None and session.labels_layer is not None:
            before, synced = session.worms, session.set_data_syncs
            session.labels_layer.undo()
            if session.set_data_syncs == synced:  # napari sent no data event (hidden layer)
                session.sync()
            changed = session.worms is not before
            self._update_review_label()
            note = session.review_note if changed else ""
            self._say(
                (note or "Undone the last edit.") if changed else "Nothing to undo."
            )  # fmt: skip

    def redo(self) -> None:
        """Redo the last undone edit of the worms layer."""
        session = self.session(create=False)
        if session is not None and session.labels_layer is not None:
            before, synced = session.worms, session.set_data_syncs
            session.labels_layer.redo()
            if session.set_data_syncs == synced:  # napari sent no data event (hidden layer)
                session.sync()
            changed = session.worms is not before
            self._update_review_label()
            note = session.review_note if changed else ""
            self._say(
                (note or "Redone.") if changed else "Nothing to redo."
            )  # fmt: skip

    # ------------------------------------------------------------- tau slider
    def _tau_pressed(self) -> None:
        session = self.session(create=False)
        if session is not None and session.worm(session.selected) is not None:
            session.begin_preview()

    def _tau_released(self) -> None:
        session = self.session(create=False)
        if session is not None:
            session.end_preview()

    def _tau_changed(self, value: int) -> None:
        tau = value / 100.0
        self.tau_label.setText(f"{tau:.2f}")
        session = self.session(create=False)
        if session is None:
            return
        session.tau = tau
        session.set_tau_display(tau)
        if session.prediction is not None and session.selected is not None:
            changed = session.regrow_selected(tau, preview=self.tau_slider.isSliderDown())
            if not changed and session.click_segments and session.worm(session.selected):
                self._say(
                    f"tau leaves instance {session.selected} as it is: it is an automatic "
                    "segment (correct it with + / - seeds), not grown from the embeddings."
                )

    def set_tau(self, tau: float, live: bool = False) -> None:
        """Move the tau slider (re-grows the selected instance).

        Parameters
        ----------
        tau : float
            New threshold, 0.05..0.95.
        live : bool
            Treat as a drag step (grouped into one undo step until :meth:`end_tau_drag`).
        """
        session = self.session(create=False)
        if live and session is not None:
            session.begin_preview()
            self.tau_slider.setSliderDown(True)
        self.tau_slider.setValue(int(round(tau * 100)))

    def end_tau_drag(self) -> None:
        """Finish a live tau change started with ``set_tau(..., live=True)``."""
        self.tau_slider.setSliderDown(False)
        self._tau_released()

    # ------------------------------------------------------------- similarity
    def _on_hover_toggled(self, on: bool) -> None:
        session = self.session(create=False)
        if session is None:
            return
        if on and session.prediction is not None:
            session.ensure_similarity_layer()
            if session.labels_layer is not None:  # inserting made the new layer active
                self.viewer.layers.selection.active = session.labels_layer
        if session.similarity_layer is not None:
            session.similarity_layer.visible = on

    def _on_mouse_move(self, viewer: Any, event: Any) -> None:
        if not self.hover_check.isChecked():
            return
        session = self.session(create=False)
        if session is None or session.prediction is None:
            return
        self._hover = session.world_to_point(event.position)
        if not self._hover_timer.isActive():
            self._hover_timer.start()

    def _on_view_moved(self, event: Any = None) -> None:
        """A zoom or pan: the live similarity follows the view (debounced, 80 ms)."""
        if self.hover_check.isChecked() and self._hover is not None:
            self._view_timer.start()  # (re)started: computed once the view rests

    def _update_hover(self) -> None:
        session = self.session(create=False)
        if session is not None and self._hover is not None:
            session.similarity_to(self._hover)

    # ================================================================ review
    def mark_reviewed(self, label: int | None = None, reviewed: bool | None = None) -> int | None:
        """Mark an instance (default: the selected one) reviewed, or toggle its flag.

        Parameters
        ----------
        label : int, optional
            The instance; the selected one by default.
        reviewed : bool, optional
            The new flag; None (the K key, the button) toggles it, so pressing K again
            takes a review back. A change of the flag is a step of the worms layer's undo
            history: Ctrl+Z (or :meth:`undo`) right after takes it back, redo makes it again.

        Returns
        -------
        int or None
            The label, or None when there is no such instance.
        """
        session = self.session(create=False)
        if session is None:
            return None
        session.sync()
        worm = session.worm(session.selected if label is None else label)
        if worm is None:
            self._say("Select an instance first.")
            return None
        flag = (not worm.reviewed) if reviewed is None else bool(reviewed)
        result = session.mark_reviewed(worm.label, reviewed=flag)
        self._update_review_label()
        self._say(
            f"Instance {result} reviewed." if flag else
            f"Instance {result}: review taken back (K marks it again)."
        )  # fmt: skip
        return result

    def next_to_review(self) -> int | None:
        """Select and centre on the least certain unreviewed instance."""
        session = self.session(create=False)
        if session is None:
            return None
        label = session.next_to_review()
        worm = session.worm(label)
        self._say(
            f"Instance {label} (score {worm.score:.2f}): fix it, then K." if worm else
            "Every instance is reviewed." if session.worms else
            "No instances to review yet: Segment all or click worms."
        )  # fmt: skip
        return label

    def _on_worms_edited(self) -> None:
        """The worms layer changed outside the widget's tools (napari's undo, the brush)."""
        self._update_review_label()
        session = self.session(create=False)
        if session is None:
            return
        if session.review_note:  # napari's undo / redo of a review (K)
            self._say(session.review_note)
            return
        self._say(f"Worms layer edited (undo, redo or brush): {len(session.worms)} worms.")

    def _update_review_label(self) -> None:
        session = self.session(create=False)
        worms = session.worms if session is not None else ()
        done = sum(w.reviewed for w in worms)
        self.review_label.setText(f"{done} / {len(worms)} reviewed")

    # ============================================================ measurement
    def measure(self) -> Any:
        """Measure every instance; fill the table and the worms layer's ``features``."""
        session = self.session(create=False)
        if session is None or not session.worms:
            self._say("Nothing to measure yet.")
            return None
        layer = self.measure_channel()
        channels, stain = None, None
        if layer is not None:
            stain = stain_channel(layer)
            key = stain or re.sub(r"\W+", "_", layer.name).strip("_") or "channel"
            channels = {key: np.asarray(layer.data, np.float32)}
        try:
            table = session.measure(channels=channels, dead_channel=stain)
        except ValueError as err:  # e.g. a channel of another size
            self._say(f"Measuring failed: {err}")
            return None
        self.table_data = table
        self.table.clear()
        self.table.setRowCount(len(table))
        self.table.setColumnCount(len(table.columns))
        self.table.setHorizontalHeaderLabels([str(c) for c in table.columns])
        for i, row in enumerate(table.itertuples(index=False)):
            for j, value in enumerate(row):
                text = f"{value:.4g}" if isinstance(value, float | np.floating) else str(value)
                self.table.setItem(i, j, QTableWidgetItem(text))
        text = f"Measured {len(table)} instances"
        if layer is not None:
            text += f" (and {layer.name!r}"
            if "dead" in table:
                text += f": {int(table['dead'].sum())} dead"
            text += ")"
        self._say(text + ".")
        return table

    def _csv_path(self, path: str | Path | None, title: str) -> Path | None:
        """``path`` as a Path, or a CSV file name asked in a dialog (None when cancelled)."""
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, title, "", "CSV (*.csv)")
            if not path:
                return None
        return Path(path)

    def save_csv(self, path: str | Path | None = None) -> Path | None:
        """Save the measurement table as CSV (asks for a file name when ``path`` is None)."""
        if self.table_data is None and self.measure() is None:
            return None
        path = self._csv_path(path, "Save measurements")
        if path is None:
            return None
        self.table_data.to_csv(path, index=False)
        self._say(f"Saved {path}")
        return path

    def save_seeds(self, path: str | Path | None = None) -> Path | None:
        """Save the clicks of the clicked worms as CSV (``worm,row,col,positive,tau``).

        ``napari-instseg grow IMAGE --seeds FILE`` grows the same worms from it. Asks for a
        file name when ``path`` is None; None when there is nothing to save.
        """
        session = self.session(create=False)
        table = None if session is None else session.seed_table()
        if table is None or table.empty:
            self._say("No worms grown from clicks: no seeds to save.")
            return None
        path = self._csv_path(path, "Save seeds")
        if path is None:
            return None
        table.to_csv(path, index=False)
        self._say(f"Saved {table['worm'].nunique()} worms' seeds to {path}")
        return path

    # ================================================================= export
    def export(self, path: str | Path | None = None, overwrite: bool | None = None) -> Any:
        """Export image + instances into a training folder.

        A new or empty folder becomes a training folder; a training folder gets this image
        added (its other images stay), so corrected images can be gathered in one folder.

        Parameters
        ----------
        path : str or Path, optional
            Folder; asks when None.
        overwrite : bool, optional
            Replace an image of the same name already in the folder (or write into a
            non-empty folder that is not a training folder). When None and that is the
            case, the user is asked (and, without a dialog, a FileExistsError is raised).

        Returns
        -------
        Path or None
            The folder written, or None when nothing was written (the reason is shown).
        """
        session = self.session(create=False)
        if session is None or not session.worms:
            self._say("Nothing to export yet.")
            return None
        interactive = path is None
        if path is None:
            path = QFileDialog.getExistingDirectory(
                self, "Export training folder (a new or empty folder, or a training folder)"
            )
            if not path:
                return None
        path = Path(path)
        name = str(session.image_layer.name)
        try:
            conflict = export_conflict(path, name)
        except ValueError as err:  # e.g. a broken manifest.json
            self._say(f"Export failed: {err}")
            return None
        if conflict and overwrite is None:
            if not interactive:
                raise FileExistsError(f"{conflict}; pass overwrite=True to replace it")
            if "holds an image" in conflict:
                question = f"{conflict}. Replace that image (the folder's other images stay)?"
            else:
                question = f"{conflict}. Write the training folder into it anyway?"
            answer = QMessageBox.question(self, "Export training folder", question)
            overwrite = answer == QMessageBox.StandardButton.Yes
        if conflict and not overwrite:
            self._say(f"Export cancelled: {conflict}. Nothing was written.")
            return None
        try:
            session.export(path, overwrite=bool(overwrite))
        except (OSError, ValueError) as err:  # e.g. a layer name that is no file name
            self._say(f"Export failed: {err}")
            return None
        from ..core.training_folder import training_folder_names

        model_versions.exported.emit(str(path))  # the Fine-tune panel lists the folder
        n = len(training_folder_names(path))
        worms = len(session.worms)
        reviewed = sum(w.reviewed for w in session.worms)
        text = (
            f"Exported {worms} instances ({reviewed} reviewed) of {name!r} to {path} "
            f"({n} image{'s' if n != 1 else ''} in the folder)."
        )
        if reviewed < worms:  # fine-tuning leaves them out of the loss: say so now
            text += (
                f" Fine-tuning learns only from reviewed worms: the {worms - reviewed} "
                "unreviewed are left out (mark them with K and export again)."
            )
        note = session.scale_note()  # e.g. reopened at 0.5, maps shown at 1: which counts
        if note:
            text += " " + note
        self._say(text)
        return path


KEYS_NEXT = "."


def _model_name(model: str | None) -> str:
    """How the widget names a model: ``shipped``, a version's folder name, or a file name."""
    if model is None:
        return "shipped"
    if Path(model).name == "model.safetensors":
        return Path(model).parent.name  # a fine-tuned version
    return Path(model).name


def _key_action(action: Any, name: str) -> Any:
    """A viewer key callback calling ``action()``, with a ``__name__`` for napari."""

    def on_key(viewer: Any) -> None:
        action()

    on_key.__name__ = on_key.__qualname__ = f"instseg_{name}"
    return on_key


def _tool_key(widget: InstSegWidget, tool: str) -> Any:
    return _key_action(lambda: widget.set_tool(tool), f"tool_{tool}")


def _plane_shape(layer: Any) -> tuple[int, ...]:
    """(H, W) of an Image layer's planes (an RGB layer's without its colour axis)."""
    shape = tuple(layer.data.shape)
    return shape[-3:-1] if getattr(layer, "rgb", False) else shape[-2:]


def _own_layers(session: Session) -> list[Any]:
    return [
        *session.map_layers.values(),
        session.similarity_layer,
        session.labels_layer,
        session.seeds_layer,
    ]


def _option(text: str, tooltip: str = "") -> QCheckBox:
    """A segmentation option's checkbox, on by default."""
    box = QCheckBox(text)
    box.setChecked(True)
    if tooltip:
        box.setToolTip(tooltip)
    return box


def _segment_defaults(method: str = "hybrid") -> dict[str, Any]:
    """Default parameters of a segmentation method, so the widget follows the core."""
    import inspect

    from ..core import instances

    func = getattr(instances, f"segment_{method}", None)
    if func is None:
        return {}
    return {
        name: p.default
        for name, p in inspect.signature(func).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _available_devices() -> list[str]:
    try:
        from ..core.device import available_devices

        return available_devices()
    except Exception:  # noqa: BLE001 - torch missing or broken: still show the widget
        return ["auto", "cpu"]


def prepare_layers(prediction: Any, tau: float) -> list[tuple[str, Any, dict]]:
    """Everything slow about showing a prediction, done off the GUI thread.

    Computes the layer data (PCA colours of the embeddings, score maps; see
    :func:`~napari_instseg._napari.layers.prediction_layers`) and builds the grow cache of
    :mod:`napari_instseg.core.grow` and, for a model tuned for automatic segmentation, the
    automatic segments clicks start from (:mod:`napari_instseg.core.pick`), so the first
    click is as fast as the next ones.

    Parameters
    ----------
    prediction : Prediction
        The network outputs.
    tau : float
        Threshold whose mask scores are shown.

    Returns
    -------
    list of (key, data, kwargs)
        For :meth:`Session.iter_set_prediction`.
    """
    from ..core.grow import get_grower
    from ..core.scale import at_model_scale

    layers = prediction_layers(prediction, tau)
    grower = get_grower(prediction)
    grower.foreground_pixels(grower.default_fg_threshold)  # what a click compares
    if getattr(prediction, "model_grid", None) is not None:  # clicks grow on the network's grid
        get_grower(at_model_scale(prediction))
    from ..core.pick import segments_cropped, starts_from_segments

    if starts_from_segments(prediction):
        segments_cropped(prediction)  # where clicks start (Session.click_segments)
    return layers


def _one_numba_thread() -> None:
    """Run numba's parallel loops in the GUI thread on one thread.

    napari maps label values to colours with numba ``parallel=True`` loops. For the few
    thousand pixels of an edit, starting the thread team costs far more than the work
    (measured: ~8 ms CPU and ~35 ms wall per call on a loaded 2-core machine, 0.01 ms on one
    thread), and it happens on every click and slider step. ``numba.set_num_threads`` is
    per thread, so worker threads and other code keep numba's default.
    """
    import sys

    numba = sys.modules.get("numba")
    if numba is None:
        try:
            import numba
        except ImportError:  # napari then uses its numpy fallback
            return
    try:
        numba.set_num_threads(1)
    except (ValueError, RuntimeError):  # pragma: no cover - numba without threading
        pass


def _visible(widget: Any) -> bool:
    """``widget.isVisible()``, False once Qt has deleted it."""
    try:
        return bool(widget.isVisible())
    except RuntimeError:
        return False


class _PaintWatch(QObject):
    """Event filter calling ``on_paint()`` when a watched widget starts to paint."""

    def __init__(self, on_paint: Any) -> None:
        super().__init__()
        self._on_paint = on_paint

    def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 - Qt's name
        """Notice paint events; never consume one."""
        if event.type() == QEvent.Type.Paint:
            self._on_paint()
        return False


def bar_state(what: str, elapsed: float, *args: Any, **kwargs: Any) -> tuple[int, int, str]:
    """What the progress bar shows for a progress report of the core.

    Parameters
    ----------
    what : str
        The task, e.g. ``"predicting"``.
    elapsed : float
        Seconds since the task started (shown, in whole seconds, while no fraction is known).
    *args, **kwargs
        The report: ``(done, total)``, a fraction in [0, 1], keywords ``done``/``total``, or
        a ``stage`` keyword (what the task is doing now).

    Returns
    -------
    (int, int, str)
        Maximum, value and text of the bar.
    """
    stage = kwargs.get("stage")
    done = kwargs.get("done", args[0] if args else None)
    total = kwargs.get("total", args[1] if len(args) > 1 else None)
    if stage is None and done is not None:
        try:
            if total:
                return int(total), min(int(done), int(total)), f"{what}: %p%"
            return 100, int(round(100 * min(max(float(done), 0.0), 1.0))), f"{what}: %p%"
        except (TypeError, ValueError):
            pass
    text = f"{what}: {stage}" if stage else what
    return 100, 0, f"{text}... {int(elapsed)} s"
