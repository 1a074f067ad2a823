"""Clicks to correct a worm on BBBC010: IoU after 1, 2, ... simulated clicks.

What a user does with the plugin's click tool: click a worm, look at the mask, and click
again where it is most wrong: a positive click (a seed) on the largest part of the worm the
mask misses, a negative click on the largest part it takes from elsewhere. Each worm of the
chosen wells is grown from its most central pixel by :func:`napari_instseg.grow` (the
plugin's click, tau 0.5, the model's tuned outline refinement), then corrected by up to
``--clicks`` such clicks; each new click goes to the most interior pixel of the largest
connected error region (missed pixels: positive; extra pixels: negative), as interactive
segmentation benchmarks simulate users (e.g. micro-sam's iterative prompting). Prints the
mean IoU and the shares of worms above IoU 0.8 and 0.9 after each click, and the mean
number of clicks to reach IoU 0.8 (worms that never do count as ``--clicks``).

    python benchmarks/clicks_bbbc010.py --wells A11-A12,B11-B12,C01-C02,B13-B24 --tta 8
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.grow_bbbc010 import bbbc010_parser  # noqa: E402
from napari_instseg.core.grow import get_grower, grow  # noqa: E402
from napari_instseg.core.io import read_bbbc010  # noqa: E402
from napari_instseg.core.pick import grow_from_segments  # noqa: E402
from napari_instseg.core.predict import predict  # noqa: E402
from napari_instseg.core.train import parse_names  # noqa: E402
from napari_instseg.core.weights import load_model  # noqa: E402


def next_click(
    mask: np.ndarray, truth: np.ndarray, min_depth: float = 2.0
) -> tuple[tuple[int, int], bool] | None:
    """The pixel a user clicks next, and whether the click is positive.

    The most interior pixel of the largest connected error region: pixels of ``truth``
    the mask misses (a positive click) or pixels of the mask outside ``truth`` (negative).
    Only regions with a pixel at least ``min_depth`` from their outline count (a band a
    pixel wide along the outline is not something a user clicks); None when there is none.
    """
    best = None
    for region, positive in ((truth & ~mask, True), (mask & ~truth, False)):
        labels, n = ndimage.label(region)
        if n == 0:
            continue
        depth = ndimage.distance_transform_edt(region)
        deepest = ndimage.maximum(depth, labels, np.arange(1, n + 1))
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        sizes[np.asarray(deepest) < min_depth] = 0
        k = int(np.argmax(sizes)) + 1
        if sizes[k - 1] and (best is None or sizes[k - 1] > best[0]):
            region_k = labels == k
            pixel = np.unravel_index(int(np.argmax(np.where(region_k, depth, -1))), depth.shape)
            best = (sizes[k - 1], (int(pixel[0]), int(pixel[1])), positive)
    return None if best is None else (best[1], best[2])


def click_ious(
    model,
    data: str,
    wells: str,
    clicks: int = 4,
    tau: float = 0.5,
    tta: int = 1,
    method: str = "segments",
) -> np.ndarray:
    """(worms, clicks) IoU of each worm's mask after each simulated click.

    ``method``: "segments" (:func:`grow_from_segments`, the plugin's default where the
    model has tuned segmentation parameters) or "embedding" (:func:`grow`).
    """
    rows = []
    for sample in read_bbbc010(data, parse_names(wells), with_w1=False):
        prediction = predict(sample.image, model, tta=tta)
        grower = get_grower(prediction)
        for truth in np.asarray(sample.masks, bool):
            depth = ndimage.distance_transform_edt(truth)
            positive = [tuple(int(v) for v in np.unravel_index(np.argmax(depth), truth.shape))]
            negative: list[tuple[int, int]] = []
            row = []
            for _ in range(clicks):
                if method == "segments":
                    mask = grow_from_segments(prediction, positive, negative or None, tau=tau)
                else:
                    mask = grow(grower, positive, tau=tau, negative=negative or None)
                row.append((mask & truth).sum() / max((mask | truth).sum(), 1))
                click = next_click(mask, truth)
                if click is None:
                    row += [row[-1]] * (clicks - len(row))
                    break
                (positive if click[1] else negative).append(click[0])
            rows.append(row)
    return np.asarray(rows)


def main(argv: list[str] | None = None) -> int:
    parser = bbbc010_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--clicks", type=int, default=4, help="clicks per worm, the first included"
    )
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument("--method", choices=("segments", "embedding"), default="segments")
    args = parser.parse_args(argv)
    ious = click_ious(
        load_model(args.model), args.data, args.wells, args.clicks, args.tau, args.tta, args.method
    )
    print(
        f"{len(ious)} worms, wells {args.wells}, model {args.model or 'shipped'}, "
        f"clicks from {args.method}, tau {args.tau}"
    )
    print("clicks     " + " ".join(f"{k:6d}" for k in range(1, args.clicks + 1)))
    print("mean IoU   " + " ".join(f"{v:6.3f}" for v in ious.mean(0)))
    for level in (0.8, 0.9):
        print(f"IoU > {level}  " + " ".join(f"{v:6.3f}" for v in (ious > level).mean(0)))
    reached = np.where((ious > 0.8).any(1), np.argmax(ious > 0.8, axis=1) + 1, args.clicks)
    print(f"clicks to IoU 0.8: {reached.mean():.2f} (at most {args.clicks})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
