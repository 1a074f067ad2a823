"""Demo: napari with the napari-instseg widget docked and the sample worms loaded.

Run ``python -m napari_instseg.demo`` (or ``make demo``). The demo opens napari, loads the
synthetic sample worms, docks the widget, runs the model and the automatic segmentation,
and leaves the window open for clicking. With ``--screenshot demo.png`` it renders the
whole window to a PNG and exits (``make demo`` does this under ``xvfb-run`` when there is
no display).

When no trained weights are available (a fresh checkout before training), the model step
falls back to an *oracle* prediction built from the sample's ground-truth masks, and the
status line says so; everything else (layers, clicking, automatic segmentation) works the
same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def build_viewer(
    show: bool = True, run_model: bool = True, oracle_fallback: bool = True
) -> tuple[Any, Any]:
    """Open napari with the sample worms, the widget docked, the model and segmentation run.

    Parameters
    ----------
    show : bool
        Show the window.
    run_model : bool
        Run the model (or the oracle fallback) and the automatic segmentation.
    oracle_fallback : bool
        Use an oracle prediction from the sample's ground truth when the model cannot run.

    Returns
    -------
    viewer : napari.Viewer
        The viewer.
    widget : InstSegWidget
        The docked widget.
    """
    import napari

    from ._napari import compute
    from ._napari.widget import InstSegWidget
    from .core.synthetic import sample_worms

    sample = sample_worms()
    viewer = napari.Viewer(title="napari-instseg demo", show=show)
    viewer.add_image(sample.image, name="sample worms")
    widget = InstSegWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Worm segmentation (napari-instseg)", area="right")
    if not run_model:
        return viewer, widget
    note = ""
    try:
        widget.run_model(blocking=True)
    except Exception as err:  # noqa: BLE001 - no weights yet: fall back, say why
        if not oracle_fallback:
            raise
        from .core.oracle import prediction_from_masks

        session = widget.session()
        prediction = prediction_from_masks(sample.masks, noise=0.05)
        prediction.metadata["model"] = "oracle (ground truth)"
        session.set_prediction(prediction, model_name="oracle (ground truth)")
        compute._PREDICTIONS.clear()
        note = f" Model unavailable ({type(err).__name__}: {err}); showing an oracle prediction."
    n = widget.segment(blocking=True)
    session = widget.session()
    first = widget.next_to_review()
    viewer.reset_view()
    if session.labels_layer is not None:
        viewer.layers.selection.active = session.labels_layer
    widget._say(
        f"{n} worms found; instance {first} is the least certain. Click a worm to grow it, "
        f"drag tau to re-grow, Ctrl+Z to undo.{note}"
    )
    return viewer, widget


def screenshot(viewer: Any, path: str | Path) -> Path:
    """Render the whole napari window (canvas, layer list, dock widget) to a PNG.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    path : str or Path
        Output file.

    Returns
    -------
    Path
        The file written.
    """
    from qtpy.QtWidgets import QApplication

    path = Path(path)
    window = viewer.window._qt_window
    window.resize(1500, 950)
    for _ in range(5):
        QApplication.processEvents()
    viewer.reset_view()
    QApplication.processEvents()
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    return path


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m napari_instseg.demo``)."""
    parser = argparse.ArgumentParser(prog="python -m napari_instseg.demo", description=__doc__)
    parser.add_argument("--screenshot", metavar="PNG", help="save the window as PNG and exit")
    parser.add_argument(
        "--no-model", action="store_true", help="only load the image and dock the widget"
    )
    args = parser.parse_args(argv)

    import napari

    viewer, _ = build_viewer(show=True, run_model=not args.no_model)
    if args.screenshot:
        out = screenshot(viewer, args.screenshot)
        print(f"saved {out}")
        viewer.close()
        return 0
    napari.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
