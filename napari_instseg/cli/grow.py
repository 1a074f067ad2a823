"""``napari-instseg grow``: masks grown from clicked seeds, as the plugin's clicks make them.

Example::

    napari-instseg grow image.tif --seeds seeds.csv --out grown

``seeds.csv`` holds one seed per row: ``row,col`` (or napari's Points export ``axis-0,axis-1``,
with ``axis-0`` the plane for a stack), optionally ``worm`` (seeds of one worm share it) and
``positive`` (0 for a negative seed that takes pixels away from its worm) and ``tau``
(the worm's own threshold; ``--tau`` for the others); see
:func:`napari_instseg.core.io.read_seed_table`. As in the plugin, a worm starts from the
automatic segment under its first seed when the model was tuned for automatic segmentation
(``--from segments``; :func:`napari_instseg.core.pick.grow_from_segments`), else it is
grown from the embeddings (``--from embedding``); ``--boundary-barrier`` and ``--no-clip``
act on the embedding growth only, and ``--tau`` under segments only on a worm whose first
seed is on no segment (a warning says so when they are given). A positive seed on plain
background (foreground below :data:`napari_instseg.core.grow.FG_FLOOR`, where a click grows
nothing but its own pixel) is skipped with a warning, and so is a worm left without
positive seeds. Writes, in ``--out``:

- ``<name>_labels.tif``: one label per worm (1, 2, ... in the order the worms first appear
  in the file; where worms overlap, the smaller one's label is shown);
- ``<name>_measurements.csv``: one row per worm (its ``worm`` id from the file, area,
  length, width, score, ...).

Outputs of an earlier run in ``--out`` are replaced only with ``--overwrite``; the image and
the seed table are never overwritten.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .predict import (
    SCALE_HELP,
    _load_model,
    check_outputs,
    estimated_scale_note,
    output_name,
    scale_arg,
    tta_arg,
    write_labels,
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``grow`` arguments.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The sub-command's parser.
    """
    parser.add_argument("image", type=Path, help="image file (2D, or a stack of planes)")
    parser.add_argument("--seeds", type=Path, required=True, help="CSV file of seed pixels")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace outputs of an earlier run in --out (default: refuse)",
    )
    parser.add_argument(
        "--tau",
        type=float,
        help="similarity threshold in (0, 1) of the embedding growth (0.5); when worms start "
        "from the segments, it acts only on a worm whose first seed is on no segment",
    )
    parser.add_argument(
        "--from",
        dest="start",
        choices=("auto", "segments", "embedding"),
        default="auto",
        help="segments: each worm starts from the automatic segment under its first seed, "
        "its other seeds correct it (the plugin's clicks); embedding: grown from the "
        "embeddings (Fathi et al.); auto (default): segments where the model was tuned for "
        "automatic segmentation and the image has at most 4 million pixels",
    )
    parser.add_argument(
        "--boundary-barrier",
        type=float,
        help="stop growing at boundary probability above this (e.g. 0.5); default: off; "
        "embedding growth only: no effect when worms start from the segments (the default "
        "--from auto with the shipped model)",
    )
    parser.add_argument(
        "--no-clip",
        action="store_true",
        help="do not clip the masks to the model's foreground map (embedding growth only, "
        "like --boundary-barrier)",
    )
    parser.add_argument(
        "--model", help="weights file (.safetensors); default: the shipped BBBC010 model"
    )
    parser.add_argument(
        "--tta", type=tta_arg, default="auto", help="test-time augmentation passes (auto)"
    )
    parser.add_argument("--scale", type=scale_arg, default=1.0, help=SCALE_HELP)
    parser.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    parser.add_argument("--cache", type=Path, help="zarr cache folder for predictions")
    parser.add_argument(
        "--channel-axis", type=int, help="axis of the stored array that holds the channels"
    )


def run(args: argparse.Namespace) -> int:
    """Grow the seeds' worms and write labels and measurements.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments of :func:`configure`.

    Returns
    -------
    int
        0 on success.
    """
    import pandas as pd

    from ..core.grow import (
        FG_FLOOR,
        WormSeeds,
        background_seeds,
        d2_threshold,
        grow_instances,
    )
    from ..core.io import read_image, read_seed_table
    from ..core.measure import measure
    from ..core.pick import starts_from_segments
    from ..core.predict import colour_to_grey, predict

    if not args.image.exists():
        raise FileNotFoundError(f"image not found: {args.image}")
    tau = 0.5 if args.tau is None else args.tau
    d2_threshold(tau)  # a clear error for tau outside (0, 1) before any work
    planes = read_seed_table(args.seeds)
    t0 = time.perf_counter()
    stack = read_image(args.image, channel_axis=args.channel_axis)  # (N, C, H, W)
    outside = sorted(p for p in planes if not 0 <= p < len(stack))
    if outside:
        raise ValueError(f"seeds on plane(s) {outside}, but {args.image} has {len(stack)}")
    name = output_name(args.image)
    outputs = [args.out / f"{name}_labels.tif", args.out / f"{name}_measurements.csv"]
    check_outputs(args.out, outputs, [args.image, args.seeds], args.overwrite)
    model = _load_model(args.model, args.device)
    options = {"clip_to_foreground": not args.no_clip}
    if args.boundary_barrier is not None:
        options["boundary_barrier"] = args.boundary_barrier
    given = [
        flag
        for flag, value in (
            ("--tau", args.tau),
            ("--boundary-barrier", args.boundary_barrier),
            ("--no-clip", args.no_clip or None),
        )
        if value is not None
    ]
    labels, tables, n_worms, warned, any_segments = [], [], 0, False, False
    scales: list[float] = []
    in_channels = model.config.in_channels
    for plane, image in enumerate(stack):
        # one grey channel; a colour (RGB/RGBA) file as its luminance for a grey model
        image = image[0] if image.shape[0] == 1 else colour_to_grey(image, in_channels)
        worms = planes.get(plane, {})
        if not worms:
            labels.append(np.zeros(image.shape[-2:], np.int64))
            continue
        prediction = predict(
            image, model, args.device, tta=args.tta, cache=args.cache, scale=args.scale
        )
        scales.append(float(prediction.metadata.get("scale", 1.0)))
        segments = args.start == "segments" or (
            args.start == "auto" and starts_from_segments(prediction)
        )
        any_segments |= bool(segments)
        if segments and given and not warned:
            warned = True
            _warn(
                f"{', '.join(given)}: worms start from the automatic segments (--from "
                f"{args.start}), where --boundary-barrier and --no-clip have no effect and "
                "--tau acts only on a worm whose first seed is on no segment; --from "
                "embedding grows every worm from the embeddings"
            )
        foreground = np.asarray(prediction.foreground)
        kept: dict[int, WormSeeds] = {}
        for worm_id, worm in worms.items():
            # as grow_instances: kept when --no-clip asks for unclipped embedding growth
            # (seeds outside the image: grow_instances' error)
            on_background = (
                background_seeds(foreground, worm.positive) if segments or not args.no_clip else []
            )
            at = f" of plane {plane}" if len(stack) > 1 else ""
            for r, c in on_background:
                _warn(
                    f"{args.image}: seed ({r},{c}){at} is on background (foreground "
                    f"{foreground[r, c]:.3f} < {FG_FLOOR}): skipped"
                )
            positive = tuple(p for p in worm.positive if tuple(p) not in on_background)
            if positive:
                kept[worm_id] = WormSeeds(positive, worm.negative, worm.tau)
            elif worm_id > 0:
                _warn(f"{args.image}: worm {worm_id}{at} has no seed left on a worm: skipped")
        worms = kept
        if not worms:
            labels.append(np.zeros(image.shape[-2:], np.int64))
            continue
        instances = grow_instances(
            prediction, list(worms.values()), tau=tau, from_segments=segments, **options
        )
        labels.append(instances.to_labels())
        n_worms += len(instances)
        table = pd.DataFrame(measure(instances, image=image))
        table.insert(0, "worm", [w if w > 0 else None for w in worms])
        table.insert(0, "plane", plane)
        table.insert(0, "image", args.image.name)
        tables.append(table)
    args.out.mkdir(parents=True, exist_ok=True)
    write_labels(args.out / f"{name}_labels.tif", labels)
    csv = args.out / f"{name}_measurements.csv"
    if tables:
        pd.concat(tables, ignore_index=True).to_csv(csv, index=False)
    else:  # no worm grown: no table, and none left from an earlier run (--overwrite)
        csv.unlink(missing_ok=True)
    how = "from the automatic segments" if any_segments else f"tau {tau} unless the file sets one"
    print(
        f"{args.image}: {n_worms} worm(s) grown ({how}"
        f"{estimated_scale_note(args.scale, scales)}), "
        f"{time.perf_counter() - t0:.1f} s -> {args.out / name}_*"
    )
    return 0


def _warn(message: str) -> None:
    """Print ``napari-instseg grow: warning: <message>`` on stderr."""
    print(f"napari-instseg grow: warning: {message}", file=sys.stderr, flush=True)
