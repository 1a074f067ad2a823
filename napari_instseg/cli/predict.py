"""``napari-instseg predict``: predict and segment images, write labels, maps, measurements.

Example::

    napari-instseg predict images/*.tif --out results --method hybrid --save-maps

For every input ``<name>.tif`` (any file :func:`napari_instseg.core.io.read_image` reads;
a stack is processed plane by plane) it writes, in ``--out``:

- ``<name>_labels.tif``: the instance label image, (H, W) or (N, H, W) for a stack
  (where instances overlap, the smaller one's label is shown; see ``Instances.to_labels``);
- ``<name>_measurements.csv``: one row per instance (area, length, width, score, ...)
  with the plane index; with ``--measure-channel w1=_w2_:_w1_`` also each instance's mean
  intensity in another channel's file found beside the input (``mean_w1``: BBBC010's
  Sytox stain) and, for the ``--dead-channel`` (default ``w1``), the live/dead call
  (``dead``);
- with ``--save-maps``: ``<name>_embeddings.tif`` (D, H, W), ``<name>_seediness.tif``,
  ``<name>_boundary.tif`` and ``<name>_foreground.tif`` (H, W), float32, each with a
  leading plane axis for a stack.

No output is ever written onto an input; outputs of an earlier run in ``--out`` are
replaced only with ``--overwrite`` (else a clear error before any work). An image that
fails (unreadable, NaN, wrong channels, ...) is reported on stderr as
``napari-instseg predict: error: <file>: <message>``; the others are still processed and
the exit status is 1.

When ``--out`` ends with ``.zarr`` the inputs (files, folders, glob patterns, multi-page
TIFFs, zarr arrays) run as one dask job into a single OME-Zarr store instead: planes of any
size are cut into chunks with a halo, instances are stitched across chunk borders, and a
rerun resumes where a crash stopped (see :mod:`napari_instseg.core.batch` and docs/batch.md)::

    napari-instseg predict "plate/*.tif" --out plate.zarr --workers 2
    napari-instseg predict mosaic.zarr --out mosaic-result.zarr --chunk-size 2048
    napari-instseg predict plate/ --out plate.zarr --scheduler tcp://10.0.0.5:8786
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

METHODS = ("hybrid", "seeds", "boundary", "auto")
_MAPS = ("embeddings", "seediness", "boundary", "foreground")
#: ``core.device.PRECISIONS``, spelled out so that ``--help`` needs no torch import
PRECISIONS = ("auto", "float32", "bfloat16")
#: the smallest ``--halo`` of a batch (``core.batch`` checks it too)
MIN_HALO = 8


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``predict`` arguments.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The sub-command's parser.
    """
    parser.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="INPUT",
        help="image files (with --out *.zarr also folders, glob patterns and zarr stores)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder, or an OME-Zarr store (*.zarr): one dask batch job",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace outputs of an earlier run in the --out folder (default: refuse)",
    )
    parser.add_argument(
        "--model", help="weights file (.safetensors); default: the shipped BBBC010 model"
    )
    parser.add_argument(
        "--method",
        default="auto",
        choices=METHODS,
        help="automatic segmentation method (auto: the one the model's metadata recommends)",
    )
    parser.add_argument(
        "--tta",
        type=tta_arg,
        default="auto",
        help="test-time augmentation passes: 1, 2, 4 or 8 (auto: what the model was tuned "
        "with; 8 for the shipped model, 8x the network time)",
    )
    parser.add_argument("--scale", type=scale_arg, default=1.0, help=PREDICT_SCALE_HELP)
    parser.add_argument(
        "--contrast-outlines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="re-decide mask outlines by the image's contrast with the model's tuned "
        "thresholds, where it has them (default); --no-contrast-outlines: never",
    )
    parser.add_argument(
        "--debris-filter",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="drop compact convex instances (debris) where the model was tuned with it "
        "(default); --no-debris-filter: keep them",
    )
    parser.add_argument(
        "--device", default="auto", help="auto, cuda (cuda:1: a given GPU), mps or cpu"
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="what the network computes in: auto (default: bfloat16 on CUDA and on CPUs "
        "with hardware bfloat16, about twice as fast there; float32 elsewhere), float32 or "
        "bfloat16",
    )
    parser.add_argument(
        "--save-maps", action="store_true", help="also write the network's maps as TIFF"
    )
    parser.add_argument("--cache", type=Path, help="zarr cache folder for predictions")
    parser.add_argument(
        "--tile-size", type=int, default=1024, help="predict larger images in tiles"
    )
    parser.add_argument(
        "--channel-axis", type=int, help="axis of the stored array that holds the channels"
    )
    parser.add_argument(
        "--measure-channel",
        action="append",
        type=measure_channel_arg,
        metavar="NAME=FROM:TO",
        help="also measure each instance's mean intensity in another channel, a file beside "
        "each input named by replacing FROM with TO in the input's name (that name exactly, "
        "else the one file that starts with the name up to TO and has the input's "
        "extension); a column mean_NAME; repeatable. BBBC010's Sytox stain: "
        "--measure-channel w1=_w2_:_w1_ (a channel named as --dead-channel adds the "
        "live/dead call)",
    )
    parser.add_argument(
        "--dead-channel",
        default="w1",
        help="the --measure-channel whose stain marks dead worms: adds a column dead "
        "(default w1, BBBC010's Sytox)",
    )
    batch = parser.add_argument_group("batch into OME-Zarr (--out ending in .zarr)")
    batch.add_argument(
        "--chunk-size", type=int, default=1024, help="side of a chunk in pixels (1024)"
    )
    batch.add_argument("--halo", type=int, default=64, help="context around a chunk (64)")
    batch.add_argument(
        "--scheduler",
        help="dask.distributed scheduler address (tcp://HOST:8786); default: local",
    )
    batch.add_argument(
        "--workers",
        type=int,
        help="local worker processes (1: threads only; default: one per GPU when several "
        "CUDA GPUs are visible and --device is auto or cuda, which the workers then share "
        "out, else 1)",
    )
    batch.add_argument(
        "--threads",
        type=int,
        help="threads of the local scheduler (default: the cores this job may use), or of "
        "each worker with --workers > 1 (default 1)",
    )
    batch.add_argument(
        "--measurements",
        default="csv",
        choices=("csv", "parquet"),
        help="per-instance table format (parquet needs pyarrow)",
    )
    batch.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip chunks a previous run into --out finished (default); --no-resume starts afresh",
    )


def _segment_overrides(args: argparse.Namespace) -> dict[str, None]:
    """``segment`` keywords of ``--no-contrast-outlines`` / ``--no-debris-filter``.

    Empty when both are on: the model's tuned setting applies.
    """
    overrides: dict[str, None] = {}
    if not getattr(args, "contrast_outlines", True):
        overrides["edge_thresholds"] = None
    if not getattr(args, "debris_filter", True):
        overrides["blob_filter"] = None
    return overrides


def scale_arg(text: str) -> float | str:
    """Parse ``--scale``: ``auto`` or a resizing factor in [0.1, 10]."""
    from ..core.scale import check_scale

    try:
        return check_scale(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


#: Help of every command's ``--scale``.
SCALE_HELP = (
    "resize images by this factor before the model sees them, for worms wider (< 1) or "
    "narrower (> 1) than the model's (shipped model: about 8 px wide); auto: estimate it "
    "per image (default 1)"
)
#: ``predict``'s, which also batches into OME-Zarr.
PREDICT_SCALE_HELP = SCALE_HELP.replace(
    "per image", "per image, or with --out *.zarr once for the whole series"
)


def tta_arg(text: str) -> int | str:
    """Parse ``--tta``: ``auto`` or one of 1, 2, 4, 8."""
    if text == "auto":
        return text
    if text not in ("1", "2", "4", "8"):
        raise argparse.ArgumentTypeError(f"must be auto, 1, 2, 4 or 8, not {text!r}")
    return int(text)


def output_name(path: Path) -> str:
    """File name stem of an input, without ``.ome`` / ``.zarr`` / ``.tif`` endings."""
    name = path.name.rstrip("/")
    for suffix in (".zarr", ".tiff", ".tif", ".png", ".jpeg", ".jpg", ".bmp", ".ome"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name or path.stem


def check_outputs(
    out: Path, outputs: list[Path], inputs: list[Path], overwrite: bool = False
) -> None:
    """Refuse to write onto an input, or onto earlier outputs unless ``overwrite``.

    Parameters
    ----------
    out : Path
        The ``--out`` folder (may not exist yet).
    outputs : list of Path
        Every file the command will write.
    inputs : list of Path
        Every file it reads (images, seed tables): never overwritten, even with
        ``overwrite``.
    overwrite : bool
        ``--overwrite``: existing outputs may be replaced.

    Raises
    ------
    NotADirectoryError
        If ``out`` exists and is not a folder.
    ValueError
        If an output is one of the inputs.
    FileExistsError
        If outputs exist and ``overwrite`` is False.
    """
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a folder")
    read = {p.resolve() for p in inputs}
    onto_input = [str(p) for p in outputs if p.resolve() in read]
    if onto_input:
        raise ValueError(
            f"an output would overwrite the input {onto_input[0]}; choose another --out"
        )
    taken = [p.name for p in outputs if p.exists()]
    if taken and not overwrite:
        raise FileExistsError(
            f"{out} already holds {taken}; pass --overwrite to replace them, or choose "
            "another --out"
        )


def _check_plain_inputs(inputs: list[Path]) -> None:
    """Folders and glob patterns are batch inputs: say they need ``--out *.zarr``."""
    import glob

    from ..core.io import ZARR_SUFFIXES, _is_zarr

    for path in inputs:
        folder = path.is_dir() and not (path.suffix.lower() in ZARR_SUFFIXES or _is_zarr(path))
        if folder or (not path.exists() and glob.has_magic(str(path))):
            kind = "a folder" if folder else "a glob pattern"
            raise ValueError(
                f"{path} is {kind}: folders and glob patterns need --out <name>.zarr (one "
                "batch job into an OME-Zarr store); an --out folder takes image files"
            )


def write_labels(path: Path, labels: list[np.ndarray]) -> None:
    """Write per-plane label images as one TIFF: (H, W) for one plane, else (N, H, W).

    uint16 when the labels fit, else uint32; zlib-compressed.
    """
    import tifffile

    label_stack = np.stack(labels)
    dtype = np.uint16 if label_stack.max(initial=0) < 2**16 else np.uint32
    label_stack = label_stack.astype(dtype)
    tifffile.imwrite(path, label_stack[0] if len(labels) == 1 else label_stack, compression="zlib")


def _load_model(weights: str | None, device: str):
    from ..core.weights import load_model, shipped_weights_path

    if weights is None and not shipped_weights_path().is_file():
        raise FileNotFoundError(
            f"no shipped model at {shipped_weights_path()}; pass --model WEIGHTS.safetensors"
        )
    from ..core.device import get_device

    return load_model(weights, device=get_device(device))


def measure_channel_arg(text: str) -> tuple[str, str, str]:
    """``NAME=FROM:TO`` of ``--measure-channel`` as (name, from, to)."""
    name, eq, rule = text.partition("=")
    old, colon, new = rule.partition(":")
    if not (eq and colon and name.strip() and old and new) or old == new:
        raise argparse.ArgumentTypeError(
            f"expected NAME=FROM:TO (e.g. w1=_w2_:_w1_: the channel w1 is the file named like "
            f"the input with _w2_ replaced by _w1_), got {text!r}"
        )
    return name.strip(), old, new


def find_channel_file(path: Path, old: str, new: str) -> Path:
    """The file of another channel beside ``path``: its name with ``old`` replaced by ``new``.

    That name exactly when such a file exists; else the one file in the same folder whose
    name starts with the name up to ``new`` and ends with the input's extension (BBBC010's
    channels differ in a random suffix: ``..._A01_w2_<GUID>.tif``, ``..._A01_w1_<GUID>.tif``).

    Parameters
    ----------
    path : Path
        The input image.
    old, new : str
        What to replace in its file name, and by what.

    Returns
    -------
    Path
        The channel's file.

    Raises
    ------
    ValueError
        If the name has no ``old``, or several files fit.
    FileNotFoundError
        If no file fits.
    """
    import glob

    name = path.name
    at = name.find(old)
    if at < 0:
        raise ValueError(f"its name has no {old!r} to replace by {new!r} for the channel file")
    exact = path.with_name(name[:at] + new + name[at + len(old) :])
    if exact.is_file():
        return exact
    prefix = name[:at] + new
    pattern = glob.escape(prefix) + "*" + glob.escape(path.suffix)
    found = sorted(p for p in path.parent.glob(pattern) if p.is_file() and p != path)
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(
            f"no channel file: neither {exact.name} nor {prefix}*{path.suffix} in {path.parent}"
        )
    names = ", ".join(p.name for p in found[:4])
    raise ValueError(f"several files could be its channel ({names}): make FROM:TO more specific")


def _read_channels(args: argparse.Namespace, path: Path, planes: int) -> dict[str, np.ndarray]:
    """The ``--measure-channel`` images of one input, each (planes, H, W)."""
    from ..core.io import read_image

    channels = {}
    for name, old, new in args.measure_channel or ():
        file = find_channel_file(path, old, new)
        data = read_image(file)  # (N, C, H, W)
        if data.shape[1] != 1:
            raise ValueError(f"channel {name} ({file.name}) has {data.shape[1]} channels, not 1")
        if len(data) not in (1, planes):
            raise ValueError(
                f"channel {name} ({file.name}) has {len(data)} planes; the image has {planes}"
            )
        channels[name] = np.broadcast_to(data[:, 0], (planes, *data.shape[-2:]))
    return channels


def _warn_stain_inputs(inputs: list[Path], measure_channel: list | None) -> None:
    """Say on stderr which inputs are BBBC010 Sytox (w1) files, which the model does not read.

    The shipped model segments bright-field (w2): on the fluorescence it finds nothing.
    """
    from ..core.io import bbbc010_channel

    stains = [p for p in inputs if bbbc010_channel(p) == "w1"]
    if not stains:
        return
    named = ", ".join(p.name for p in stains[:3]) + (" ..." if len(stains) > 3 else "")
    hint = (
        "leave them out of the inputs (e.g. images/*_w2_*.tif)"
        if measure_channel
        else "predict the _w2_ files and measure these with --measure-channel w1=_w2_:_w1_"
    )
    print(
        f"napari-instseg predict: warning: {named}: BBBC010's Sytox fluorescence (w1), not "
        f"the bright-field (w2) the model segments; {hint}",
        file=sys.stderr,
    )


def _segmenter():
    try:
        from ..core.instances import segment
    except ImportError as err:  # pragma: no cover - the module ships with the package
        raise RuntimeError(
            f"automatic segmentation (napari_instseg.core.instances) is unavailable: {err}"
        ) from err
    return segment


def _measurer():
    try:
        from ..core.measure import measure
    except ImportError:  # pragma: no cover - the module ships with the package
        return None
    return measure


def run(args: argparse.Namespace) -> int:
    """Predict, segment and write the results of every input.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments of :func:`configure`.

    Returns
    -------
    int
        0 on success, 1 when an image failed (each failure is reported on stderr).
    """
    batch = str(args.out).rstrip("/").lower().endswith(".zarr")
    if batch and args.chunk_size < 16:
        raise ValueError(f"--chunk-size must be at least 16, got {args.chunk_size}")
    if batch and args.halo < MIN_HALO:
        raise ValueError(
            f"--halo must be at least {MIN_HALO} (instances are matched in the overlap), "
            f"got {args.halo}"
        )
    _warn_ignored(args, batch)
    if batch:
        return _run_batch(args)
    _check_plain_inputs(args.inputs)
    missing = [str(p) for p in args.inputs if not p.exists()]
    if missing:
        raise FileNotFoundError(f"input(s) not found: {', '.join(missing)}")
    names = [output_name(p) for p in args.inputs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"several inputs would write the same outputs: {repeated}")
    if args.tile_size < 16:
        raise ValueError("--tile-size must be at least 16")
    _warn_stain_inputs(args.inputs, args.measure_channel)
    segment, measure = _segmenter(), _measurer()
    suffixes = ["labels.tif"] + (["measurements.csv"] if measure is not None else [])
    # maps of an earlier --save-maps run count too: new labels beside them would not match
    suffixes += [f"{key}.tif" for key in _MAPS]
    outputs = [args.out / f"{n}_{suffix}" for n in names for suffix in suffixes]
    check_outputs(args.out, outputs, list(args.inputs), args.overwrite)
    model = _load_model(args.model, args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path, name in zip(args.inputs, names, strict=True):
        try:
            _predict_one(args, path, name, model, segment, measure)
        except (OSError, ValueError) as err:
            failed += 1
            print(f"napari-instseg predict: error: {path}: {err}", file=sys.stderr, flush=True)
    return 1 if failed else 0


def _predict_one(args: argparse.Namespace, path: Path, name: str, model, segment, measure):
    """Predict, segment and write the outputs of one input file."""
    import pandas as pd
    import tifffile

    from ..core.io import read_image
    from ..core.predict import colour_to_grey, predict

    t0 = time.perf_counter()
    stack = read_image(path, channel_axis=args.channel_axis)  # (N, C, H, W)
    channels = _read_channels(args, path, len(stack))
    in_channels = model.config.in_channels
    labels, maps, tables, n_instances = [], {k: [] for k in _MAPS}, [], 0
    scales: list[float] = []
    for plane, image in enumerate(stack):
        # one grey channel; a colour (RGB/RGBA) file as its luminance for a grey model
        image = image[0] if image.shape[0] == 1 else colour_to_grey(image, in_channels)
        prediction = predict(
            image,
            model,
            args.device,
            tile_size=args.tile_size,
            tta=args.tta,
            cache=args.cache,
            scale=args.scale,
            precision=args.precision,
        )
        scales.append(float(prediction.metadata.get("scale", 1.0)))
        instances = segment(prediction, args.method, **_segment_overrides(args))
        labels.append(instances.to_labels())
        n_instances += len(instances)
        if args.save_maps:
            for key in _MAPS:
                maps[key].append(getattr(prediction, key).astype(np.float32))
        if measure is not None:
            extra = {name: planes[plane] for name, planes in channels.items()}
            table = pd.DataFrame(
                measure(instances, image=image, channels=extra, dead_channel=args.dead_channel)
            )
            table.insert(0, "plane", plane)
            table.insert(0, "image", path.name)
            tables.append(table)
    single = len(stack) == 1
    write_labels(args.out / f"{name}_labels.tif", labels)
    for key, arrays in maps.items():
        target = args.out / f"{name}_{key}.tif"
        if args.save_maps:
            tifffile.imwrite(target, arrays[0] if single else np.stack(arrays))
        else:  # an earlier run's map (replaced only with --overwrite) would not match
            target.unlink(missing_ok=True)
    if tables:
        pd.concat(tables, ignore_index=True).to_csv(
            args.out / f"{name}_measurements.csv", index=False
        )
    print(
        f"{path}: {len(stack)} plane(s), {n_instances} instance(s) "
        f"({args.method}{estimated_scale_note(args.scale, scales)}), "
        f"{time.perf_counter() - t0:.1f} s -> {args.out / name}_*"
    )


def estimated_scale_note(scale_arg_value: float | str, scales: list[float]) -> str:
    """Say which factor ``--scale auto`` chose, for the line printed per image.

    Parameters
    ----------
    scale_arg_value : float or str
        The parsed ``--scale``: a number, or ``"auto"``.
    scales : list of float
        The factor each processed plane was predicted at (``metadata["scale"]``).

    Returns
    -------
    str
        ``", estimated scale 0.6"`` (one factor per plane, comma-separated, for a stack
        whose planes differ) with ``--scale auto``; empty otherwise, or when no plane ran.
    """
    if scale_arg_value != "auto" or not scales:
        return ""
    distinct = list(dict.fromkeys(round(s, 3) for s in scales))
    shown = ", ".join(f"{s:g}" for s in (distinct if len(distinct) == 1 else scales))
    return f", estimated scale {shown}"


#: options of one kind of run only, with their defaults: (batch only, plain only)
_BATCH_ONLY = {
    "chunk_size": 1024, "halo": 64, "scheduler": None, "workers": None, "threads": None,
    "measurements": "csv", "resume": True,
}  # fmt: skip
_PLAIN_ONLY = {
    "tile_size": 1024, "cache": None, "overwrite": False, "measure_channel": None,
}  # fmt: skip


def _warn_ignored(args: argparse.Namespace, batch: bool) -> None:
    """Say on stderr which given options the kind of run (``--out *.zarr`` or not) ignores."""
    unused = _PLAIN_ONLY if batch else _BATCH_ONLY
    given = [
        "--" + key.replace("_", "-") if getattr(args, key) is not False else "--no-resume"
        for key, default in unused.items()
        if getattr(args, key, default) != default
    ]
    if given:
        kind = "with --out *.zarr (a batch)" if batch else "without --out *.zarr"
        verb = "has" if len(given) == 1 else "have"
        print(
            f"napari-instseg predict: warning: {', '.join(given)} {verb} no effect {kind}",
            file=sys.stderr,
        )


def _run_batch(args: argparse.Namespace) -> int:
    """``--out *.zarr``: one dask job into an OME-Zarr store; 1 when inputs were skipped."""
    from ..core.batch import run_batch

    if args.model is None:
        from ..core.weights import shipped_weights_path

        if not shipped_weights_path().is_file():
            raise FileNotFoundError(
                f"no shipped model at {shipped_weights_path()}; pass --model WEIGHTS.safetensors"
            )
    shown: dict[str, int] = {}
    t0 = time.perf_counter()  # this call's time: a finished store's report keeps its run's

    def progress(stage: str, done: int, total: int) -> None:
        step = max(1, total // 20)
        if done == total or done - shown.get(stage, 0) >= step:
            shown[stage] = done
            print(f"{stage}: {done}/{total}", flush=True)

    result = run_batch(
        args.inputs,
        args.out,
        model=args.model,
        device=args.device,
        method=args.method,
        segment_params=_segment_overrides(args),
        chunk_size=args.chunk_size,
        halo=args.halo,
        tta=args.tta,
        scale=args.scale,
        precision=args.precision,
        save_maps=args.save_maps,
        measurements=args.measurements,
        resume=args.resume,
        scheduler=args.scheduler,
        workers=args.workers,
        threads=args.threads,
        channel_axis=args.channel_axis,
        progress=progress,
    )
    report = result.report
    chunks = report["chunks"]
    print(
        f"{args.out}: {report['planes']} image(s) of {report['shape'][2]} x "
        f"{report['shape'][3]}, {report['instances']} instance(s); chunks: "
        f"{chunks['computed']} computed, {chunks['skipped']} already done, "
        f"{chunks['failed']} failed ({time.perf_counter() - t0:.1f} s, {report['scheduler']})"
    )
    if report.get("devices"):
        used = ", ".join(
            f"{device}" if worker == "local" else f"worker {worker} {device}"
            for worker, device in report["devices"].items()
        )
        print(f"network on {used}")
    if report.get("scale_estimates") is not None:
        estimates = ", ".join(f"{v:g}" for v in report["scale_estimates"])
        print(
            f"scale {report['scale']:g} for every image (the median of the estimates "
            f"{estimates} on the first, middle and last image)"
        )
    for item in report["skipped_inputs"]:
        print(f"skipped {item['path']}: {item['error']}", file=sys.stderr)
    for item in report["failed_chunks"]:
        print(f"failed chunk {item['chunk']} of {item['input']}: {item['error']}", file=sys.stderr)
    if not result.ok:
        retry = "; rerun the same command to retry the failed chunks" if chunks["failed"] else ""
        print(f"see {args.out}/report.json{retry}", file=sys.stderr)
        return 1
    return 0
