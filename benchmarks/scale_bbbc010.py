"""Worms of another size: BBBC010 images resized, segmented with and without ``scale``.

Each image of the chosen wells and its annotated masks are resized by each factor (a
factor of 2 makes the worms twice as wide, as a higher magnification would), then
predicted and segmented three ways with the model's stored parameters: as they are
(``scale=1``), at the known factor (``scale=1/factor``, what a user who measured the worms
gives), with ``scale="auto"`` (estimated per image from the predicted foreground) and
``series``: one factor for all images, the median of the auto estimates of the first,
middle and last image (what ``run_batch(scale="auto")`` does for a series). Prints COCO AP /
AP50 and avS / S0.5 per factor and way, the median estimated scale, and the mean IoU of one
click per worm (its most central pixel, tau 0.5, as the plugin's click grows it).

    python benchmarks/scale_bbbc010.py [--wells A11-A12,B11-B12,C01-C02,B13-B24]
        [--factors 0.5,0.7,1.0,1.4,2.0] [--ways 1,known,auto,series] [--tta 1]
        [--model W.safetensors]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.transform import resize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from napari_instseg.core.evaluate import evaluate  # noqa: E402
from napari_instseg.core.grow import grow  # noqa: E402
from napari_instseg.core.instances import segment  # noqa: E402
from napari_instseg.core.io import read_bbbc010  # noqa: E402
from napari_instseg.core.predict import auto_scale, predict  # noqa: E402
from napari_instseg.core.train import parse_names  # noqa: E402
from napari_instseg.core.weights import load_model  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bbbc010"


def resized_sample(image: np.ndarray, masks: np.ndarray, factor: float):
    """Image (bilinear, anti-aliased when shrinking) and masks (bilinear >= 0.5) resized."""
    shape = tuple(max(1, round(n * factor)) for n in image.shape)
    big = resize(image, shape, order=1, preserve_range=True, anti_aliasing=factor < 1)
    gt = np.stack([resize(m.astype(np.float32), shape, order=1) >= 0.5 for m in masks])
    return big.astype(np.float32), gt


def click_ious(prediction, masks: np.ndarray) -> list[float]:
    """IoU of the mask grown (tau 0.5) from each worm's most central pixel."""
    ious = []
    for mask in masks:
        centre = np.unravel_index(np.argmax(ndimage.distance_transform_edt(mask)), mask.shape)
        grown = grow(prediction, [centre], tau=0.5)
        ious.append((grown & mask).sum() / max((grown | mask).sum(), 1))
    return ious


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--wells", default="A11-A12,B11-B12,C01-C02,B13-B24")
    parser.add_argument("--factors", default="0.5,0.7,1.0,1.4,2.0")
    parser.add_argument("--ways", default="1,known,auto,series")
    parser.add_argument("--tta", type=int, default=1)
    parser.add_argument("--model", default=None)
    args = parser.parse_args(argv)
    model = load_model(args.model)
    samples = read_bbbc010(args.data, parse_names(args.wells), with_w1=False)
    print(f"{len(samples)} images, model object width {model.metadata.get('object_width')} px")
    print(
        f"{'factor':>6} {'scale':>10} {'AP':>6} {'AP50':>6} {'avS':>6} {'S0.5':>6} "
        f"{'s/img':>6} {'click':>6}"
    )
    for factor in (float(f) for f in args.factors.split(",")):
        data = [resized_sample(s.image, s.masks, factor) for s in samples]
        truth = [gt for _, gt in data]
        for way in args.ways.split(","):
            t0 = time.perf_counter()
            if way == "series":
                picks = sorted({0, len(data) // 2, len(data) - 1})
                scale = float(np.median([auto_scale(data[i][0], model) for i in picks]))
            else:
                scale = {"1": 1.0, "known": 1.0 / factor, "auto": "auto"}[way]
            predictions = [predict(img, model, tta=args.tta, scale=scale) for img, _ in data]
            found = [segment(p) for p in predictions]
            per_image = (time.perf_counter() - t0) / len(data)
            clicks = [
                v for p, gt in zip(predictions, truth, strict=True) for v in click_ious(p, gt)
            ]
            r = evaluate(found, truth)
            median_scale = float(np.median([p.metadata["scale"] for p in predictions]))
            label = f"{way} {median_scale:.2f}" if way in ("auto", "series") else way
            print(
                f"{factor:6.2f} {label:>10} {r['AP']:6.3f} {r['AP50']:6.3f} {r['avS']:6.3f} "
                f"{r['S']['0.5']:6.3f} {per_image:6.2f} {np.mean(clicks):6.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
