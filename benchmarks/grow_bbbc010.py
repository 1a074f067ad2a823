"""One-click growth on BBBC010: grow every ground-truth worm from its most central pixel.

For each worm of the chosen wells, the seed is the pixel farthest from the worm's outline
(what a user clicks); the mask grown at tau by :func:`napari_instseg.grow` (what the
plugin's click does: pixels with Fathi et al.'s similarity sigma >= tau to the seed,
clipped to the foreground map, connected, crossings bridged) is compared with the worm.
Prints, per tau, the mean IoU and the shares of worms grown to IoU > 0.5 and > 0.8, and
the same with the best tau per worm (a user moving the slider); ``--no-clip`` leaves the
foreground map out.

    python benchmarks/grow_bbbc010.py [--model W.safetensors] [--wells B13-C02] [--tta 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from napari_instseg.core.grow import Grower  # noqa: E402
from napari_instseg.core.io import read_bbbc010  # noqa: E402
from napari_instseg.core.predict import predict  # noqa: E402
from napari_instseg.core.train import parse_names  # noqa: E402
from napari_instseg.core.weights import load_model  # noqa: E402

TAUS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def central_pixel_ious(
    model, data: str, wells: str, taus=TAUS, tta: int = 1, clip: bool = True
) -> np.ndarray:
    """(worms, taus) IoU of the mask grown from each worm's most central pixel."""
    rows = []
    for sample in read_bbbc010(data, parse_names(wells), with_w1=False):
        grower = Grower(predict(sample.image, model, tta=tta))
        for mask in np.asarray(sample.masks, bool):
            depth = ndimage.distance_transform_edt(mask)
            seed = np.unravel_index(np.argmax(depth), mask.shape)
            row = []
            for tau in taus:
                grown = grower.grow([seed], tau=tau, clip_to_foreground=clip)
                row.append((grown & mask).sum() / max((grown | mask).sum(), 1))
            rows.append(row)
    return np.asarray(rows)


def bbbc010_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every click benchmark on BBBC010 takes: model, data, wells, tta."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=None, help="weights file (default: shipped)")
    parser.add_argument("--data", default="../shared/data/bbbc010")
    parser.add_argument("--wells", default="B13-C02")
    parser.add_argument("--tta", type=int, default=1, help="test-time augmentation passes")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = bbbc010_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--no-clip", action="store_true", help="do not clip the masks to the foreground map"
    )
    args = parser.parse_args(argv)
    ious = central_pixel_ious(
        load_model(args.model), args.data, args.wells, tta=args.tta, clip=not args.no_clip
    )
    clipped = "unclipped" if args.no_clip else "clipped to the foreground"
    print(f"{len(ious)} worms, wells {args.wells}, model {args.model or 'shipped'}, {clipped}")
    print("tau        " + " ".join(f"{t:6.2f}" for t in TAUS) + "  best tau")
    print(
        "mean IoU   "
        + " ".join(f"{v:6.3f}" for v in ious.mean(0))
        + f"  {ious.max(1).mean():6.3f}"
    )
    for level in (0.5, 0.8):
        share = (ious > level).mean(0)
        print(
            f"IoU > {level}  "
            + " ".join(f"{v:6.3f}" for v in share)
            + f"  {(ious.max(1) > level).mean():6.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
