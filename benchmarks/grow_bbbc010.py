"""One-click growth on BBBC010: grow every ground-truth worm from its most central pixel.

For each worm of the chosen wells, the seed is the pixel farthest from the worm's outline
(what a user clicks); the mask grown at tau (all pixels with Fathi et al.'s similarity
sigma >= tau to the seed) is compared with the worm. Prints, per tau, the mean IoU and the
share of worms grown to IoU > 0.5, and the same with the best tau per worm (a user moving
the slider).

    python benchmarks/grow_bbbc010.py [--model W.safetensors] [--wells B13-C02]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from napari_instseg.core.grow import d2_threshold  # noqa: E402
from napari_instseg.core.io import read_bbbc010  # noqa: E402
from napari_instseg.core.predict import predict  # noqa: E402
from napari_instseg.core.train import parse_names  # noqa: E402
from napari_instseg.core.weights import load_model  # noqa: E402

TAUS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def central_pixel_ious(model, data: str, wells: str, taus=TAUS) -> np.ndarray:
    """(worms, taus) IoU of the mask grown from each worm's most central pixel."""
    rows = []
    for sample in read_bbbc010(data, parse_names(wells), with_w1=False):
        prediction = predict(sample.image, model)
        emb = prediction.embeddings.reshape(prediction.embeddings.shape[0], -1)
        for mask in np.asarray(sample.masks, bool):
            depth = ndimage.distance_transform_edt(mask)
            seed = int(np.argmax(depth))
            d2 = ((emb - emb[:, seed][:, None]) ** 2).sum(0).reshape(mask.shape)
            row = []
            for tau in taus:
                grown = d2 <= d2_threshold(tau)
                row.append((grown & mask).sum() / max((grown | mask).sum(), 1))
            rows.append(row)
    return np.asarray(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="weights file (default: shipped)")
    parser.add_argument("--data", default="../shared/data/bbbc010")
    parser.add_argument("--wells", default="B13-C02")
    args = parser.parse_args(argv)
    ious = central_pixel_ious(load_model(args.model), args.data, args.wells)
    print(f"{len(ious)} worms, wells {args.wells}, model {args.model or 'shipped'}")
    print("tau        " + " ".join(f"{t:6.2f}" for t in TAUS) + "  best tau")
    print(
        "mean IoU   "
        + " ".join(f"{v:6.3f}" for v in ious.mean(0))
        + f"  {ious.max(1).mean():6.3f}"
    )
    share = (ious > 0.5).mean(0)
    print(
        "IoU > 0.5  "
        + " ".join(f"{v:6.3f}" for v in share)
        + f"  {(ious.max(1) > 0.5).mean():6.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
