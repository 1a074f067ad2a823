"""Reading images and instance masks from disk.

:func:`read_image` returns every image in one canonical layout, ``(N, C, H, W)``: ``N``
planes (a stack is a batch of 2D images: z-slices, time points and pages are all planes),
``C`` channels, then the two spatial axes. A 2D grayscale image is ``(1, 1, H, W)``, an RGB
PNG ``(1, 3, H, W)``, a multi-page grayscale TIFF ``(N, 1, H, W)``. :func:`read_image_2d`
reads one plane as ``(C, H, W)``. :func:`read_bbbc010` reads the BBBC010 benchmark layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile
from imageio.v3 import imread as _imread_png

from .grow import WormSeeds
from .types import Sample

_BBBC010_IMAGE = re.compile(r"_(?P<well>[A-P]\d{2})_(?P<channel>w[12])_[0-9A-Fa-f-]+\.tif{1,2}$")
_BBBC010_MASK = re.compile(r"^(?P<well>[A-P]\d{2})_(?P<index>\d+)_ground_truth\.png$")


def bbbc010_channel(path: str | Path) -> str | None:
    """BBBC010's channel of a file by its name: ``"w2"`` (bright-field), ``"w1"`` (Sytox), None.

    Parameters
    ----------
    path : str or Path
        A file.

    Returns
    -------
    str or None
        The channel when the name is BBBC010's (``..._<WELL>_w<N>_<GUID>.tif``).
    """
    m = _BBBC010_IMAGE.search(Path(path).name)
    return m["channel"] if m else None


#: File name endings read by :func:`read_image`, by reader.
TIFF_SUFFIXES = (".tif", ".tiff")
PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
ZARR_SUFFIXES = (".zarr",)
_CHANNEL_AXES = "CS"  # tifffile axes codes for channels / samples (RGB)
_SMALL = 4  # an axis this short or shorter is taken for channels when nothing says otherwise


def path_list(paths: str | Path | Iterable[str | Path]) -> list[str | Path]:
    """The items of a path argument: a single ``str`` or ``Path`` is one path.

    Public functions that take several paths accept one as it is; without this a ``str``
    would be iterated over its characters (``"."`` being the current folder).

    Parameters
    ----------
    paths : str, Path or iterable of str or Path
        One path or several.

    Returns
    -------
    list of str or Path
        ``[paths]`` for a single path, else the items.
    """
    if isinstance(paths, str | Path):
        return [paths]
    return list(paths)


def read_image(path: str | Path, *, channel_axis: int | None = None) -> np.ndarray:
    """Read an image file into the canonical ``(N, C, H, W)`` layout.

    Parameters
    ----------
    path : str or Path
        A TIFF (``.tif``, ``.tiff``; tifffile), a PNG/JPEG/BMP (imageio), or a zarr store:
        a zarr array, or a zarr / OME-Zarr group, of which the first multiscale level
        (OME-Zarr) or else the array ``"0"`` is read.
    channel_axis : int, optional
        Axis of the array *as stored* that holds the channels (negative counts from the
        end). When omitted it is taken from the file's metadata (tifffile axes ``C``/``S``,
        OME-Zarr axis of type ``"channel"``), else guessed: a last axis of length <= 4
        (RGB/RGBA, "YXC"), else the first axis of a 3D or the second axis of a 4D array if
        of length <= 4 ("CYX", "ZCYX"); otherwise there are no channels and all leading
        axes together are the stack of planes.

    Returns
    -------
    np.ndarray
        ``(N, C, H, W)`` in the file's own numeric dtype (not normalised); boolean images
        become ``uint8`` 0/1. A constant alpha channel of an RGBA PNG/JPEG is dropped.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        For an unknown file type, a corrupt TIFF, an empty image, a non-numeric dtype,
        fewer than two or (after dropping length-1 axes) more than four dimensions, or a
        bad ``channel_axis``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No such image file or zarr store: {path}")
    axes: str | None = None
    suffix = _suffix(path)
    if suffix in TIFF_SUFFIXES:
        try:
            with tifffile.TiffFile(path) as tif:
                if not tif.series:
                    raise ValueError(f"{path} holds no image data")
                series = tif.series[0]
                data = series.asarray()
                axes = series.axes
        except tifffile.TiffFileError as err:  # a ValueError that does not name the file
            raise ValueError(f"Cannot read {path} as a TIFF: {err}") from err
    elif suffix in PLAIN_SUFFIXES:
        data = np.asarray(_imread_png(path))
        if data.ndim == 3 and channel_axis is None:
            if data.shape[-1] in (2, 4):
                alpha = data[..., -1]
                if (alpha == alpha.flat[0]).all():
                    data = data[..., :-1]
            axes = "YXC"
    elif suffix in ZARR_SUFFIXES or _is_zarr(path):
        data, axes = _read_zarr(path)
    else:
        raise ValueError(
            f"Cannot read {path.name!r}: unknown file type {suffix or '(none)'!r}; expected "
            f"one of {', '.join(TIFF_SUFFIXES + PLAIN_SUFFIXES + ZARR_SUFFIXES)}"
        )
    return _to_nchw(np.asarray(data), axes, channel_axis, str(path))


def read_image_2d(
    path: str | Path, *, plane: int = 0, channel_axis: int | None = None
) -> np.ndarray:
    """Read one 2D plane of an image file as ``(C, H, W)``.

    Parameters
    ----------
    path : str or Path
        Any file :func:`read_image` reads.
    plane : int
        Which plane of a stack (negative counts from the end).
    channel_axis : int, optional
        See :func:`read_image`.

    Returns
    -------
    np.ndarray
        ``(C, H, W)``; a grayscale image is ``(1, H, W)`` (use ``[0]`` for ``(H, W)``).

    Raises
    ------
    IndexError
        If the stack has no plane ``plane``.
    """
    stack = read_image(path, channel_axis=channel_axis)
    if not -len(stack) <= plane < len(stack):
        raise IndexError(f"{path} has {len(stack)} plane(s); there is no plane {plane}")
    return stack[plane]


def _suffix(path: Path) -> str:
    """Lower-case file type (``.ome.zarr`` gives ``.zarr``, ``.ome.tif`` gives ``.tif``)."""
    return path.suffix.lower()


def _is_zarr(path: Path) -> bool:
    """True for a folder holding zarr (v2 or v3) metadata."""
    return path.is_dir() and any(
        (path / marker).exists() for marker in (".zarray", ".zgroup", "zarr.json")
    )


def _read_zarr(path: Path) -> tuple[np.ndarray, str | None]:
    """Read a zarr array, or the first multiscale level / array "0" of a zarr group."""
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as err:  # zarr raises several types for a folder that is not a store
        raise ValueError(f"{path} is not a readable zarr array or group: {err}") from err
    axes = None
    if isinstance(node, zarr.Group):
        attrs = dict(node.attrs)
        multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
        if multiscales:
            meta = multiscales[0]
            key = meta["datasets"][0]["path"]
            axes = _ome_axes(meta.get("axes", []))
        elif "0" in node:
            key = "0"
        else:
            arrays = sorted(name for name, _ in node.arrays())
            if not arrays:
                raise ValueError(f"zarr group {path} holds no arrays")
            key = arrays[0]
        node = node[key]
    data = np.asarray(node[...])
    if axes is not None and len(axes) != data.ndim:
        axes = None
    return data, axes


def _ome_axes(axes: list) -> str | None:
    """OME-Zarr axes metadata (names or dicts with name/type) as tifffile-style codes."""
    codes = []
    for axis in axes:
        name = axis.get("name", "") if isinstance(axis, dict) else str(axis)
        kind = axis.get("type", "") if isinstance(axis, dict) else ""
        codes.append("C" if kind == "channel" or name.lower() == "c" else name.upper()[:1] or "Q")
    return "".join(codes) or None


def _to_nchw(
    data: np.ndarray, axes: str | None, channel_axis: int | None, where: str
) -> np.ndarray:
    """Move an array with optional axes codes to (N, C, H, W)."""
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise ValueError(f"{where}: unsupported dtype {data.dtype} (need integers or floats)")
    if data.ndim < 2:
        raise ValueError(f"{where}: a {data.ndim}D array is not an image (shape {data.shape})")
    if data.size == 0:
        raise ValueError(f"{where}: the image is empty (shape {data.shape})")
    if channel_axis is not None:
        if data.ndim == 2:
            raise ValueError(f"{where}: a 2D image has no channel axis (shape {data.shape})")
        if not -data.ndim <= channel_axis < data.ndim:
            raise ValueError(
                f"{where}: channel_axis={channel_axis} is out of range for shape {data.shape}"
            )
        channel_axis %= data.ndim
        axes = None
    if data.ndim > 4:
        # drop length-1 axes that are neither the channel axis nor one of the last two
        keep = [
            i
            for i in range(data.ndim)
            if data.shape[i] != 1 or i == channel_axis or i >= data.ndim - 2
        ]
        if axes is not None:
            axes = "".join(axes[i] for i in keep)
        if channel_axis is not None:
            channel_axis = keep.index(channel_axis)
        data = data.reshape([data.shape[i] for i in keep])
        if data.ndim > 4:
            raise ValueError(
                f"{where}: {data.ndim}D images are not supported (shape {data.shape}, axes "
                f"{axes or 'unknown'}); at most 4D: planes x channels x height x width"
            )
    if channel_axis is None:
        channel_axis = _guess_channel_axis(data.shape, axes)
    if channel_axis is None:
        return data.reshape((-1, 1, *data.shape[-2:]))
    spatial = [i for i in range(data.ndim) if i != channel_axis][-2:]
    other = [i for i in range(data.ndim) if i != channel_axis and i not in spatial]
    moved = np.transpose(data, (*other, channel_axis, *spatial))
    return moved.reshape((-1, *moved.shape[-3:]))


def _guess_channel_axis(shape: tuple[int, ...], axes: str | None) -> int | None:
    """Channel axis from axes codes, else from a short last / first axis, else None."""
    ndim = len(shape)
    if ndim == 2:
        return None
    if axes is not None and len(axes) == ndim:
        found = [i for i, a in enumerate(axes) if a in _CHANNEL_AXES]
        if len(found) == 1:
            return found[0]
        if not found and axes.endswith("YX"):
            return None  # the metadata names every axis and none is a channel
    if shape[-1] <= _SMALL < min(shape[-2], shape[-3]):
        return ndim - 1
    if shape[0] <= _SMALL and ndim == 3:
        return 0
    if ndim == 4 and shape[1] <= _SMALL:
        return 1
    return None


def bbbc010_wells(root: str | Path) -> list[str]:
    """List the wells of a BBBC010-style folder that have a bright-field (w2) image.

    Parameters
    ----------
    root : str or Path
        Folder with ``images/`` and ``masks/``.

    Returns
    -------
    list of str
        Sorted well names, e.g. ``["A01", "A02", ...]``.
    """
    if not Path(root).is_dir():
        raise FileNotFoundError(f"BBBC010 folder {root} does not exist")
    images = Path(root) / "images"
    if not images.is_dir():
        raise FileNotFoundError(f"{root} has no images/ folder (expected the BBBC010 layout)")
    wells = set()
    for path in images.iterdir():
        m = _BBBC010_IMAGE.search(path.name)
        if m and m["channel"] == "w2":
            wells.add(m["well"])
    return sorted(wells)


def read_bbbc010(
    root: str | Path,
    wells: Iterable[str] | None = None,
    with_w1: bool = True,
    threads: int | None = None,
) -> list[Sample]:
    """Read BBBC010-style data: a bright-field (w2) image and one mask PNG per worm.

    The files are decoded on a pool of threads (PNG and TIFF decoding release Python's
    global lock); the result does not depend on the number of threads.

    Parameters
    ----------
    root : str or Path
        Folder with ``images/*_<WELL>_w{1,2}_<GUID>.tif`` and
        ``masks/<WELL>_<NN>_ground_truth.png``.
    wells : iterable of str or str, optional
        Wells to read, e.g. ``["A01", "A02"]`` or ``"A01"`` (default: all with a w2 image).
    with_w1 : bool
        Also read the Sytox (w1) channel into ``Sample.channels["w1"]`` when present.
    threads : int, optional
        Threads decoding files (default: the cores this process may use, at most
        :data:`READ_THREADS`); 1 decodes in this thread.

    Returns
    -------
    list of Sample
        One per well, ``image`` (H, W) float32 bright-field, ``masks`` (N, H, W) bool with
        overlaps kept, ordered by the mask file's number.

    Raises
    ------
    FileNotFoundError
        If the folder, a requested well's image or its masks are missing.
    ValueError
        If a mask's size differs from its image's, or ``threads`` is not positive.
    """
    if threads is None:
        threads = min(READ_THREADS, _usable_cores())
    if int(threads) != threads or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    root = Path(root)
    available = bbbc010_wells(root)
    if isinstance(wells, str):
        wells = [wells]
    wells = available if wells is None else list(wells)
    missing = sorted(set(wells) - set(available))
    if missing:
        raise FileNotFoundError(f"No bright-field (w2) image in {root / 'images'} for {missing}")
    images: dict[tuple[str, str], Path] = {}
    for path in (root / "images").iterdir():
        m = _BBBC010_IMAGE.search(path.name)
        if m:
            images[(m["well"], m["channel"])] = path
    masks: dict[str, list[tuple[int, Path]]] = {}
    mask_dir = root / "masks"
    if not mask_dir.is_dir():
        raise FileNotFoundError(f"{root} has no masks/ folder (expected the BBBC010 layout)")
    for path in mask_dir.iterdir():
        m = _BBBC010_MASK.match(path.name)
        if m:
            masks.setdefault(m["well"], []).append((int(m["index"]), path))

    pool = ThreadPoolExecutor(int(threads)) if threads > 1 else None

    def submit(fn: Callable[[Path], np.ndarray], path: Path) -> Callable[[], np.ndarray]:
        if pool is None:
            return lambda: fn(path)  # decoded when asked for, in order
        return pool.submit(fn, path).result

    # every file of every well is queued at once; the results are taken well by well in
    # order, so the first problem met is the one the serial reading met first
    jobs = []
    for well in wells:
        w1 = images.get((well, "w1")) if with_w1 else None
        files = [path for _, path in sorted(masks.get(well, []))]
        jobs.append(
            (
                well,
                submit(_read_tiff_float32, images[(well, "w2")]),
                None if w1 is None else submit(_read_tiff_float32, w1),
                files,
                [submit(_read_mask, path) for path in files],
            )
        )
    samples = []
    try:
        for well, image_job, w1_job, files, mask_jobs in jobs:
            image = image_job()
            if image.ndim != 2:
                raise ValueError(f"{images[(well, 'w2')]} is not a 2D image (shape {image.shape})")
            channels = {} if w1_job is None else {"w1": w1_job()}
            if not files:
                raise FileNotFoundError(f"No masks/{well}_NN_ground_truth.png for well {well}")
            stack = np.empty((len(files), *image.shape), bool)
            for k, (path, mask_job) in enumerate(zip(files, mask_jobs, strict=True)):
                mask = mask_job()
                if mask.shape != image.shape:
                    raise ValueError(f"{path.name} is {mask.shape} but the image is {image.shape}")
                stack[k] = mask
            samples.append(
                Sample(
                    image=image,
                    masks=stack,
                    name=well,
                    channels=channels,
                    metadata={"source": str(images[(well, "w2")]), "dataset": "BBBC010"},
                )
            )
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return samples


#: Most threads :func:`read_bbbc010` decodes files on by default.
READ_THREADS = 8
#: PIL modes whose pixels a mask PNG is read as directly (channel 0 > 0 is the mask); others
#: (palette images, 32-bit integers) go through imageio's conversions.
_DIRECT_MASK_MODES = ("1", "L", "LA", "RGB", "RGBA", "I;16")


def _usable_cores() -> int:
    """CPU cores this process may run on (its affinity), or ``os.cpu_count()``."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _read_tiff_float32(path: Path) -> np.ndarray:
    """A TIFF's pixels as float32."""
    return tifffile.imread(path).astype(np.float32)


def _read_mask(path: Path) -> np.ndarray:
    """A mask PNG as a 2D bool array (the first channel of a colour PNG, nonzero = mask).

    Decodes with PIL directly (imageio's plugin machinery costs as much as decoding a
    small mask); palette and other modes take imageio's conversions, as before.
    """
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in _DIRECT_MASK_MODES:
            data = np.asarray(im)
        else:
            data = np.asarray(_imread_png(path))
    if data.ndim == 3:
        data = data[..., 0]
    return data > 0


_TRUE = {"1", "true", "yes", "y", "t", "+", "positive"}
_FALSE = {"0", "false", "no", "n", "f", "-", "negative"}


def read_seed_table(path: str | Path) -> dict[int, dict[int, WormSeeds]]:
    """Read clicked seeds from a CSV file, grouped by plane and worm.

    Columns (a header row names them; any order, other columns ignored):

    - the pixel: ``row`` and ``col``, or napari's Points export ``axis-0`` and ``axis-1``
      (2D) or ``axis-0``, ``axis-1``, ``axis-2`` (a stack: plane, row, col); a ``plane``
      column for stacks otherwise (default 0);
    - ``worm`` (or ``label``), optional: seeds with the same value belong to one worm;
      without it every seed is its own worm;
    - ``positive``, optional: 1/0, true/false or yes/no (default positive); a negative seed
      needs a ``worm``, since it takes pixels away from that worm;
    - ``tau``, optional: the worm's similarity threshold (the first one given counts).

    Coordinates are rounded to the nearest pixel (napari's points are floats).

    Parameters
    ----------
    path : str or Path
        The CSV file.

    Returns
    -------
    dict
        ``{plane: {worm: WormSeeds}}``, worms in order of first appearance; seeds without a
        worm get negative keys.

    Raises
    ------
    ValueError
        A file that is not CSV text, missing columns, values that are not numbers, tau
        outside (0, 1), negative seeds without a worm, a worm with only negative seeds.
    FileNotFoundError
        If the file does not exist.
    """
    import csv

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"seed file not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = [f.strip().lower() for f in reader.fieldnames or []]
            rows = [
                {k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader
            ]
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path} is not a CSV text file of seeds: {err}") from err
    if {"row", "col"} <= set(fields):
        axes = ("plane", "row", "col") if "plane" in fields else (None, "row", "col")
    elif {"axis-0", "axis-1", "axis-2"} <= set(fields):
        axes = ("axis-0", "axis-1", "axis-2")
    elif {"axis-0", "axis-1"} <= set(fields):
        axes = (None, "axis-0", "axis-1")
    else:
        raise ValueError(
            f"{path}: needs columns row and col (or napari's axis-0, axis-1), found {fields}"
        )
    worm_key = "worm" if "worm" in fields else "label" if "label" in fields else None
    found: dict[int, dict[int, tuple[list, list, list]]] = {}
    for line, row in enumerate(rows, start=2):
        try:
            coords = [0 if a is None else round(float(row[a])) for a in axes]
            worm = int(float(row[worm_key])) if worm_key and row.get(worm_key) else None
            tau = float(row["tau"]) if row.get("tau") else None
        except ValueError as err:
            raise ValueError(f"{path}, line {line}: not a number ({err})") from None
        if tau is not None and not 0.0 < tau < 1.0:
            raise ValueError(f"{path}, line {line}: tau must be in (0, 1), got {tau}")
        flag = row.get("positive", "").lower() or "1"
        if flag not in _TRUE | _FALSE:
            raise ValueError(f"{path}, line {line}: positive must be 1/0, true/false or yes/no")
        positive = flag in _TRUE
        if worm is None:
            if not positive:
                raise ValueError(f"{path}, line {line}: a negative seed needs a worm")
            worm = -line  # its own worm
        plane, point = coords[0], (coords[1], coords[2])
        seeds = found.setdefault(plane, {}).setdefault(worm, ([], [], []))
        seeds[0 if positive else 1].append(point)
        if tau is not None:
            seeds[2].append(tau)
    planes: dict[int, dict[int, WormSeeds]] = {}
    for plane, worms in found.items():
        for worm, (positive, negative, taus) in worms.items():
            if not positive:
                raise ValueError(f"{path}: worm {worm} (plane {plane}) has only negative seeds")
            planes.setdefault(plane, {})[worm] = WormSeeds(
                tuple(positive), tuple(negative), taus[0] if taus else None
            )
    return planes
