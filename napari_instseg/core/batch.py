"""Batch prediction of many and of large images with dask; results in one OME-Zarr store.

:func:`run_batch` takes input files, folders, glob patterns, multi-page TIFFs and zarr
arrays, cuts every 2D plane into chunks, predicts and segments each chunk with a halo of
context (a ``dask.delayed`` task per chunk), stitches the instances across chunk borders
and writes one OME-Zarr image that napari opens (with the ``napari-ome-zarr`` plugin)::

    OUT.zarr/
      0, 1, ...          the input images, (image, c, y, x), a pyramid of 2x levels
      labels/instances/  the instance labels, (image, y, x) uint32, same pyramid
      maps/<name>/       with save_maps: embeddings (image, c, y, x), seediness,
                         boundary, foreground (image, y, x) float32, each an OME-Zarr image
      measurements.csv   one row per instance (or measurements.parquet)
      report.json        inputs, skipped inputs and failed chunks with their errors
      .work/             plan, per-plane normalisation, per-chunk done markers (resume)

Every plane is one entry of the ``image`` axis, so all planes must share their size and
channels: inputs of another size are reported and skipped (run them separately).

**Chunks and memory.** A plane is cut into a grid of ``chunk_size`` squares (the *cores*,
which are also the zarr chunks of every output, so concurrent writers never share a zarr
chunk). A task reads its core plus ``halo`` pixels on every side (the *window*; its start is
rounded down to a multiple of the network's divisor so the pooling grid is the global one),
normalises it with the plane's percentiles (computed once per plane from a strided
subsample, see :func:`normalization_stats`), runs the network with the window's global
offset (semi-convolutional coordinates stay global), segments the window, and keeps the
core. Peak memory is that of a few windows (one per worker thread), never a whole plane.

**Stitching rule.** Each task keeps its window's label image. Afterwards, for every pair of
neighbouring chunks A and B (8-neighbourhood), the label images of both are compared on
the overlap where A saw B's core with context: ``core(B) & (core(A) grown by halo // 2)``,
and the same with A and B swapped. Two labels, one from each chunk, are the same instance
when their intersection over union *on that overlap* is at least ``min_iou`` (0.5)
(:func:`match_overlap`). Matches are merged with connected components (a union-find); the
merged instance keeps every chunk's core pixels, so a worm crossing a border is one
instance. Final labels are numbered 1..K per plane in the order of the chunks (row-major)
and of the labels inside the first chunk holding them. Measurements of the core pieces are
combined: sums of area and skeleton length, area-weighted means of intensities, score and
centroid, the union of bounding boxes, and the class of the largest piece.

**Resume.** A chunk writes its data first, then a done marker (atomically, a JSON file
that also holds its measurements). A rerun with the same inputs, model and parameters skips
chunks with a marker; a different run into the same store is refused. A chunk that raises
is recorded in the report and its plane is marked incomplete; rerunning computes only the
missing chunks and stitches again.

**Schedulers.** ``scheduler=None`` or ``"threads"``: dask's local threads (``threads`` of
them); ``workers > 1``: a ``dask.distributed.LocalCluster`` of that many single-machine
processes; an address (``"tcp://host:8786"``) or a ``distributed.Client``: an existing
cluster, whose workers must see ``out`` and the inputs at the same paths.

**Devices.** With ``device`` ``"auto"`` or ``"cuda"`` and several CUDA GPUs visible, the
processes of a local cluster share them out: worker ``i`` (its name in the
``LocalCluster``) runs the network on ``cuda:(i % n_gpus)`` (:func:`local_worker_devices`),
and ``workers`` defaults to one process per GPU (:func:`default_workers`). An explicit
device (``"cuda:1"``, ``"cpu"``) is used by every worker as given. The workers of an
existing cluster each take their own best device
(:func:`~napari_instseg.core.device.get_device`; a cluster that gives every worker its own
GPU, e.g. with ``CUDA_VISIBLE_DEVICES``, spreads them). The report says which device each
worker used (``report["devices"]``).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import math
import os
import shutil
import threading
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .edges import local_contrast
from .io import (
    PLAIN_SUFFIXES,
    TIFF_SUFFIXES,
    ZARR_SUFFIXES,
    _is_zarr,
    _ome_axes,
    _to_nchw,
    path_list,
    read_image,
)
from .scale import check_scale, resize_image, resize_prediction
from .types import Instances, Prediction

__all__ = [
    "BatchPlan",
    "BatchResult",
    "default_workers",
    "estimate_batch_scale",
    "Chunk",
    "find_inputs",
    "local_worker_devices",
    "match_overlap",
    "normalization_stats",
    "normalize_window",
    "open_input",
    "plan_batch",
    "predict_window",
    "run_batch",
]

#: Version of the store layout; part of every plan key.
LAYOUT_VERSION = 1
#: Name of the labels image under ``labels/``.
LABELS_NAME = "instances"
#: Maps written with ``save_maps`` (``Prediction`` attribute names).
MAP_NAMES = ("embeddings", "seediness", "boundary", "foreground")
#: Largest number of pixels read per plane to estimate its normalisation percentiles.
STATS_PIXELS = 1 << 22
_IMAGE_AXIS = {"name": "image", "type": "image"}
_C_AXIS = {"name": "c", "type": "channel"}
_YX_AXES = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
_INPUT_SUFFIXES = TIFF_SUFFIXES + PLAIN_SUFFIXES + ZARR_SUFFIXES
_WORK = ".work"


# --------------------------------------------------------------------------- inputs


def find_inputs(
    inputs: str | Path | Iterable[str | Path],
) -> tuple[list[Path], list[dict[str, str]]]:
    """Expand folders and glob patterns into image files and zarr stores.

    Parameters
    ----------
    inputs : str, Path or iterable of str or Path
        Files (TIFF, PNG, JPEG, BMP), zarr stores, folders (their images and zarr stores,
        not recursive, hidden files left out) and glob patterns (``"plate/*.tif"``); a
        single ``str`` or ``Path`` is one input.

    Returns
    -------
    paths : list of Path
        The inputs found, in the order given (a folder's and a pattern's sorted by name),
        each once.
    errors : list of dict
        ``{"path", "error"}`` for inputs that do not exist or match nothing.
    """
    paths: list[Path] = []
    errors: list[dict[str, str]] = []
    for item in path_list(inputs):
        path = Path(item)
        if path.is_dir() and not (_suffix(path) in ZARR_SUFFIXES or _is_zarr(path)):
            found = [
                p
                for p in sorted(path.iterdir())
                if not p.name.startswith(".")
                and (
                    (p.is_file() and _suffix(p) in TIFF_SUFFIXES + PLAIN_SUFFIXES)
                    or (p.is_dir() and (_suffix(p) in ZARR_SUFFIXES or _is_zarr(p)))
                )
            ]
            if not found:
                errors.append({"path": str(path), "error": "folder holds no image files"})
            paths.extend(found)
        elif path.exists():
            paths.append(path)
        elif glob.has_magic(str(item)):
            found = [Path(p) for p in sorted(glob.glob(str(item)))]
            if not found:
                errors.append({"path": str(item), "error": "no file matches this pattern"})
            paths.extend(found)
        else:
            errors.append({"path": str(item), "error": "no such file or folder"})
    unique = list(OrderedDict((p.resolve(), p) for p in paths).values())
    return unique, errors


def _suffix(path: Path) -> str:
    return path.suffix.lower()


class _Opened:
    """An open input: the handle that must stay open and the lazy (N, C, H, W) array."""

    def __init__(self, array: Any, handle: Any = None) -> None:
        self.array = array
        self.handle = handle

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


_OPEN: OrderedDict[tuple[Any, ...], _Opened] = OrderedDict()
_OPEN_LOCK = threading.Lock()
_OPEN_MAX = 8


def open_input(path: str | Path, channel_axis: int | None = None):
    """Open an image file or zarr store lazily as a dask array ``(N, C, H, W)``.

    Nothing is read until the array is computed, so windows of images larger than memory
    can be read one by one: zarr stores and tiled or strip-compressed TIFFs chunk by
    chunk, uncompressed TIFFs through a memory map. PNG, JPEG and BMP files are read whole.
    Axes follow :func:`napari_instseg.core.io.read_image`. Open files are cached per
    process (a few at a time).

    Parameters
    ----------
    path : str or Path
        The input.
    channel_axis : int, optional
        Axis of the stored array holding the channels (see ``read_image``).

    Returns
    -------
    dask.array.Array
        ``(N, C, H, W)`` in the file's dtype.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file cannot be read as an image.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No such image file or zarr store: {path}")
    st = path.stat()  # a file rewritten in place is opened again
    key = (str(path.resolve()), channel_axis, st.st_mtime_ns, st.st_size)
    with _OPEN_LOCK:
        if key in _OPEN:
            _OPEN.move_to_end(key)
            return _OPEN[key].array
    opened = _open(path, channel_axis)
    with _OPEN_LOCK:
        _OPEN[key] = opened
        while len(_OPEN) > _OPEN_MAX:
            _OPEN.popitem(last=False)[1].close()
    return opened.array


def _open(path: Path, channel_axis: int | None) -> _Opened:
    import dask.array as da

    suffix = _suffix(path)
    handle = None
    try:
        if suffix in TIFF_SUFFIXES:
            import tifffile
            import zarr

            handle = tifffile.TiffFile(path)
            if not handle.series:
                raise ValueError("the TIFF holds no image data")
            series = handle.series[0]
            axes = series.axes
            try:  # contiguous and uncompressed: a memory map reads only what is asked
                data = tifffile.memmap(path, series=0, mode="r")
                arr = da.from_array(data, chunks=(1,) * (data.ndim - 2) + (1024, 1024))
            except ValueError:
                node = zarr.open(series.aszarr(), mode="r")
                if not hasattr(node, "shape"):  # a pyramid: level 0
                    node = node["0"]
                arr = da.from_zarr(node)
        elif suffix in PLAIN_SUFFIXES:
            arr = da.from_array(read_image(path, channel_axis=channel_axis))
            return _Opened(arr)
        elif suffix in ZARR_SUFFIXES or _is_zarr(path):
            node, axes = _zarr_node(path)
            arr = da.from_zarr(node)
        else:
            raise ValueError(
                f"unknown file type {suffix or '(none)'!r}; expected one of "
                f"{', '.join(_INPUT_SUFFIXES)}"
            )
        if axes is not None and len(axes) != arr.ndim:
            axes = None
        return _Opened(_to_nchw(arr, axes, channel_axis, str(path)), handle)
    except Exception as err:
        if handle is not None:
            handle.close()
        if isinstance(err, ValueError) and str(path) in str(err):
            raise
        raise ValueError(f"{path}: cannot read it as an image: {err}") from err


def _zarr_node(path: Path) -> tuple[Any, str | None]:
    """The array of a zarr store: itself, a multiscale level 0, array "0" or the first."""
    import zarr

    node = zarr.open(str(path), mode="r")
    axes = None
    if isinstance(node, zarr.Group):
        attrs = dict(node.attrs)
        multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
        if multiscales:
            key = multiscales[0]["datasets"][0]["path"]
            axes = _ome_axes(multiscales[0].get("axes", []))
        elif "0" in node:
            key = "0"
        else:
            arrays = sorted(name for name, _ in node.arrays())
            if not arrays:
                raise ValueError("the zarr group holds no arrays")
            key = arrays[0]
        node = node[key]
    return node, axes


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Chunk:
    """One task: a core region of one plane and the window read around it.

    Attributes
    ----------
    plane : int
        Index of the plane on the output's ``image`` axis.
    row, col : int
        Position in the plane's chunk grid.
    core : tuple of int
        ``(r0, r1, c0, c1)``, the pixels this chunk owns (a zarr chunk of the outputs).
    window : tuple of int
        ``(r0, r1, c0, c1)``, the core with its halo, clipped to the plane.
    """

    plane: int
    row: int
    col: int
    core: tuple[int, int, int, int]
    window: tuple[int, int, int, int]

    @property
    def key(self) -> str:
        """``"<plane>-<row>-<col>"``, the name of its done marker."""
        return f"{self.plane}-{self.row}-{self.col}"


@dataclass
class BatchPlan:
    """What a batch run does: its planes, their size and the chunk grid.

    Attributes
    ----------
    sources : list of dict
        Readable inputs in the batch: ``path``, ``shape`` (N, C, H, W), ``dtype``.
    planes : list of tuple of int
        ``(source index, plane in that source)`` for each entry of the ``image`` axis.
    shape : tuple of int
        ``(C, H, W)`` shared by all planes.
    dtype : str
        Dtype of the stored images (the common type of all inputs).
    chunk_size, halo, divisor : int
        Core size, context on every side, window start rounding.
    errors : list of dict
        Inputs left out, ``{"path", "error"}``.
    """

    sources: list[dict[str, Any]]
    planes: list[tuple[int, int]]
    shape: tuple[int, int, int]
    dtype: str
    chunk_size: int
    halo: int
    divisor: int = 1
    errors: list[dict[str, str]] = field(default_factory=list)

    @property
    def grid(self) -> tuple[int, int]:
        """Chunks per plane along rows and columns."""
        _, h, w = self.shape
        return math.ceil(h / self.chunk_size), math.ceil(w / self.chunk_size)

    @property
    def window_shape(self) -> tuple[int, int]:
        """Largest window (rows, cols)."""
        _, h, w = self.shape
        extra = 2 * self.halo + self.divisor
        return min(h, self.chunk_size + extra), min(w, self.chunk_size + extra)

    def chunks(self, plane: int | None = None) -> list[Chunk]:
        """All chunks (of one plane, or of every plane), plane by plane, row-major."""
        _, h, w = self.shape
        s, halo, div = self.chunk_size, self.halo, self.divisor
        rows, cols = self.grid
        planes = range(len(self.planes)) if plane is None else [plane]
        out = []
        for n in planes:
            for i in range(rows):
                r0, r1 = i * s, min((i + 1) * s, h)
                wr0, wr1 = max(r0 - halo, 0) // div * div, min(r1 + halo, h)
                for j in range(cols):
                    c0, c1 = j * s, min((j + 1) * s, w)
                    wc0, wc1 = max(c0 - halo, 0) // div * div, min(c1 + halo, w)
                    out.append(Chunk(n, i, j, (r0, r1, c0, c1), (wr0, wr1, wc0, wc1)))
        return out

    def source_of(self, plane: int) -> tuple[str, int]:
        """Path and plane index inside it for an output plane."""
        src, p = self.planes[plane]
        return self.sources[src]["path"], p


def plan_batch(
    inputs: str | Path | Iterable[str | Path],
    chunk_size: int = 1024,
    halo: int = 64,
    divisor: int = 1,
    channel_axis: int | None = None,
    in_channels: int | None = None,
) -> BatchPlan:
    """Find and open the inputs, keep those of the batch's size, and lay out the chunks.

    The batch's plane size ``(C, H, W)`` is the one most inputs have (the first such input
    on a tie); inputs of another size or channel count, inputs that cannot be read and
    patterns that match nothing end in ``errors``.

    Parameters
    ----------
    inputs : str, Path or iterable of str or Path
        See :func:`find_inputs`.
    chunk_size : int
        Side of a chunk's core, pixels.
    halo : int
        Context read on every side of a core, pixels.
    divisor : int
        Window starts are rounded down to multiples of this (the network's divisor).
    channel_axis : int, optional
        See :func:`open_input`.
    in_channels : int, optional
        Channels the model takes; inputs with others are left out.

    Returns
    -------
    BatchPlan
        The plan.

    Raises
    ------
    ValueError
        For bad parameters, or when no input can be used (the message lists why).
    """
    if int(chunk_size) != chunk_size or chunk_size < 16:
        raise ValueError(f"chunk size must be an integer >= 16, got {chunk_size!r}")
    if int(halo) != halo or halo < 8:
        raise ValueError(
            f"halo must be an integer >= 8 (instances are matched in the overlap), got {halo!r}"
        )
    paths, errors = find_inputs(inputs)
    sources = []
    for path in paths:
        try:
            arr = open_input(path, channel_axis)
        except (OSError, ValueError) as err:
            errors.append({"path": str(path), "error": str(err)})
            continue
        shape = tuple(int(s) for s in arr.shape)
        if in_channels is not None and shape[1] != in_channels:
            errors.append(
                {
                    "path": str(path),
                    "error": f"has {shape[1]} channel(s) (shape N, C, H, W = {shape}); "
                    f"the model takes {in_channels}"
                    + (
                        " (a colour image: convert it to grey, or run "
                        "napari-instseg predict on it with --out a folder)"
                        if in_channels == 1 and shape[1] in (3, 4)
                        else ""
                    ),
                }
            )
            continue
        sources.append({"path": str(path), "shape": shape, "dtype": str(arr.dtype)})
    if not sources:
        why = "; ".join(f"{e['path']}: {e['error']}" for e in errors) or "no inputs given"
        raise ValueError(f"no readable input images ({why})")
    sizes = Counter(tuple(s["shape"][1:]) for s in sources)
    best = max(sizes.values())
    shape = next(tuple(s["shape"][1:]) for s in sources if sizes[tuple(s["shape"][1:])] == best)
    kept = []
    for src in sources:
        if tuple(src["shape"][1:]) == shape:
            kept.append(src)
        else:
            c, h, w = src["shape"][1:]
            errors.append(
                {
                    "path": src["path"],
                    "error": f"size {h} x {w} with {c} channel(s) differs from the batch's "
                    f"{shape[1]} x {shape[2]} with {shape[0]} (one store holds images of "
                    "one size; run it separately)",
                }
            )
    dtype = str(np.result_type(*[np.dtype(s["dtype"]) for s in kept]))
    planes = [(i, p) for i, src in enumerate(kept) for p in range(src["shape"][0])]
    return BatchPlan(
        sources=kept,
        planes=planes,
        shape=shape,  # type: ignore[arg-type]
        dtype=dtype,
        chunk_size=int(chunk_size),
        halo=int(halo),
        divisor=max(1, int(divisor)),
        errors=errors,
    )


# --------------------------------------------------------------------------- normalisation


def normalization_stats(
    sample: np.ndarray,
    input_norm: str = "percentile",
    low: float = 1.0,
    high: float = 99.8,
    flatfield_sigma: float = 16.0,
    stride: int = 1,
) -> dict[str, Any]:
    """Per-channel numbers that normalise a whole plane, from a (strided) sample of it.

    With ``stride = 1`` (the sample is the whole plane) :func:`normalize_window` of the
    whole plane equals :func:`napari_instseg.core.normalize.model_input`. A larger plane
    is sampled every ``stride`` pixels; the flat-field percentiles then come from the
    sample blurred with ``flatfield_sigma / stride``.

    Parameters
    ----------
    sample : np.ndarray
        ``(C, h, w)`` raw intensities, every ``stride``-th pixel of the plane.
    input_norm : {"percentile", "flatfield"}
        The model's input normalisation.
    low, high : float
        Percentiles mapped to 0 and 1.
    flatfield_sigma : float
        Blur of the flat-field estimate (full-resolution pixels).
    stride : int
        Sampling step of ``sample``.

    Returns
    -------
    dict
        JSON-ready: ``low``/``high`` per channel, and for ``"flatfield"`` also ``floor``,
        ``flat_low``/``flat_high`` per channel; plus the parameters.
    """
    from scipy import ndimage

    from .normalize import INPUT_NORMS

    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input normalisation must be one of {INPUT_NORMS}, not {input_norm!r}")
    sample = np.asarray(sample, np.float32)
    if sample.ndim != 3:
        raise ValueError(f"sample must be (C, h, w), got shape {sample.shape}")
    if not np.isfinite(sample).all():
        raise ValueError("image contains NaN or infinite values")
    stats: dict[str, Any] = {
        "input_norm": input_norm,
        "stride": int(stride),
        "flatfield_sigma": float(flatfield_sigma),
        "low": [],
        "high": [],
    }
    for chan in sample:
        lo, hi = np.percentile(chan, [low, high])
        stats["low"].append(float(lo))
        stats["high"].append(float(hi))
    if input_norm == "flatfield":
        stats.update(floor=[], flat_low=[], flat_high=[])
        for chan in sample:
            floor = 0.01 * max(float(np.percentile(chan, 99.8)), 1e-6)
            blur = ndimage.gaussian_filter(chan, flatfield_sigma / stride, mode="reflect")
            flat = chan / (np.abs(blur) + floor)
            lo, hi = np.percentile(flat, [low, high])
            stats["floor"].append(floor)
            stats["flat_low"].append(float(lo))
            stats["flat_high"].append(float(hi))
    return stats


def _scale(chan: np.ndarray, lo: float, hi: float, eps: float = 1e-6) -> np.ndarray:
    # the arithmetic of normalize_percentile: float64 percentiles, float32 result
    lo64, hi64 = np.float64(lo), np.float64(hi)
    return ((chan - lo64) / max(hi64 - lo64, eps)).astype(np.float32)


def normalize_window(window: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """What the network sees for a window, normalised with its plane's numbers.

    Parameters
    ----------
    window : np.ndarray
        ``(C, h, w)`` raw intensities. For ``"flatfield"`` it should reach
        ``4 * flatfield_sigma`` beyond the pixels that are used (the blur's support).
    stats : dict
        From :func:`normalization_stats`.

    Returns
    -------
    np.ndarray
        float32 ``(C, h, w)``, or ``(2C, h, w)`` for ``"flatfield"``.
    """
    from scipy import ndimage

    window = np.asarray(window, np.float32)
    if not np.isfinite(window).all():
        raise ValueError("image contains NaN or infinite values")
    lows, highs = stats["low"], stats["high"]
    out = [_scale(chan, lo, hi) for chan, lo, hi in zip(window, lows, highs, strict=True)]
    if stats["input_norm"] == "flatfield":
        sigma = stats["flatfield_sigma"]
        for c, chan in enumerate(window):
            blur = ndimage.gaussian_filter(chan, sigma, mode="reflect")
            flat = chan / (np.abs(blur) + stats["floor"][c])
            out.append(_scale(flat, stats["flat_low"][c], stats["flat_high"][c]))
    return np.stack(out).astype(np.float32, copy=False)


# --------------------------------------------------------------------------- prediction


def predict_window(
    x: np.ndarray,
    model: Any,
    device: Any = "cpu",
    origin: tuple[int, int] = (0, 0),
    tile_size: int | None = None,
    halo: int = 64,
    tta: int = 1,
    precision: str = "auto",
) -> Prediction:
    """Run the network on an already normalised window placed at ``origin`` in its plane.

    Same tiling as :func:`napari_instseg.core.predict.iter_predict` (tiles start on
    multiples of the model's divisor, ``halo`` context cropped away), but the input is
    normalised by the caller (with the whole plane's numbers) and the semi-convolutional
    coordinates are offset by ``origin``, so windows of a large plane agree with a
    prediction of the whole plane.

    Parameters
    ----------
    x : np.ndarray
        ``(C_net, h, w)`` float32 from :func:`normalize_window`.
    model : InstSegNet
        The network.
    device : str or torch.device
        Where it runs.
    origin : tuple of int
        Global ``(row, col)`` of the window's first pixel; multiples of the divisor.
    tile_size : int, optional
        Tile windows larger than this (default: never).
    halo : int
        Context of the tiles.
    tta : int
        Test-time augmentation passes (see :func:`napari_instseg.core.predict.iter_predict`).
    precision : str
        What the network computes in (see :func:`napari_instseg.core.predict.predict`).

    Returns
    -------
    Prediction
        The window's outputs, with the model's recommended segmentation in ``metadata``.
    """
    from .device import get_device
    from .predict import iter_predict_normalized

    dev = get_device(device)
    cfg = model.config
    if x.ndim != 3 or x.shape[0] != cfg.network_channels:
        raise ValueError(
            f"window of shape {x.shape} does not have the network's "
            f"{cfg.network_channels} input channel(s)"
        )
    _, h, w = x.shape
    tile = max(h, w) if tile_size is None else int(tile_size)
    steps = iter_predict_normalized(
        x, model.to(dev).eval(), dev, tile, halo, origin, tta, precision
    )
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


# --------------------------------------------------------------------------- stitching


def match_overlap(labels_a: np.ndarray, labels_b: np.ndarray, min_iou: float = 0.5) -> np.ndarray:
    """Pairs of labels of two segmentations of the same region that are one instance.

    Parameters
    ----------
    labels_a, labels_b : np.ndarray
        Label images of the same pixels (0 = background).
    min_iou : float
        Smallest intersection over union, counted on these pixels only.

    Returns
    -------
    np.ndarray
        ``(K, 2)`` int64 ``(label in a, label in b)``.
    """
    a = np.asarray(labels_a).ravel().astype(np.int64)
    b = np.asarray(labels_b).ravel().astype(np.int64)
    if a.shape != b.shape:
        raise ValueError(f"label images differ in size: {labels_a.shape} vs {labels_b.shape}")
    both = (a > 0) & (b > 0)
    if not both.any():
        return np.zeros((0, 2), np.int64)
    pairs, inter = np.unique((a[both] << 32) | b[both], return_counts=True)
    pa, pb = pairs >> 32, pairs & 0xFFFFFFFF
    area_a = dict(zip(*np.unique(a[a > 0], return_counts=True), strict=True))
    area_b = dict(zip(*np.unique(b[b > 0], return_counts=True), strict=True))
    union = np.array([area_a[i] + area_b[j] for i, j in zip(pa, pb, strict=True)]) - inter
    keep = inter / union >= min_iou
    return np.stack([pa[keep], pb[keep]], axis=1).astype(np.int64)


def _grow(box: tuple[int, int, int, int], m: int) -> tuple[int, int, int, int]:
    return box[0] - m, box[1] + m, box[2] - m, box[3] + m


def _intersect(p: tuple[int, ...], q: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    r0, r1, c0, c1 = max(p[0], q[0]), min(p[1], q[1]), max(p[2], q[2]), min(p[3], q[3])
    return (r0, r1, c0, c1) if r0 < r1 and c0 < c1 else None


def _crop(labels: np.ndarray, window: tuple[int, ...], box: tuple[int, ...]) -> np.ndarray:
    return labels[box[0] - window[0] : box[1] - window[0], box[2] - window[2] : box[3] - window[2]]


def _stitch_pairs(
    a: Chunk, la: np.ndarray, b: Chunk, lb: np.ndarray, margin: int, min_iou: float
) -> np.ndarray:
    """Matches ``(label in a, label in b)`` on both overlaps of two neighbouring chunks."""
    out = [np.zeros((0, 2), np.int64)]
    for first, l1, second, l2, swap in ((a, la, b, lb, False), (b, lb, a, la, True)):
        box = _intersect(second.core, _grow(first.core, margin))
        if box is None:
            continue
        box = _intersect(box, first.window)
        if box is None:
            continue
        pairs = match_overlap(_crop(l1, first.window, box), _crop(l2, second.window, box), min_iou)
        out.append(pairs[:, ::-1] if swap else pairs)
    return np.unique(np.concatenate(out), axis=0)


# --------------------------------------------------------------------------- the run


@dataclass
class BatchResult:
    """What :func:`run_batch` did.

    Attributes
    ----------
    out : Path
        The OME-Zarr store.
    report : dict
        The contents of ``report.json``: inputs, skipped inputs, chunk counts, failed
        chunks with their errors, instances, timings.
    table : Path or None
        The measurements file.
    """

    out: Path
    report: dict[str, Any]
    table: Path | None = None

    @property
    def ok(self) -> bool:
        """True when no input was skipped and no chunk failed."""
        return not self.report["skipped_inputs"] and not self.report["failed_chunks"]


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs for a chunk (picklable)."""

    out: str
    key: str
    plan: BatchPlan
    channel_axis: int | None
    model_path: str | None
    device: str
    method: str
    segment_params: dict[str, Any]
    tile_size: int | None
    tile_halo: int
    tta: int
    save_maps: bool
    embedding_dim: int
    min_iou: float
    torch_threads: int | None
    predictor: Callable[[np.ndarray, Chunk], Prediction] | None = None
    segmenter: Callable[..., Instances] | None = None
    scale: float = 1.0
    scale_estimates: list[float] | None = None
    precision: str = "auto"
    #: The device of each local-cluster worker, by its name (index); None: ``device``.
    worker_devices: tuple[str, ...] | None = None


def _work(out: str | Path) -> Path:
    return Path(out) / _WORK


def _marker(out: str | Path, key: str) -> Path:
    return _work(out) / "done" / f"{key}.json"


def _atomic_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@lru_cache(maxsize=2)
def _worker_model(path: str, device: str, threads: int | None):
    import torch

    from .device import get_device
    from .weights import load_model

    if threads:
        torch.set_num_threads(threads)
    return load_model(path, device=get_device(device))


def _worker_name() -> str | int | None:
    """The name of the dask.distributed worker running this task; None outside of one."""
    try:
        from distributed import get_worker

        return get_worker().name
    except (ImportError, ValueError):  # ValueError: not in a worker (local threads)
        return None


def _task_device(job: _Job) -> tuple[str, str]:
    """A chunk's worker and device: ``("local", device)`` on local threads.

    A worker of our local cluster takes its share of the GPUs (``job.worker_devices`` by
    its name); any other worker the device asked for (its own best one with ``"auto"``).
    """
    name = _worker_name()
    device = job.device
    if job.worker_devices and isinstance(name, int) and name >= 0:
        device = job.worker_devices[name % len(job.worker_devices)]
    return ("local" if name is None else str(name)), device


def _device_name(device: str) -> str:
    """The device ``device`` resolves to, with its GPU's index (``"cuda:0"``, ``"cpu"``)."""
    import torch

    from .device import get_device

    dev = get_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


def _cuda_count(device: str) -> int:
    """CUDA GPUs a local cluster shares out for ``device`` (0: none, or not ours to share)."""
    if str(device) not in ("auto", "cuda"):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_worker_devices(device: str, workers: int) -> list[str]:
    """The device each worker process of a local cluster runs the network on.

    Parameters
    ----------
    device : str
        The device asked for. ``"auto"`` or ``"cuda"`` with CUDA GPUs visible: worker ``i``
        gets ``cuda:(i % n_gpus)``, so the processes share the GPUs out evenly. Anything
        else (an explicit ``"cuda:1"``, ``"cpu"``, ``"mps"``, or ``"auto"`` without CUDA)
        is every worker's device as given.
    workers : int
        Worker processes (named 0 .. workers - 1 by ``distributed.LocalCluster``).

    Returns
    -------
    list of str
        One device name per worker.
    """
    count = _cuda_count(device)
    if count == 0:
        return [str(device)] * workers
    return [f"cuda:{i % count}" for i in range(workers)]


def default_workers(device: str = "auto", scheduler: Any = None) -> int:
    """How many local worker processes :func:`run_batch` starts when not told.

    Parameters
    ----------
    device : str
        The device asked for.
    scheduler : str or distributed.Client, optional
        The scheduler asked for; an address or a client (an existing cluster) means 1.

    Returns
    -------
    int
        The number of visible CUDA GPUs when there are several, ``device`` is ``"auto"``
        or ``"cuda"`` and tasks run locally (``scheduler`` None, ``"threads"``,
        ``"processes"`` or ``"local"``), so each GPU gets a process; 1 (local threads)
        otherwise.
    """
    if scheduler not in (None, "threads", "processes", "local"):
        return 1
    count = _cuda_count(device)
    return count if count > 1 else 1


def _read_region(job: _Job, plane: int, box: tuple[int, int, int, int]) -> np.ndarray:
    path, p = job.plan.source_of(plane)
    arr = open_input(path, job.channel_axis)
    r0, r1, c0, c1 = box
    return np.asarray(arr[p, :, r0:r1, c0:c1].compute(scheduler="sync"))


def _plane_stats(job: _Job, plane: int, norm: dict[str, Any]) -> dict[str, Any]:
    """A plane's normalisation (cached in the store); ``{"error": ...}`` if it fails."""
    try:
        return _plane_stats_body(job, plane, norm)
    except Exception as err:  # reported by every chunk of the plane
        return {"error": f"{type(err).__name__}: {err}"}


def _plane_stats_body(job: _Job, plane: int, norm: dict[str, Any]) -> dict[str, Any]:
    path = _work(job.out) / "stats" / f"{plane}.json"
    stats = _read_json(path)
    if stats is not None:
        return stats
    src, p = job.plan.source_of(plane)
    _, h, w = job.plan.shape
    stride = max(1, math.ceil(math.sqrt(h * w / STATS_PIXELS)))
    arr = open_input(src, job.channel_axis)[p, :, ::stride, ::stride]
    sample = np.asarray(arr.compute(scheduler="sync"), np.float32)
    stats = normalization_stats(sample, stride=stride, **norm)
    _atomic_json(path, stats)
    return stats


@lru_cache(maxsize=64)
def _array(path: str, key: str) -> Any:
    """A zarr array of the store, opened once per process and run (``key``)."""
    import zarr

    return zarr.open_array(path, mode="r+")


@lru_cache(maxsize=4)
def _open_arrays(out: str, save_maps: bool, key: str) -> dict[str, Any]:
    """The store's arrays a chunk writes to, opened once per process and run (``key``)."""
    import zarr

    root = Path(out)
    arrays = {
        "image": zarr.open_array(str(root / "0"), mode="r+"),
        "local": zarr.open_array(str(_work(out) / "local.zarr"), mode="r+"),
        "windows": zarr.open_array(str(_work(out) / "windows.zarr"), mode="r+"),
    }
    if save_maps:
        for name in MAP_NAMES:
            arrays[name] = zarr.open_array(str(root / "maps" / name / "0"), mode="r+")
    return arrays


def _run_chunk(job: _Job, chunk: Chunk, stats: dict[str, Any]) -> dict[str, Any]:
    """Predict, segment and write one chunk; never raises an ``Exception`` (reports it)."""
    t0 = time.perf_counter()
    try:
        if "error" in stats:
            raise ValueError(f"normalisation of the image failed: {stats['error']}")
        return _chunk_body(job, chunk, stats, t0)
    except Exception as err:  # one bad chunk must not stop the batch: reported instead
        path, p = job.plan.source_of(chunk.plane)
        return {
            "chunk": chunk.key,
            "status": "failed",
            "input": path,
            "plane_in_input": p,
            "error": f"{type(err).__name__}: {err}",
        }


def _chunk_body(job: _Job, chunk: Chunk, stats: dict[str, Any], t0: float) -> dict[str, Any]:
    from .measure import measure

    plan = job.plan
    _, h, w = plan.shape
    wr0, wr1, wc0, wc1 = chunk.window
    # the flat-field blur reaches 4 sigma (scipy's truncate): read that much more
    margin = math.ceil(4 * stats["flatfield_sigma"]) if stats["input_norm"] == "flatfield" else 0
    # and the edge refinement's background (44 px median) sees past the window's edge
    margin = max(margin, 48)
    region = (
        max(wr0 - margin, 0),
        min(wr1 + margin, h),
        max(wc0 - margin, 0),
        min(wc1 + margin, w),
    )
    raw = _read_region(job, chunk.plane, region)
    x = normalize_window(raw, stats)
    inner = (
        slice(None),
        slice(wr0 - region[0], wr1 - region[0]),
        slice(wc0 - region[2], wc1 - region[2]),
    )
    # the image contrast serves only the edge refinement: not computed when it is off
    refine_off = job.segment_params.get("edge_thresholds", "tuned") is None
    contrast = None if refine_off else local_contrast(np.asarray(raw[0], np.float32))[inner[1:]]
    x, raw = x[inner], raw[inner]
    worker, device = _task_device(job)
    used = None  # the device the network ran on ("cuda:1", "cpu"); None with a predictor
    if job.predictor is not None:
        prediction = job.predictor(x, chunk)
    else:
        model = _worker_model(job.model_path, device, job.torch_threads)
        used = _device_name(device)
        if job.scale == 1.0:
            prediction = predict_window(
                x,
                model,
                device,
                (wr0, wc0),
                job.tile_size,
                job.tile_halo,
                job.tta,
                job.precision,
            )
        else:  # the network runs at the model's scale; the maps come back to the window
            origin = (round(wr0 * job.scale), round(wc0 * job.scale))
            prediction = predict_window(
                resize_image(x, job.scale),
                model,
                device,
                origin,
                job.tile_size,
                job.tile_halo,
                job.tta,
                job.precision,
            )
            network_grid = prediction  # segment() runs on it, not on the maps resized back
            prediction = resize_prediction(prediction, x.shape[-2:])
            prediction.metadata["scale"] = job.scale
            prediction.model_grid = network_grid
            prediction.contrast = None  # the outline follows the window's own contrast
    if prediction.shape != (wr1 - wr0, wc1 - wc0):
        raise ValueError(f"prediction is {prediction.shape}, the window {chunk.window}")
    if prediction.contrast is None and contrast is not None:
        prediction.contrast = contrast
    if job.segmenter is not None:
        instances = job.segmenter(prediction, job.method, **job.segment_params)
    else:
        from .instances import segment

        instances = segment(prediction, job.method, **job.segment_params)
    labels = instances.to_labels().astype(np.uint32)
    r0, r1, c0, c1 = chunk.core
    core = (slice(r0 - wr0, r1 - wr0), slice(c0 - wc0, c1 - wc0))
    masks = instances.masks[:, core[0], core[1]]
    keep = np.flatnonzero(masks.any(axis=(1, 2)))
    core_raw = raw[:, core[0], core[1]]
    if len(keep) < len(instances):  # a view when every instance reaches the core
        masks = masks[keep]
    table = measure(
        Instances(masks=masks, scores=instances.scores[keep], classes=instances.classes[keep]),
        image=core_raw[0] if core_raw.shape[0] == 1 else core_raw,
    )
    table["label"] = keep + 1
    for col in ("bbox_min_row", "bbox_max_row", "centroid_row"):
        table[col] = table[col] + r0
    for col in ("bbox_min_col", "bbox_max_col", "centroid_col"):
        table[col] = table[col] + c0

    arrays = _open_arrays(job.out, job.save_maps, job.key)
    n = chunk.plane
    arrays["image"][n, :, r0:r1, c0:c1] = core_raw.astype(plan.dtype)
    arrays["local"][n, r0:r1, c0:c1] = labels[core]
    padded = np.zeros(plan.window_shape, np.uint32)
    padded[: labels.shape[0], : labels.shape[1]] = labels
    arrays["windows"][n, chunk.row, chunk.col] = padded
    if job.save_maps:
        for name in MAP_NAMES:
            data = np.asarray(getattr(prediction, name), np.float32)
            arrays[name][n, ..., r0:r1, c0:c1] = data[..., core[0], core[1]]
    seconds = time.perf_counter() - t0
    _atomic_json(
        _marker(job.out, chunk.key),
        {
            "chunk": chunk.key,
            "n_labels": len(instances),
            "table": table.to_dict(orient="list"),
            "seconds": seconds,
        },
    )
    return {
        "chunk": chunk.key,
        "status": "done",
        "seconds": seconds,
        "worker": worker,
        "device": used,
    }


def _match_task(
    job: _Job, chunk: Chunk, neighbours: list[Chunk]
) -> list[tuple[str, int, str, int]]:
    arrays = _open_arrays(job.out, False, job.key)
    win = arrays["windows"]

    def window_labels(c: Chunk) -> np.ndarray:
        wr0, wr1, wc0, wc1 = c.window
        return np.asarray(win[c.plane, c.row, c.col])[: wr1 - wr0, : wc1 - wc0]

    la = window_labels(chunk)
    edges = []
    margin = max(1, job.plan.halo // 2)
    for other in neighbours:
        pairs = _stitch_pairs(chunk, la, other, window_labels(other), margin, job.min_iou)
        edges.extend((chunk.key, int(i), other.key, int(j)) for i, j in pairs)
    return edges


def _relabel_task(job: _Job, chunk: Chunk, lut: np.ndarray) -> None:

    local = _array(str(_work(job.out) / "local.zarr"), job.key)
    labels = _array(str(Path(job.out) / "labels" / LABELS_NAME / "0"), job.key)
    r0, r1, c0, c1 = chunk.core
    core = np.asarray(local[chunk.plane, r0:r1, c0:c1])
    labels[chunk.plane, r0:r1, c0:c1] = lut[np.minimum(core, len(lut) - 1)]


class _Executor:
    """Runs lists of dask tasks on local threads, a local cluster or a given cluster."""

    def __init__(self, scheduler: Any, workers: int, threads: int | None) -> None:
        self.client = None
        self.cluster = None
        self.local = "threads"
        from .device import usable_cores

        self.threads = threads or usable_cores()
        if scheduler is not None and not isinstance(scheduler, str):
            self.client = scheduler  # a distributed.Client
        elif scheduler in (None, "threads", "sync") and workers <= 1:
            self.local = scheduler or "threads"
        else:
            try:
                from distributed import Client, LocalCluster
            except ImportError as err:
                raise ValueError(
                    "several workers or a scheduler address need dask.distributed "
                    "(pip install distributed)"
                ) from err
            if scheduler in (None, "threads", "sync", "processes", "local"):
                self.cluster = LocalCluster(
                    n_workers=max(1, workers),
                    threads_per_worker=threads or 1,
                    processes=True,
                    dashboard_address=None,
                )
                self.client = Client(self.cluster)
            else:
                self.client = Client(scheduler)

    @property
    def kind(self) -> str:
        """How tasks run, in words."""
        if self.client is None:
            return f"dask {self.local} ({self.threads if self.local == 'threads' else 1})"
        return f"dask.distributed {self.client.scheduler.address}"

    def run(
        self,
        tasks: Sequence[Any],
        progress: Callable[[str, int, int], None] | None = None,
        stage: str = "",
    ) -> list[Any]:
        import dask

        if not tasks:
            return []
        total, done = len(tasks), 0
        if self.client is not None:
            from distributed import as_completed

            futures = self.client.compute(list(tasks))
            for _ in as_completed(futures):
                done += 1
                if progress is not None:
                    progress(stage, done, total)
            return [f.result() for f in futures]
        from dask.callbacks import Callback

        keys = {getattr(t, "key", None) for t in tasks}
        lock = threading.Lock()

        def posttask(key, result, dsk, state, worker_id):
            nonlocal done
            if key in keys and progress is not None:
                with lock:
                    done += 1
                    progress(stage, done, total)

        with Callback(posttask=posttask):
            if self.local == "sync":
                return list(dask.compute(*tasks, scheduler="sync", optimize_graph=False))
            return list(
                dask.compute(
                    *tasks, scheduler="threads", num_workers=self.threads, optimize_graph=False
                )
            )

    def close(self) -> None:
        if self.cluster is not None:
            self.client.close()
            self.cluster.close()


def _plan_key(plan: BatchPlan, params: dict[str, Any]) -> str:
    sources = []
    for src in plan.sources:
        st = Path(src["path"]).stat()
        sources.append(
            [str(Path(src["path"]).resolve()), src["shape"], st.st_size, st.st_mtime_ns]
        )
    blob = json.dumps(
        {"layout": LAYOUT_VERSION, "sources": sources, "shape": plan.shape, **params},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _prepare_store(
    out: Path, plan: BatchPlan, key: str, resume: bool, save_maps: bool, embedding_dim: int
) -> bool:
    """Create or reopen the store; True when it already holds a finished run."""
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscales_metadata

    plan_file = _work(out) / "plan.json"
    if out.exists():
        previous = _read_json(plan_file)
        if previous is None:
            if any(out.iterdir()):
                raise ValueError(
                    f"{out} exists and is not a napari-instseg batch output; choose another "
                    "--out or remove it"
                )
        elif previous.get("key") != key and resume:
            raise ValueError(
                f"{out} holds the results of a different run (inputs, model or parameters "
                "differ); resume needs the same ones. Use another --out, or --no-resume to "
                "start it afresh"
            )
        if previous is not None and not resume:
            shutil.rmtree(out)
        elif previous is not None and (_work(out) / "complete.json").exists():
            return True
    n, (c, h, w) = len(plan.planes), plan.shape
    s = plan.chunk_size
    out.mkdir(parents=True, exist_ok=True)
    _atomic_json(plan_file, {"key": key, "shape": [n, c, h, w], "chunk_size": s})
    root = zarr.open_group(str(out), mode="a", zarr_format=2)

    def ensure(path: Path, shape: tuple, chunks: tuple, dtype: Any) -> None:
        try:
            arr = zarr.open_array(str(path), mode="r")
            if arr.shape == shape and arr.dtype == np.dtype(dtype) and arr.chunks == chunks:
                return
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            pass
        zarr.create_array(
            str(path),
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            fill_value=0,
            overwrite=True,
            zarr_format=2,
        )

    ensure(out / "0", (n, c, h, w), (1, 1, s, s), plan.dtype)
    ensure(_work(out) / "local.zarr", (n, h, w), (1, s, s), np.uint32)
    rows, cols = plan.grid
    wh, ww = plan.window_shape
    ensure(_work(out) / "windows.zarr", (n, rows, cols, wh, ww), (1, 1, 1, wh, ww), np.uint32)
    fmt = FormatV04()
    if save_maps:
        maps = root.require_group("maps")
        for name in MAP_NAMES:
            group = maps.require_group(name)
            lead = (embedding_dim,) if name == "embeddings" else ()
            chunks = (1,) + (1,) * len(lead) + (s, s)
            ensure(out / "maps" / name / "0", (n, *lead, h, w), chunks, np.float32)
            axes = [_IMAGE_AXIS, *([_C_AXIS] if lead else []), *_YX_AXES]
            write_multiscales_metadata(group, _datasets(1, len(axes)), fmt, axes, name=name)
    write_multiscales_metadata(
        root, _datasets(1, 4), fmt, [_IMAGE_AXIS, _C_AXIS, *_YX_AXES], name="image"
    )
    return False


def _datasets(levels: int, ndim: int) -> list[dict[str, Any]]:
    return [
        {
            "path": str(level),
            "coordinateTransformations": [
                {"type": "scale", "scale": [1.0] * (ndim - 2) + [2.0**level] * 2}
            ],
        }
        for level in range(levels)
    ]


def _downsample_task(
    path: str, level: int, lead: tuple, box: tuple, labels: bool, key: str
) -> None:
    """Write one chunk of pyramid level ``level`` from the 2x larger region of the previous."""
    src = _array(f"{path}/{level - 1}", key)
    dst = _array(f"{path}/{level}", key)
    r0, r1, c0, c1 = box
    block = np.asarray(src[(*lead, slice(2 * r0, 2 * r1), slice(2 * c0, 2 * c1))])
    if labels:
        low = block[::2, ::2]
    else:
        low = block.astype(np.float64).reshape(r1 - r0, 2, c1 - c0, 2).mean(axis=(1, 3))
        if np.issubdtype(dst.dtype, np.integer):
            low = np.round(low)
        low = low.astype(dst.dtype)
    dst[(*lead, slice(r0, r1), slice(c0, c1))] = low


def _pyramid(
    group: Any,
    path: Path,
    levels: int,
    chunk_size: int,
    labels: bool,
    executor: _Executor,
    key: str,
) -> None:
    """Write levels 1.. of a multiscale group from level 0 (2x mean, or 2x stride for labels).

    Every task writes one zarr chunk of a level from the level above, so memory stays at
    a few chunks.
    """
    import dask

    for level in range(1, levels):
        prev = group[str(level - 1)]
        h, w = prev.shape[-2] // 2, prev.shape[-1] // 2
        chunks = (1,) * (prev.ndim - 2) + (chunk_size, chunk_size)
        group.create_array(
            str(level),
            shape=(*prev.shape[:-2], h, w),
            chunks=chunks,
            dtype=prev.dtype,
            fill_value=0,
            overwrite=True,
        )
        tasks = [
            dask.delayed(_downsample_task, pure=False)(
                str(path),
                level,
                lead,
                (r0, min(r0 + chunk_size, h), c0, min(c0 + chunk_size, w)),
                labels,
                key,
                dask_key_name=f"pyramid-{path}-{level}-{lead}-{r0}-{c0}",
            )
            for lead in np.ndindex(*prev.shape[:-2])
            for r0 in range(0, h, chunk_size)
            for c0 in range(0, w, chunk_size)
        ]
        executor.run(tasks)


def _n_levels(h: int, w: int, chunk_size: int) -> int:
    levels = 1
    while max(h, w) > chunk_size and min(h, w) >= 2:
        h, w, levels = h // 2, w // 2, levels + 1
    return levels


def _combine(tables: list[Any]) -> Any:
    """Measurements of instances from the measurements of their core pieces."""
    import pandas as pd

    df = pd.concat(tables, ignore_index=True)
    keys = ["index", "label"]
    df["_w"] = df["area"].astype(float)
    means = [c for c in df.columns if c.startswith("mean_")] + [
        "score",
        "centroid_row",
        "centroid_col",
    ]
    for col in means:
        df[f"_{col}"] = df[col] * df["_w"]
    grouped = df.groupby(keys, sort=True)
    out = grouped.agg(
        image=("image", "first"),
        plane=("plane", "first"),
        area=("area", "sum"),
        length=("length", lambda s: float(np.nansum(s))),
        bbox_min_row=("bbox_min_row", "min"),
        bbox_min_col=("bbox_min_col", "min"),
        bbox_max_row=("bbox_max_row", "max"),
        bbox_max_col=("bbox_max_col", "max"),
        chunks=("area", "size"),
    )
    weights = grouped["_w"].sum().replace(0, np.nan)
    for col in means:
        out[col] = grouped[f"_{col}"].sum() / weights
    largest = df.loc[df.groupby(keys)["_w"].idxmax(), [*keys, "class"]].set_index(keys)
    out["class"] = largest["class"]
    out["width"] = out["area"] / out["length"].replace(0, np.nan)
    first = ["image", "plane", "index", "label", "area", "length", "width", "score", "class"]
    if "solidity" in df.columns:
        # a shape ratio of pieces does not add up: known only for one-chunk instances
        out["solidity"] = grouped["solidity"].agg(
            lambda s: float(s.iloc[0]) if len(s) == 1 else np.nan
        )
        first.insert(first.index("width") + 1, "solidity")
    out = out.reset_index()
    rest = [c for c in out.columns if c not in first]
    return out[first + rest]


#: Planes of a series (first, middle, last) whose central window ``scale="auto"`` measures.
AUTO_SCALE_SAMPLES = 3
#: Side of the central window measured in each of them, pixels.
AUTO_SCALE_WINDOW = 1024


def estimate_batch_scale(
    plan: BatchPlan,
    model: Any,
    channel_axis: int | None = None,
    device: str = "auto",
    samples: int = AUTO_SCALE_SAMPLES,
    window: int = AUTO_SCALE_WINDOW,
    precision: str = "auto",
) -> tuple[float, list[float]]:
    """One resizing factor for a whole series: ``scale="auto"`` on a few of its planes.

    Parameters
    ----------
    plan : BatchPlan
        The series (see :func:`plan_batch`).
    model : InstSegNet
        A model whose metadata has ``object_width``.
    channel_axis : int, optional
        Channel axis of the stored inputs.
    device : str
        Where the estimation passes run.
    samples : int
        How many planes, spread evenly from the first to the last, are measured.
    window : int
        Side of the central window of each plane that is measured (whole planes when
        smaller).
    precision : str
        What the network computes in (see :func:`napari_instseg.core.predict.predict`).

    Returns
    -------
    float
        The median of the planes' estimates (:func:`~napari_instseg.core.predict.auto_scale`),
        two decimals; 1.0 within ``SCALE_TOLERANCE`` of 1.
    list of float
        Each measured plane's estimate.
    """
    from .predict import auto_scale
    from .scale import SCALE_TOLERANCE

    n = len(plan.planes)
    picks = sorted({round(float(i)) for i in np.linspace(0, n - 1, max(1, min(samples, n)))})
    _, h, w = plan.shape
    r0, c0 = max(0, (h - window) // 2), max(0, (w - window) // 2)
    estimates = []
    for plane in picks:
        path, p = plan.source_of(plane)
        arr = open_input(path, channel_axis)[p, :, r0 : r0 + window, c0 : c0 + window]
        raw = np.asarray(arr.compute(scheduler="sync"), np.float32)
        estimates.append(float(auto_scale(raw, model, device, precision=precision)))
    scale = round(float(np.median(estimates)), 2)
    if abs(math.log(scale)) <= math.log(SCALE_TOLERANCE):
        scale = 1.0
    return scale, estimates


def run_batch(
    inputs: str | Path | Iterable[str | Path],
    out: str | Path,
    model: Any = None,
    device: str = "auto",
    method: str = "auto",
    chunk_size: int = 1024,
    halo: int = 64,
    save_maps: bool = False,
    measurements: str = "csv",
    resume: bool = True,
    scheduler: Any = None,
    workers: int | None = None,
    threads: int | None = None,
    channel_axis: int | None = None,
    segment_params: dict[str, Any] | None = None,
    min_iou: float = 0.5,
    tile_size: int | None = None,
    tta: int | str = "auto",
    progress: Callable[[str, int, int], None] | None = None,
    predictor: Callable[[np.ndarray, Chunk], Prediction] | None = None,
    segmenter: Callable[..., Instances] | None = None,
    scale: float = 1.0,
    precision: str = "auto",
) -> BatchResult:
    """Predict, segment and measure many or large images with dask into one OME-Zarr store.

    See the module docstring for the store's layout, the stitching rule and resuming.

    Parameters
    ----------
    inputs : str, Path or iterable of str or Path
        Files, folders, glob patterns, multi-page TIFFs (one plane per page), zarr stores;
        a single ``str`` or ``Path`` is one input.
    out : str or Path
        The OME-Zarr store to write (conventionally ``*.zarr``).
    model : InstSegNet or str or Path, optional
        A model or weights file; None for the shipped BBBC010 model.
    device : str
        ``auto`` (a GPU when there is one), ``cuda``, ``cuda:N``, ``mps`` or ``cpu``. With
        ``auto`` or ``cuda`` the processes of a local cluster share the visible GPUs out
        (worker ``i`` on ``cuda:(i % n_gpus)``); an explicit ``cuda:N`` is every worker's.
    method : str
        Segmentation method (see :func:`napari_instseg.core.instances.segment`).
    chunk_size : int
        Side of the square chunk cores and of the zarr chunks, pixels. Memory per worker
        thread grows with ``(chunk_size + 2 * halo) ** 2``.
    halo : int
        Context around each core, pixels (>= 8; about the network's receptive field and
        enough worm to match across borders).
    save_maps : bool
        Also write the embeddings, seediness, boundary and foreground maps.
    measurements : {"csv", "parquet"}
        Format of the per-instance table (Parquet needs pyarrow).
    resume : bool
        Skip chunks a previous run of the same job finished; False starts afresh
        (removing a previous napari-instseg output at ``out``).
    scheduler : str or distributed.Client, optional
        None / ``"threads"``: local threads; ``"sync"``: one at a time in this thread; an
        address: that dask.distributed scheduler; a ``Client``: its cluster.
    workers : int, optional
        More than 1 (without an address): a local cluster of that many processes. Default
        (None): one process per GPU when several CUDA GPUs are visible, ``device`` is
        ``auto`` or ``cuda`` and the network runs (no ``predictor``; see
        :func:`default_workers`), else 1 (local threads).
    threads : int, optional
        Threads of the local scheduler (default: the CPU count), or per local-cluster
        worker (default 1).
    channel_axis : int, optional
        Channel axis of the stored inputs (see :func:`open_input`).
    segment_params : dict, optional
        Keyword arguments of the segmentation method.
    min_iou : float
        Stitching threshold (see :func:`match_overlap`).
    tile_size : int, optional
        Run the network on tiles of this size inside a window (default: whole windows).
    tta : int or "auto"
        Test-time augmentation passes, 1, 2, 4 or 8; ``"auto"`` (default): the model's
        ``recommended_tta``, what its segmentation parameters were tuned with.
    scale : float or "auto"
        Resize every window by this factor before the network (objects of another size;
        see :func:`napari_instseg.core.predict.predict`); the maps and labels stay on the
        images' pixels and segmentation runs at the model's scale. ``"auto"``: one factor
        for the whole series, estimated once on the central window of its first, middle
        and last planes (:func:`estimate_batch_scale`, the median), so that every chunk is
        resized alike; kept in the store, so a resumed run uses the same, and reported
        (``report["scale"]``, ``report["scale_estimates"]``).
    precision : str
        What the network computes in: ``"auto"`` (default: bfloat16 on CUDA and on CPUs
        with hardware bfloat16, float32 elsewhere), ``"float32"`` or ``"bfloat16"`` (see
        :func:`napari_instseg.core.predict.predict`).
    progress : callable, optional
        Called with ``(stage, done, total)``; stages ``"chunks"``, ``"stitch"``, ``"write"``.
    predictor : callable, optional
        ``predictor(x, chunk) -> Prediction`` replaces the network (tests, oracles);
        ``x`` is the normalised window. It must be picklable for a distributed cluster.
    segmenter : callable, optional
        ``segmenter(prediction, method, **params) -> Instances`` replaces ``segment``.

    Returns
    -------
    BatchResult
        The store, the report (also written to ``out/report.json``) and the table's path.

    Raises
    ------
    ValueError
        Bad parameters, no usable input, or ``out`` holding another run or other data.
    """
    t_start = time.perf_counter()
    out = Path(out)
    if measurements not in ("csv", "parquet"):
        raise ValueError(f"measurements must be 'csv' or 'parquet', not {measurements!r}")
    if measurements == "parquet":
        try:
            import pandas as pd

            pd.io.parquet.get_engine("auto")
        except ImportError as err:
            raise ValueError("Parquet output needs pyarrow: pip install pyarrow") from err
    if workers is not None and (int(workers) != workers or workers < 1):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if threads is not None and (int(threads) != threads or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    if not 0 < min_iou <= 1:
        raise ValueError(f"min_iou must be in (0, 1], got {min_iou!r}")
    from .normalize import INPUT_NORMS
    from .predict import resolve_tta
    from .weights import DEFAULT_NORMALIZATION, load_model, model_signature, save_model

    scale = check_scale(scale)
    from .device import check_precision

    check_precision(precision)
    if scale == "auto" and predictor is not None:
        raise ValueError("scale='auto' needs the model: give a number with a custom predictor")

    # the model: loaded here for its architecture and signature, saved into the store so
    # every worker (and a resumed run) uses exactly these weights
    norm: dict[str, Any] = {"input_norm": "percentile", **DEFAULT_NORMALIZATION}
    norm = {k: norm[k] for k in ("input_norm", "low", "high")}
    norm["flatfield_sigma"] = 16.0
    net = None
    if predictor is None:
        net = model if model is not None and not isinstance(model, str | Path) else None
        if net is None:
            net = load_model(model, device="cpu")
        cfg = net.config
        norm.update(input_norm=cfg.input_norm, flatfield_sigma=float(cfg.flatfield_sigma))
        in_channels, divisor, emb_dim = cfg.in_channels, cfg.divisor, cfg.embedding_dim
        identity = model_signature(net)
        tta = resolve_tta(net, tta)
    else:
        tta = 1 if tta == "auto" else resolve_tta(None, tta)
        in_channels, divisor = None, 1
        emb_dim = int(getattr(predictor, "embedding_dim", 0))
        if save_maps and not emb_dim:
            raise ValueError("save_maps with a custom predictor needs predictor.embedding_dim")
        identity = getattr(predictor, "__qualname__", type(predictor).__name__)
    if scale == "auto":
        from .predict import model_object_width

        model_object_width(net)  # before the store is made: a clear error for older models
    if norm["input_norm"] not in INPUT_NORMS:
        raise ValueError(f"the model's input normalisation {norm['input_norm']!r} is unknown")

    plan = plan_batch(inputs, chunk_size, halo, divisor, channel_axis, in_channels)
    params = {
        "model": identity,
        "method": method,
        "segment_params": segment_params or {},
        "norm": norm,
        "chunk_size": plan.chunk_size,
        "halo": plan.halo,
        "divisor": plan.divisor,
        "save_maps": bool(save_maps),
        "min_iou": float(min_iou),
        "tile_size": tile_size,
        "channel_axis": channel_axis,
        "segmenter": getattr(segmenter, "__qualname__", None),
    }
    if tta != 1:  # absent when 1: stores written before tta existed resume unchanged
        params["tta"] = tta
    if scale != 1.0:
        params["scale"] = scale
    if precision != "auto":  # absent when "auto": older stores resume unchanged
        params["precision"] = precision
    if net is not None:
        # the same tensors with other semi-convolutional coordinates, coord_scale or taus
        # give other maps: a store of one never resumes with the other (as predict's cache)
        params["architecture"] = net.config.to_dict()
    key = _plan_key(plan, params)
    finished = _prepare_store(out, plan, key, resume, bool(save_maps), emb_dim)
    if finished:
        report = _read_json(_work(out) / "complete.json")
        report["chunks"].update(computed=0, skipped=report["chunks"]["total"])
        return BatchResult(out, report, out / report["measurements"])

    scale_estimates = None
    if scale == "auto":  # once per series, kept for a resumed run
        scale_file = _work(out) / "scale.json"
        kept = _read_json(scale_file)
        if kept is None:
            estimate, scale_estimates = estimate_batch_scale(
                plan, net, channel_axis, device, precision=precision
            )
            kept = {"scale": estimate, "estimates": scale_estimates}
            _atomic_json(scale_file, kept)
        scale, scale_estimates = float(kept["scale"]), list(kept["estimates"])

    model_path = None
    if net is not None:
        model_path = str(_work(out) / "model.safetensors")
        if not Path(model_path).is_file():
            save_model(net, model_path, dict(getattr(net, "metadata", None) or {}))

    if workers is None:  # a custom predictor does not use the device: no processes for it
        workers = default_workers(device, scheduler) if predictor is None else 1
        if workers > 1 and importlib.util.find_spec("distributed") is None:
            warnings.warn(
                f"{workers} GPUs but no dask.distributed (pip install distributed): one "
                "process runs on one GPU",
                stacklevel=2,
            )
            workers = 1
    executor = _Executor(scheduler, int(workers), threads)
    worker_devices = None
    if executor.cluster is not None:  # ours: its processes share the GPUs out
        worker_devices = tuple(local_worker_devices(str(device), int(workers)))
    env_threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or None
    torch_threads = None
    if executor.cluster is not None:
        torch_threads = min(threads or 1, env_threads or threads or 1)
    job = _Job(
        out=str(out),
        key=key,
        plan=plan,
        channel_axis=channel_axis,
        model_path=model_path,
        device=str(device),
        method=method,
        segment_params=dict(segment_params or {}),
        tile_size=tile_size,
        tile_halo=plan.halo,
        tta=tta,
        save_maps=bool(save_maps),
        embedding_dim=emb_dim,
        min_iou=float(min_iou),
        torch_threads=torch_threads,
        predictor=predictor,
        segmenter=segmenter,
        scale=scale,
        scale_estimates=scale_estimates,
        precision=precision,
        worker_devices=worker_devices,
    )
    saved_threads = None
    if executor.client is None and net is not None:
        import torch

        saved_threads = torch.get_num_threads()
        from .device import usable_cores

        per_task = (env_threads or usable_cores()) // max(1, executor.threads)
        torch.set_num_threads(max(1, min(saved_threads, per_task)))
    try:
        return _execute(job, executor, norm, progress, t_start, measurements)
    finally:
        executor.close()
        if saved_threads is not None:
            import torch

            torch.set_num_threads(saved_threads)


def _devices_used(results: list[dict[str, Any]]) -> dict[str, str]:
    """``{worker: device}`` of the chunks this run ran the network on.

    Workers are sorted (numbers by value); one that used several devices lists them joined
    by commas.
    """
    seen: dict[str, list[str]] = {}
    for r in results:
        if r.get("device") is not None:
            devices = seen.setdefault(r["worker"], [])
            if r["device"] not in devices:
                devices.append(r["device"])
    order = sorted(seen, key=lambda w: (0, int(w), w) if w.isdigit() else (1, 0, w))
    return {w: ",".join(sorted(seen[w])) for w in order}


def _execute(
    job: _Job,
    executor: _Executor,
    norm: dict[str, Any],
    progress: Callable[[str, int, int], None] | None,
    t_start: float,
    measurements: str,
) -> BatchResult:
    import dask
    import pandas as pd
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_label_metadata, write_multiscales_metadata
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    plan, out = job.plan, Path(job.out)
    chunks = plan.chunks()
    todo = [c for c in chunks if not _marker(out, c.key).exists()]
    stats_tasks = {}
    tasks = []
    for c in todo:
        if c.plane not in stats_tasks:
            stats_tasks[c.plane] = dask.delayed(_plane_stats, pure=False)(
                job, c.plane, norm, dask_key_name=f"stats-{c.plane}-{job.out}"
            )
        tasks.append(
            dask.delayed(_run_chunk, pure=False)(
                job, c, stats_tasks[c.plane], dask_key_name=f"chunk-{c.key}-{job.out}"
            )
        )
    t0 = time.perf_counter()
    results = executor.run(tasks, progress, "chunks")
    t_chunks = time.perf_counter() - t0
    failed = [r for r in results if r["status"] == "failed"]
    computed = len(results) - len(failed)

    # ---- stitch: match labels of neighbouring chunks, connected components per plane
    t0 = time.perf_counter()
    markers = {c.key: _read_json(_marker(out, c.key)) for c in chunks}
    by_pos = {(c.plane, c.row, c.col): c for c in chunks}
    match_tasks = []
    for c in chunks:
        if markers[c.key] is None:
            continue
        nbs = [
            by_pos[(c.plane, c.row + dr, c.col + dc)]
            for dr, dc in ((0, 1), (1, -1), (1, 0), (1, 1))
            if (c.plane, c.row + dr, c.col + dc) in by_pos
            and markers[by_pos[(c.plane, c.row + dr, c.col + dc)].key] is not None
        ]
        if nbs:
            match_tasks.append(
                dask.delayed(_match_task, pure=False)(
                    job, c, nbs, dask_key_name=f"match-{c.key}-{job.out}"
                )
            )
    edges = [e for part in executor.run(match_tasks, progress, "stitch") for e in part]

    offsets: dict[str, int] = {}
    plane_nodes: dict[int, list[Chunk]] = {}
    total = 0
    for c in chunks:
        offsets[c.key] = total
        total += (markers[c.key] or {}).get("n_labels", 0)
        plane_nodes.setdefault(c.plane, []).append(c)
    src = np.array([offsets[a] + i - 1 for a, i, _, _ in edges], np.int64)
    dst = np.array([offsets[b] + j - 1 for _, _, b, j in edges], np.int64)
    graph = coo_matrix((np.ones(len(src)), (src, dst)), shape=(total, total))
    _, component = connected_components(graph, directed=False)

    tables = []
    luts: dict[str, np.ndarray] = {}
    n_instances = 0
    for n, plane_chunks in plane_nodes.items():
        path, p = plan.source_of(n)
        final: dict[int, int] = {}
        for c in plane_chunks:
            marker = markers[c.key]
            if marker is None:
                continue
            table = pd.DataFrame(marker["table"])
            lut = np.zeros(marker["n_labels"] + 1, np.uint32)
            if len(table):
                comps = component[offsets[c.key] + table["label"].to_numpy(np.int64) - 1]
                ids = []
                for comp in comps:
                    final.setdefault(int(comp), len(final) + 1)
                    ids.append(final[int(comp)])
                lut[table["label"].to_numpy(np.int64)] = ids
                table["label"] = ids
                table.insert(0, "index", n)
                table.insert(0, "plane", p)
                table.insert(0, "image", Path(path).name)
                tables.append(table)
            luts[c.key] = lut
        n_instances += len(final)
    t_stitch = time.perf_counter() - t0

    # ---- write: final labels, pyramids, metadata, table, report
    t0 = time.perf_counter()
    root = zarr.open_group(str(out), mode="a", zarr_format=2)
    label_root = root.require_group("labels")
    label_group = label_root.require_group(LABELS_NAME)
    n, (_, h, w) = len(plan.planes), plan.shape
    s = plan.chunk_size
    if "0" not in label_group or label_group["0"].shape != (n, h, w):
        label_group.create_array(
            "0", shape=(n, h, w), chunks=(1, s, s), dtype=np.uint32, fill_value=0, overwrite=True
        )
    relabel = [
        dask.delayed(_relabel_task, pure=False)(
            job, c, luts[c.key], dask_key_name=f"relabel-{c.key}-{job.out}"
        )
        for c in chunks
        if c.key in luts
    ]
    executor.run(relabel, progress, "write")
    levels = _n_levels(h, w, s)
    fmt = FormatV04()
    _pyramid(root, out, levels, s, False, executor, job.key)
    _pyramid(label_group, out / "labels" / LABELS_NAME, levels, s, True, executor, job.key)
    write_multiscales_metadata(
        root, _datasets(levels, 4), fmt, [_IMAGE_AXIS, _C_AXIS, *_YX_AXES], name="image"
    )
    write_multiscales_metadata(
        label_group, _datasets(levels, 3), fmt, [_IMAGE_AXIS, *_YX_AXES], name=LABELS_NAME
    )
    label_root.attrs["labels"] = []
    write_label_metadata(label_root, LABELS_NAME, fmt=fmt, source={"image": "../../"})
    if job.save_maps:
        for name in MAP_NAMES:
            group = root["maps"][name]
            _pyramid(group, out / "maps" / name, levels, s, False, executor, job.key)
            axes = [_IMAGE_AXIS, *([_C_AXIS] if name == "embeddings" else []), *_YX_AXES]
            write_multiscales_metadata(group, _datasets(levels, len(axes)), fmt, axes, name=name)

    table_name = f"measurements.{measurements}"
    if tables:
        table = _combine(tables).sort_values(["index", "label"], kind="stable")
    else:
        table = pd.DataFrame(columns=["image", "plane", "index", "label", "area"])
    if measurements == "csv":
        table.to_csv(out / table_name, index=False)
    else:
        table.to_parquet(out / table_name, index=False)
    t_write = time.perf_counter() - t0

    incomplete = sorted({f["input"] for f in failed})
    inputs_report = [
        {
            "path": src["path"],
            "planes": src["shape"][0],
            "status": "incomplete" if src["path"] in incomplete else "ok",
        }
        for src in plan.sources
    ]
    report = {
        "out": str(out),
        "inputs": inputs_report,
        "skipped_inputs": plan.errors,
        "planes": n,
        "shape": [n, *plan.shape],
        "dtype": plan.dtype,
        "chunk_size": s,
        "halo": plan.halo,
        "chunks": {
            "total": len(chunks),
            "skipped": len(chunks) - len(todo),
            "computed": computed,
            "failed": len(failed),
        },
        "failed_chunks": failed,
        "scale": job.scale,
        **({"scale_estimates": job.scale_estimates} if job.scale_estimates is not None else {}),
        "instances": n_instances,
        "measurements": table_name,
        "scheduler": executor.kind,
        "devices": _devices_used(results),
        "seconds": {
            "chunks": round(t_chunks, 3),
            "stitch": round(t_stitch, 3),
            "write": round(t_write, 3),
            "total": round(time.perf_counter() - t_start, 3),
        },
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    if not failed:
        _atomic_json(_work(out) / "complete.json", report)
        for name in ("windows.zarr", "local.zarr"):
            shutil.rmtree(_work(out) / name, ignore_errors=True)
    return BatchResult(out, report, out / table_name)
