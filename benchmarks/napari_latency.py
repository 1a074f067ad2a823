"""Viewer latency of the napari plugin, measured in a real napari window.

Opens ``napari.Viewer(show=True)`` with the plugin's sample worms (520 x 696), docks the
widget, runs the shipped model (blocking), then measures (medians over repeated trials):

1. **click to visible mask**: a left click is sent through the vispy canvas (mouse press +
   release events, as ``tests/test_napari_widget.py`` does); the widget's mouse callback
   grows a new instance and writes it to the worms Labels layer. Times: until the Labels
   data changed, until the canvas finished its next draw (``canvas.native.update()``, then
   ``QApplication.processEvents()`` until vispy's draw event has run), and until the
   framebuffer was read back (``QOpenGLWidget.grabFramebuffer()``, a pessimistic
   "visible" proxy: it renders once more and copies the pixels to the CPU).
2. **tau slider**: the grown instance is selected; the slider is moved through the widget
   (``InstSegWidget.set_tau(tau, live=True)``, which sets the QSlider value as a drag
   does) over a sweep of values, each step waiting for the canvas draw as above.
3. **UI blocking during Run model**: the prediction cache is cleared, the Run button is
   clicked from the Qt event loop (the model runs in napari's ``thread_worker``), and a
   10 ms ``QTimer`` (precise) records its ticks; the longest gap between ticks is the
   longest the event loop was blocked. Reported separately: while the network runs and for
   the whole run including showing the result layers (main thread).

Needs a display: run under ``xvfb-run -a`` when there is none::

    OMP_NUM_THREADS=1 xvfb-run -a .venv/bin/python benchmarks/napari_latency.py \
        --out docs/benchmarks.md

``--out`` replaces the section ``## Viewer latency (napari)`` of that Markdown file
(inserting it after the "Instance extraction" section when missing).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

SECTION = "## Viewer latency (napari)"
AFTER = "## Instance extraction"
COMMAND = (
    "OMP_NUM_THREADS=1 xvfb-run -a .venv/bin/python benchmarks/napari_latency.py "
    "--out docs/benchmarks.md"
)


def has_display() -> bool:
    """Whether Qt can open a window (X11/Wayland display or an offscreen platform)."""
    platform = os.environ.get("QT_QPA_PLATFORM", "")
    return bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or platform == "offscreen"
    )


def inner_pixel(masks: np.ndarray, i: int) -> tuple[int, int]:
    """Return the pixel deepest inside mask ``i`` away from the other masks.

    Parameters
    ----------
    masks : (N, H, W) bool array
        Instance masks.
    i : int
        Which mask.

    Returns
    -------
    (int, int)
        (row, col) of the maximum of the distance transform.
    """
    from scipy import ndimage

    mask = masks[i] & ~np.delete(masks, i, axis=0).any(axis=0)
    dt = ndimage.distance_transform_edt(mask)
    return tuple(int(v) for v in np.unravel_index(dt.argmax(), mask.shape))  # type: ignore[return-value]


class Redraw:
    """Wait for the napari canvas to finish a draw (vispy draw event, connected last).

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer whose canvas is watched.
    """

    def __init__(self, viewer: Any) -> None:
        self.canvas = viewer.window._qt_viewer.canvas
        self.scene_canvas = self.canvas._scene_canvas
        self.count = 0
        self.scene_canvas.events.draw.connect(self._on_draw, position="last")

    def _on_draw(self, event: Any) -> None:
        self.count += 1

    def wait(self, timeout: float = 5.0) -> None:
        """Request a repaint and process Qt events until one draw has completed.

        Parameters
        ----------
        timeout : float
            Seconds before giving up with a RuntimeError.
        """
        from qtpy.QtWidgets import QApplication

        start = self.count
        self.canvas.native.update()
        deadline = time.perf_counter() + timeout
        while self.count == start:
            QApplication.processEvents()
            if time.perf_counter() > deadline:
                raise RuntimeError("the canvas did not redraw")

    def read_back(self) -> np.ndarray:
        """Render and copy the canvas framebuffer to the CPU (QOpenGLWidget.grabFramebuffer).

        Returns
        -------
        ndarray
            The framebuffer's size (height, width), to keep the call from being skipped.
        """
        image = self.canvas.native.grabFramebuffer()
        return np.array([image.height(), image.width()])


def measure_floor(redraw: Redraw, repeats: int) -> tuple[list[float], list[float]]:
    """Time redraws of the canvas with nothing changed (wall and CPU milliseconds)."""
    wall, cpu = [], []
    for _ in range(repeats):
        settle(2)
        c0, t0 = time.process_time(), time.perf_counter()
        redraw.wait()
        wall.append(1000 * (time.perf_counter() - t0))
        cpu.append(1000 * (time.process_time() - c0))
    return wall, cpu


def run_events(seconds: float) -> None:
    """Run the Qt event loop for a while (let deferred draws and deletions happen)."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    QTimer.singleShot(int(1000 * seconds), loop.quit)
    loop.exec()


def settle(n: int = 5) -> None:
    """Process pending Qt events a few times (finish earlier redraws before a trial)."""
    from qtpy.QtWidgets import QApplication

    for _ in range(n):
        QApplication.processEvents()


def send_click(viewer: Any, row: int, col: int) -> None:
    """Send a left click at image pixel (row, col) through the vispy canvas."""
    canvas = viewer.window._qt_viewer.canvas
    x, y = canvas.view.scene.transform.map([col, row, 0, 1])[:2]
    scene_canvas = canvas._scene_canvas
    pos = (float(x), float(y))
    scene_canvas.events.mouse_press(pos=pos, modifiers=(), button=1)
    scene_canvas.events.mouse_release(pos=pos, modifiers=(), button=1)


def measure_clicks(
    viewer: Any, widget: Any, masks: np.ndarray, repeats: int, redraw: Redraw
) -> dict[str, list[float]]:
    """Click on worms (cycling through them), undoing each new instance after timing it.

    Parameters
    ----------
    viewer, widget : napari.Viewer, InstSegWidget
        The viewer and the docked widget (model already run).
    masks : (N, H, W) bool array
        Ground-truth masks, to click deep inside a worm.
    repeats : int
        Number of timed clicks.
    redraw : Redraw
        Draw watcher of the canvas.

    Returns
    -------
    dict
        Milliseconds per trial: ``data``, ``drawn``, ``read_back`` (wall clock) and the
        same with ``_cpu`` (CPU time of the whole process, all threads).
    """
    session = widget.session()
    labels = session.labels_layer
    widget.set_tool("new")
    points = [inner_pixel(masks, i) for i in range(len(masks))]
    out: dict[str, list[float]] = {k: [] for k in ("data", "drawn", "read_back")}
    out.update({k + "_cpu": [] for k in ("data", "drawn", "read_back")})
    for k in range(repeats + 1):  # the first click is a warm-up
        row, col = points[k % len(points)]
        before = int(labels.data[row, col])
        n_worms = len(session.worms)
        settle()
        c0, t0 = time.process_time(), time.perf_counter()
        send_click(viewer, row, col)
        c_data, t_data = time.process_time(), time.perf_counter()
        redraw.wait()
        c_drawn, t_drawn = time.process_time(), time.perf_counter()
        redraw.read_back()
        c_read, t_read = time.process_time(), time.perf_counter()
        if len(session.worms) != n_worms + 1 or int(labels.data[row, col]) == before:
            raise RuntimeError(f"the click at {(row, col)} did not grow a new instance")
        if k > 0:
            out["data"].append(1000 * (t_data - t0))
            out["drawn"].append(1000 * (t_drawn - t0))
            out["read_back"].append(1000 * (t_read - t0))
            out["data_cpu"].append(1000 * (c_data - c0))
            out["drawn_cpu"].append(1000 * (c_drawn - c0))
            out["read_back_cpu"].append(1000 * (c_read - c0))
        widget.undo()
        redraw.wait()
    return out


def measure_tau(
    viewer: Any, widget: Any, masks: np.ndarray, steps: int, redraw: Redraw
) -> tuple[list[float], list[float]]:
    """Grow one worm, then move the tau slider through the widget ``steps`` times.

    The worm is grown from the embeddings ("clicks start from the automatic segments" off
    for the measurement): that is the growth tau acts on.

    Parameters
    ----------
    viewer, widget : napari.Viewer, InstSegWidget
        The viewer and the docked widget (model already run).
    masks : (N, H, W) bool array
        Ground-truth masks, to click deep inside a worm.
    steps : int
        Number of timed slider updates (a sweep 0.30 -> 0.90 -> 0.30 ... in 0.02 steps).
    redraw : Redraw
        Draw watcher of the canvas.

    Returns
    -------
    wall, cpu : list of float
        Milliseconds per update (slider value set, instance re-grown, canvas drawn): wall
        clock and CPU time of the process.
    """
    session = widget.session()
    labels = session.labels_layer
    widget.set_tool("new")
    # tau re-grows worms grown from the embeddings; a click that takes an automatic
    # segment (the default for a tuned model since session 25) does not move with tau
    from_segments = widget.click_segments.isChecked()
    widget.click_segments.setChecked(False)
    row, col = inner_pixel(masks, 0)
    send_click(viewer, row, col)
    redraw.wait()
    label = session.selected
    if label is None:
        raise RuntimeError("the grown instance is not selected; the tau slider would do nothing")
    sweep = list(range(30, 91, 2)) + list(range(88, 31, -2))
    values = [sweep[i % len(sweep)] / 100 for i in range(steps + 1)]
    sizes = []
    times = []
    cpu = []
    for i, tau in enumerate(values):
        settle(2)
        c0, t0 = time.process_time(), time.perf_counter()
        widget.set_tau(tau, live=True)
        redraw.wait()
        dt = time.perf_counter() - t0
        dc = time.process_time() - c0
        sizes.append(int((labels.data == label).sum()))
        if i > 0:  # the first step starts the preview (warm-up)
            times.append(1000 * dt)
            cpu.append(1000 * dc)
    widget.end_tau_drag()
    if len(set(sizes)) < 2:
        raise RuntimeError("moving the tau slider never changed the instance")
    widget.undo()  # the whole drag
    widget.undo()  # the new instance
    redraw.wait()
    widget.click_segments.setChecked(from_segments)
    return times, cpu


def run_loop(
    widget: Any, seconds_after_done: float, start: Any | None, action: Any | None = None
) -> tuple[list[float], dict]:
    """Run the event loop with a precise 10 ms timer; ``start()`` (Run) or ``action()``.

    Returns the timer's ticks and the marks ``start``, ``returned`` (worker done) and
    ``shown`` (every layer shown), as ``time.perf_counter()`` values.
    """
    from qtpy.QtCore import QEventLoop, Qt, QTimer

    ticks: list[float] = []
    marks: dict[str, float] = {}
    loop = QEventLoop()
    timer = QTimer()
    timer.setTimerType(Qt.TimerType.PreciseTimer)
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    original = getattr(widget, "_on_predicted", None)  # no widget yet: just ``action``

    def on_predicted(*args: Any) -> None:
        marks["returned"] = time.perf_counter()
        original(*args)

    def shown(*args: Any) -> None:
        marks["shown"] = time.perf_counter()
        QTimer.singleShot(int(1000 * seconds_after_done), loop.quit)

    def begin() -> None:
        marks["start"] = time.perf_counter()
        if start is None:  # just ``action`` (if any), then watch the loop
            if action is not None:
                action()
            QTimer.singleShot(int(1000 * seconds_after_done), loop.quit)
            return
        widget._on_predicted = on_predicted
        start()
        if widget.worker is None:
            raise RuntimeError(f"Run model did not start a worker: {widget.status.text()}")

    if widget is not None:
        widget.prediction_shown.connect(shown)
    timer.start()
    QTimer.singleShot(100, begin)
    QTimer.singleShot(600_000, loop.quit)  # safety net
    loop.exec()
    timer.stop()
    if widget is not None:
        widget.prediction_shown.disconnect(shown)
        if "_on_predicted" in widget.__dict__:
            del widget._on_predicted
    return ticks, marks


def record(out: dict, prefix: str, ticks: list[float], marks: dict, widget: Any) -> None:
    """Add one Run model trial's times to ``out`` (keys of :func:`measure_worker`)."""
    if "shown" not in marks or "returned" not in marks:
        raise RuntimeError(f"the prediction was not shown: {widget.status.text()}")
    t = np.asarray(ticks)
    gaps, starts, ends = np.diff(t), t[:-1], t[1:]
    model = (ends > marks["start"]) & (starts < marks["returned"])
    show = (ends > marks["returned"]) & (starts < marks["shown"])
    out[prefix + "model_s"].append(marks["shown"] - marks["start"])
    out[prefix + "gap_model_ms"].append(1000 * float(gaps[model].max()))
    worst = int(np.argmax(np.where(model, gaps, -1.0)))
    out[prefix + "gap_model_at_s"].append(float(starts[worst] - marks["start"]))
    out[prefix + "gap_show_ms"].append(1000 * float(gaps[show].max()) if show.any() else 0)
    out[prefix + "show_ms"].append(1000 * (marks["shown"] - marks["returned"]))
    out[prefix + "gap_all_ms"].append(1000 * float(gaps[ends > marks["start"]].max()))


def measure_worker(widget: Any, runs: int, cache: Path) -> dict[str, list[float]]:
    """Click Run model from the event loop (prediction in a thread) and time the ticks.

    Parameters
    ----------
    widget : InstSegWidget
        The docked widget.
    runs : int
        Number of model runs of each kind: with empty caches (the network runs and its
        result is written to the disk cache), and with only the disk cache (as after
        restarting napari).
    cache : Path
        The disk cache folder (``$NAPARI_INSTSEG_CACHE``), emptied before network runs.

    Returns
    -------
    dict
        Per run: ``model_s`` (click to every layer shown), ``gap_model_ms`` (longest tick
        gap from the click until the worker returned), ``gap_show_ms`` (longest gap while
        the layers are shown, one per event-loop turn), ``show_ms`` (worker returned to
        every layer shown), ``gap_all_ms`` (longest gap over the whole run),
        ``gap_model_at_s`` (when the longest model gap began, seconds after the click);
        the same with the prefix ``disk_`` for runs that read the disk cache;
        ``idle_gap_ms`` (longest gap without a model run, same timer, 1 s).
    """
    import shutil

    from napari_instseg._napari import compute

    keys = ("model_s", "gap_model_ms", "gap_show_ms", "show_ms", "gap_all_ms", "gap_model_at_s")
    out: dict[str, list[float]] = {k: [] for k in keys}
    out.update({f"disk_{k}": [] for k in keys})
    out.update({f"new_{k}": [] for k in keys})
    out["idle_gap_ms"] = []
    out["choose_gap_ms"] = []

    ticks, marks = run_loop(widget, 1.0, None)
    out["idle_gap_ms"].append(1000 * float(np.diff(ticks).max()))
    for _ in range(runs):
        compute.clear_cache()  # a fresh prediction (and model load) in the worker
        shutil.rmtree(cache, ignore_errors=True)
        record(out, "", *run_loop(widget, 0.3, widget.run_btn.click), widget)
    for _ in range(runs):
        compute.clear_cache()  # as after restarting napari: only the disk cache is left
        record(out, "disk_", *run_loop(widget, 0.3, widget.run_btn.click), widget)
    viewer = widget.viewer
    first = widget.image_combo.currentText()
    image = viewer.layers[first].data
    for i in range(runs):  # a new image: every layer is created (prediction from memory)
        name = f"another image {i}"
        viewer.add_image(image, name=name)
        run_events(2.0)  # the new image layer is drawn before it is chosen
        # choosing it makes its worms and seeds layers (not while the model runs)
        ticks, marks = run_loop(
            widget, 1.0, None, partial(widget.image_combo.setCurrentText, name)
        )
        t = np.asarray(ticks)
        out["choose_gap_ms"].append(1000 * float(np.diff(t)[t[1:] > marks["start"]].max()))
        record(out, "new_", *run_loop(widget, 0.3, widget.run_btn.click), widget)
        session = widget.session(create=False)
        for layer in session._edit_layers():  # the map layers are shared by all images
            viewer.layers.remove(layer)
        viewer.layers.remove(name)
        widget.image_combo.setCurrentText(first)
        run_events(2.0)
    return out


def measure_first_run(viewer: Any, widget_class: Any) -> dict[str, Any]:
    """Open the widget in a fresh viewer, then run the model once (its first run).

    Returns the longest event-loop gap while the widget opens (it adds the chosen image's
    ``worms`` and ``seeds`` layers and the hidden, empty map layers), and the times of the
    first Run with the network (keys ``first_*`` of :func:`record`); ``widget`` is the
    docked widget.
    """
    from napari_instseg._napari import compute

    holder: dict[str, Any] = {}

    def open_widget() -> None:
        holder["widget"] = widget_class(viewer)
        viewer.window.add_dock_widget(
            holder["widget"], name="Worm segmentation (napari-instseg)", area="right"
        )

    ticks, marks = run_loop(None, 3.0, None, open_widget)
    t = np.asarray(ticks)
    out: dict[str, Any] = {"open_gap_ms": [1000 * float(np.diff(t)[t[1:] > marks["start"]].max())]}
    widget = holder["widget"]
    if widget._showing is not None or not widget._map_layers:
        raise RuntimeError("the widget's layers were not all added within 3 s")
    keys = ("model_s", "gap_model_ms", "gap_show_ms", "show_ms", "gap_all_ms", "gap_model_at_s")
    out.update({f"first_{k}": [] for k in keys})
    compute.clear_cache()
    record(out, "first_", *run_loop(widget, 0.3, widget.run_btn.click), widget)
    out["widget"] = widget
    return out


def machine() -> str:
    """Describe the machine: CPU, cores, torch threads, load, versions."""
    import napari
    import torch

    from napari_instseg.core.device import cpu_name

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"napari {napari.__version__}, torch {torch.__version__}, "
        f"Qt platform {os.environ.get('QT_QPA_PLATFORM') or 'xcb'}, "
        f"load average {load:.2f} at the start"
    )


def stats(values: list[float]) -> tuple[float, float, float]:
    """Median, 90th percentile and maximum."""
    a = np.asarray(values, float)
    return float(np.median(a)), float(np.percentile(a, 90)), float(a.max())


def report(results: dict[str, Any]) -> str:
    """Format the results as the Markdown section (heading included)."""
    clicks, tau, worker = results["clicks"], results["tau"], results["worker"]
    lines = [
        SECTION,
        "",
        f"- Machine: {results['machine']}",
        f"- Command: `{COMMAND}`",
        "- Image: `sample_worms()` 520 x 696 (12 synthetic worms) in a real napari window "
        f"(Xvfb, Mesa software OpenGL): the widget is opened, the shipped model run in its "
        f"worker (first run), then once more blocking ({results['predict_s']:.2f} s) before "
        "the clicks.",
        f"- Load average at the end: {results['load_end']:.2f}"
        + (f". {results['note']}" if results.get("note") else ""),
        "",
        "| measurement | trials | wall median | wall p90 | wall max | CPU median | target |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]

    def row(
        name: str, values: list[float], unit: str, target: str, cpu: list[float] | None = None
    ) -> None:
        med, p90, mx = stats(values)
        cpu_text = f"{np.median(cpu):.1f} {unit}" if cpu else ""
        lines.append(
            f"| {name} | {len(values)} | {med:.1f} {unit} | {p90:.1f} {unit} | "
            f"{mx:.1f} {unit} | {cpu_text} | {target} |"
        )

    tau_wall, tau_cpu = tau
    floor_wall, floor_cpu = results["floor"]
    row("canvas redraw alone, nothing changed (floor)", floor_wall, "ms", "", floor_cpu)
    row("click -> Labels data changed", clicks["data"], "ms", "", clicks["data_cpu"])
    row("click -> canvas drawn (visible)", clicks["drawn"], "ms", "<= 50 ms", clicks["drawn_cpu"])
    row("click -> framebuffer read back", clicks["read_back"], "ms", "", clicks["read_back_cpu"])
    row("tau slider step -> re-grown + drawn", tau_wall, "ms", "<= 50 ms (20/s)", tau_cpu)
    med, med_cpu = float(np.median(tau_wall)), float(np.median(tau_cpu))
    lines.append(
        f"| tau slider updates per second (1 / median) | {len(tau_wall)} | "
        f"{1000 / med:.1f} /s | | | {1000 / max(med_cpu, 1e-6):.1f} /s | >= 20 /s |"
    )
    first = results["first"]
    row("open the widget (worms, seeds and empty map layers added): longest gap",
        first["open_gap_ms"], "ms", "")  # fmt: skip
    kinds = (
        ("first_", "first run in a fresh viewer", first),
        ("", "network", worker),
        ("disk_", "disk cache", worker),
        ("new_", "new image, cached", worker),
    )
    for prefix, what, times in kinds:
        row(f"Run model ({what}): longest event-loop gap until the worker returns",
            times[prefix + "gap_model_ms"], "ms", "<= 100 ms")  # fmt: skip
        row(f"Run model ({what}): longest gap while the layers are shown",
            times[prefix + "gap_show_ms"], "ms", "<= 100 ms")  # fmt: skip
        row(f"Run model ({what}): worker returned -> all layers shown",
            times[prefix + "show_ms"], "ms", "")  # fmt: skip
        row(f"Run model ({what}): longest event-loop gap, whole run",
            times[prefix + "gap_all_ms"], "ms", "<= 100 ms")  # fmt: skip
        row(f"Run model ({what}): click -> all layers shown", times[prefix + "model_s"], "s",
            "")  # fmt: skip
    row("choose a new image in the widget (its worms + seeds layers made): longest gap",
        worker["choose_gap_ms"], "ms", "")  # fmt: skip
    row("idle: longest gap of the same 10 ms timer (1 s, no work)", worker["idle_gap_ms"], "ms",
        "")  # fmt: skip
    if worker["gap_model_at_s"]:
        at = ", ".join(f"{v:.1f}" for v in worker["gap_model_at_s"])
        lines += ["", f"Longest gap until the network's worker returned began at {at} s after "
                  "the click."]  # fmt: skip
    lines += [
        "",
        "What is measured (`benchmarks/napari_latency.py`):",
        "",
        "- Floor: `canvas.native.update()` and wait for the draw with nothing changed: what",
        "  napari, vispy, Qt and Mesa cost per frame in this window, whatever the plugin does.",
        "- Clicks: mouse press + release through the vispy canvas (as in the widget tests),",
        "  the *New* tool grows a new instance, each on another worm, undone after timing.",
        '  "Canvas drawn" = `canvas.native.update()` then `QApplication.processEvents()` until',
        '  vispy\'s draw event (connected last) has run; "read back" adds',
        "  `grabFramebuffer()` (one more render + copy to the CPU, a pessimistic proxy for",
        "  pixels on screen). The first click is a warm-up and not counted. The plugin",
        "  updates the seeds layer once the canvas has painted the mask, so the seed marker",
        "  follows one frame later and is not part of these times.",
        "- Tau slider: `InstSegWidget.set_tau(tau, live=True)` (sets the QSlider value as a",
        "  drag does, preview mode, one undo step per drag) over a 0.30 -> 0.90 -> 0.30 sweep",
        "  in 0.02 steps, each step waiting for the canvas draw.",
        "- Run model: the Run button is clicked from the Qt event loop while a precise 10 ms",
        "  `QTimer` records its ticks; a gap is the time between two ticks. The worker thread",
        "  loads the model, runs the network (or reads the disk cache) and prepares every",
        "  layer's data (PCA colours, grow cache); the main thread then adds or updates one",
        '  layer per event-loop turn until `prediction_shown`. "network" runs start with',
        '  empty memory and disk caches (the result is written to the disk cache); "disk',
        '  cache" runs start with an empty memory cache only, as after restarting napari;',
        '  "new image" runs open another image layer (same pixels, so the prediction comes',
        "  from the memory cache) and show its maps for the first time. Choosing it in the",
        "  widget (measured on its own, before Run) creates its worms and seeds layers",
        "  (napari builds a vispy visual and layer controls per layer, ~0.1-0.2 s each",
        "  here); the map layers are shared by all images, so Run only changes their data.",
        "- Wall = wall clock (includes waiting for a core: on a shared machine the training",
        "  job and other work compete for the 2 cores, so wall times are upper bounds).",
        "  CPU = CPU time of the whole napari process (all threads, Mesa's included) over",
        "  the same interval: close to what the step costs on an idle machine; it excludes",
        "  the X server.",
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace (or insert) the viewer-latency section of a Markdown file.

    Parameters
    ----------
    path : Path
        The Markdown file (e.g. docs/benchmarks.md).
    section : str
        The new section, starting with its ``## `` heading.
    """
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = section.rstrip("\n") + "\n\n"
    headings = [m.start() for m in re.finditer(r"^## ", text, flags=re.M)]
    start = text.find("\n" + SECTION + "\n")
    if start >= 0:
        start += 1
        end = next((h for h in headings if h > start), len(text))
        text = text[:start] + block + text[end:]
    else:
        after = text.find("\n" + AFTER)
        if after >= 0:
            end = next((h for h in headings if h > after + 1), len(text))
        else:
            end = len(text)
        if end == len(text) and not text.endswith("\n\n"):
            text = text.rstrip("\n") + "\n\n"
            end = len(text)
        text = text[:end] + block + text[end:]
    path.write_text(text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clicks", type=int, default=24, help="timed clicks (default 24)")
    parser.add_argument("--tau-steps", type=int, default=60, help="timed slider updates")
    parser.add_argument(
        "--model-runs", type=int, default=3, help="model runs in the worker (of each kind)"
    )
    parser.add_argument("--note", default="", help="free text added to the machine line")
    parser.add_argument("--out", type=Path, help="Markdown file whose section to replace")
    args = parser.parse_args(argv)
    if not has_display():
        print(
            "No display: run under a virtual X server, e.g.\n"
            f"  {COMMAND}\n(or set DISPLAY to a running X server).",
            file=sys.stderr,
        )
        return 2

    import tempfile

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_instseg._napari import compute
    from napari_instseg._napari.widget import InstSegWidget
    from napari_instseg.core.synthetic import sample_worms

    info = machine()
    cache = Path(tempfile.mkdtemp(prefix="napari-instseg-bench-"))
    os.environ[compute.CACHE_ENV] = str(cache)  # a private disk cache, emptied as needed
    sample = sample_worms()
    viewer = napari.Viewer(title="napari-instseg latency benchmark", show=True)
    viewer.window._qt_window.resize(1500, 950)
    viewer.add_image(sample.image, name="sample worms")
    run_events(2.0)
    first = measure_first_run(viewer, InstSegWidget)
    widget = first.pop("widget")
    t0 = time.perf_counter()
    compute.clear_cache()
    widget.run_model(blocking=True)
    predict_s = time.perf_counter() - t0
    session = widget.session()
    if session.labels_layer is None:
        raise RuntimeError("running the model did not create the worms layer")
    viewer.layers.selection.active = session.labels_layer
    viewer.reset_view()
    settle(10)
    redraw = Redraw(viewer)
    redraw.wait()

    floor = measure_floor(redraw, args.clicks)
    clicks = measure_clicks(viewer, widget, sample.masks, args.clicks, redraw)
    tau = measure_tau(viewer, widget, sample.masks, args.tau_steps, redraw)
    worker = measure_worker(widget, args.model_runs, compute.cache_dir())
    results = {
        "floor": floor,
        "machine": info,
        "predict_s": predict_s,
        "clicks": clicks,
        "tau": tau,
        "worker": worker,
        "first": first,
        "load_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
        "note": args.note,
    }
    section = report(results)
    print(section)
    if args.out is not None:
        write_section(args.out, section)
        print(f"wrote section {SECTION!r} of {args.out}")
    viewer.close()
    QApplication.processEvents()
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
