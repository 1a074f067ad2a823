"""How well the image contrast and the foreground map place BBBC010's annotated outlines.

For each image: the pixels within 2 px of the ground-truth foreground's outline, and how
many of them each rule puts on the right side: the foreground map at the model's tuned
threshold, the foreground map at the best threshold for that image, and the image contrast
(``core/edges.local_contrast``) at the best threshold for that image (which threshold that
is, too). Also the median solidity of the model's instances, which
``core/edges.refine_edges`` turns into the edge threshold.

    python benchmarks/edge_contrast.py --wells A11-A12,B11-B12,C01-C02,B13-B24 --tta 8

Only the training half of BBBC010 is here; use your validation wells, never the test half.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from napari_instseg.core.edges import solidity  # noqa: E402
from napari_instseg.core.instances import segment  # noqa: E402
from napari_instseg.core.io import read_bbbc010  # noqa: E402
from napari_instseg.core.predict import predict  # noqa: E402
from napari_instseg.core.train import parse_names  # noqa: E402
from napari_instseg.core.weights import load_model  # noqa: E402


def best_threshold(values: np.ndarray, inside: np.ndarray, below: bool) -> tuple[float, float]:
    """The threshold that puts most pixels on their side, and that share."""
    candidates = np.quantile(values, np.linspace(0.01, 0.99, 197))
    shares = []
    for t in candidates:
        side = values < t if below else values > t
        shares.append(float((side == inside).mean()))
    k = int(np.argmax(shares))
    return float(candidates[k]), shares[k]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="weights (default: shipped)")
    parser.add_argument("--data", default="../shared/data/bbbc010")
    parser.add_argument("--wells", default="A11-A12,B11-B12,C01-C02,B13-B24")
    parser.add_argument("--tta", type=int, default=8)
    parser.add_argument("--cache", default=".cache/predictions")
    args = parser.parse_args(argv)

    model = load_model(args.model)
    params = dict((model.metadata.get("segment_params") or {}).get("boundary", {}))
    fg_threshold = float(params.get("fg_threshold", 0.5))
    params["edge_thresholds"] = None  # the instances as the network alone makes them
    wells = parse_names(args.wells)
    rows = []
    print("well  fg@tuned  fg@best  contrast@best  (threshold)  median solidity")
    for well, sample in zip(wells, read_bbbc010(args.data, wells, with_w1=False), strict=True):
        prediction = predict(sample.image, model, tta=args.tta, cache=args.cache)
        truth = sample.masks.any(axis=0)
        inside = ndimage.distance_transform_edt(truth)
        outside = ndimage.distance_transform_edt(~truth)
        band = ((inside > 0) & (inside <= 2)) | ((outside > 0) & (outside <= 2))
        fg, contrast, gt = prediction.foreground[band], prediction.contrast[band], truth[band]
        tuned = float(((fg > fg_threshold) == gt).mean())
        _, fg_best = best_threshold(fg, gt, below=False)
        t, contrast_best = best_threshold(contrast, gt, below=True)
        found = segment(prediction, "boundary", **params)
        sol = float(np.median([solidity(m) for m in found.masks])) if len(found) else 0.0
        rows.append((tuned, fg_best, contrast_best))
        cells = [f"{v:.3f}" for v in (tuned, fg_best, contrast_best)]
        print(f"{well}   {'    '.join(cells)}        ({t:.3f})     {sol:.3f}")
    mean = np.mean(rows, axis=0)
    print(f"mean  {mean[0]:.3f}    {mean[1]:.3f}    {mean[2]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
