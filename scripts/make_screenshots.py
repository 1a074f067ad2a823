"""Render the screenshots of docs/user-guide.md into docs/images/*.png.

Usage (headless machines: under xvfb-run)::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/make_screenshots.py

It opens the demo (sample worms, widget docked, model + automatic segmentation), then shows
each layer in turn and a few steps of the workflow. Images are reduced to a palette PNG so
each stays well under 300 KB. When the shipped weights are missing, the demo uses an oracle
prediction built from the sample's ground truth (the images then say "oracle" in the
status line); re-run the script once weights ship.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from qtpy.QtWidgets import QApplication

from napari_instseg._napari.layers import LAYER_NAMES
from napari_instseg.demo import build_viewer

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"


def save(array: np.ndarray, path: Path, width: int = 900) -> None:
    img = PILImage.fromarray(np.asarray(array)[..., :3].astype(np.uint8))
    if img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), PILImage.LANCZOS)
    img = img.quantize(colors=96, method=PILImage.Quantize.MEDIANCUT)
    img.save(path, optimize=True)
    print(f"{path.name}: {path.stat().st_size / 1024:.0f} KB")


def window_shot(viewer, path: Path, width: int = 1100) -> None:
    save(viewer.screenshot(canvas_only=False, flash=False), path, width)


def settle() -> None:
    for _ in range(5):
        QApplication.processEvents()


def only(viewer, session, names: set[str]) -> None:
    """Show the image and the named layers, hide the others."""
    for layer in viewer.layers:
        layer.visible = layer is session.image_layer or layer.name in names
    settle()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    viewer, widget = build_viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    session = widget.session()
    settle()
    viewer.reset_view()
    settle()
    window_shot(viewer, args.out / "window.png")

    maps = {
        "embeddings": LAYER_NAMES["embeddings"],
        "seediness": LAYER_NAMES["seediness"],
        "boundary": LAYER_NAMES["boundary"],
        "foreground": LAYER_NAMES["foreground"],
    }
    for key, name in maps.items():
        only(viewer, session, {name})
        save(viewer.screenshot(canvas_only=True), args.out / f"layer_{key}.png")
    score = session.map_layers["class_score"]
    only(viewer, session, {score.name})
    save(viewer.screenshot(canvas_only=True), args.out / "layer_mask_score.png")

    only(viewer, session, {LAYER_NAMES["worms"], LAYER_NAMES["seeds"]})
    save(viewer.screenshot(canvas_only=True), args.out / "layer_worms.png")

    # similarity to the pixel under the cursor (at the seed of the first worm)
    worm = min(session.worms, key=lambda w: w.label)
    point = worm.seeds[0] if worm.seeds else tuple(np.argwhere(worm.mask)[0])
    session.similarity_to(point)  # creates the layer on first use
    only(viewer, session, {LAYER_NAMES["similarity"]})
    settle()
    save(viewer.screenshot(canvas_only=True), args.out / "layer_similarity.png")

    # workflow: remove a worm, click it back, tighten it with tau
    only(viewer, session, {LAYER_NAMES["worms"], LAYER_NAMES["seeds"]})
    rows, cols = np.nonzero(worm.mask)
    centre = (rows.mean(), cols.mean())
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.center = centre
    camera.zoom = camera.zoom * 2.5
    session.remove(label=worm.label)
    settle()
    save(viewer.screenshot(canvas_only=True), args.out / "workflow_1_removed.png", 700)
    label = session.grow_new(point, tau=0.5)
    settle()
    window_shot(viewer, args.out / "workflow_2_click.png")
    session.select(label)
    widget.set_tau(0.9)
    settle()
    save(viewer.screenshot(canvas_only=True), args.out / "workflow_3_tau.png", 700)
    widget.set_tau(0.5)
    widget.next_to_review()
    settle()
    window_shot(viewer, args.out / "workflow_4_review.png", 950)
    widget.measure()
    from qtpy.QtWidgets import QScrollArea

    scroll = widget.findChild(QScrollArea)
    scroll.verticalScrollBar().setValue(scroll.verticalScrollBar().maximum())  # show the table
    settle()
    window_shot(viewer, args.out / "workflow_5_measure.png", 950)
    viewer.close()


if __name__ == "__main__":
    main()
