"""Model loading and prediction for the widget, with an in-memory and an on-disk cache.

The widget calls only :func:`get_model` and :func:`predict_image`; tests replace them
(``monkeypatch``) with an oracle so that no trained network is needed.

Two caches: :func:`cached_predict` keeps the last few predictions in memory (keyed by image
content and model choice), and :func:`predict_image` passes a per-user folder (see
:func:`cache_dir`) to :func:`napari_instseg.core.predict.predict`, whose zarr cache is keyed
by image content, model tensors and prediction parameters. So re-opening an image after
restarting napari reads the maps back instead of running the network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..core.types import Prediction

#: The model choice meaning "weights shipped with the package".
SHIPPED = "shipped"

#: Environment variable naming the cache folder (``off`` disables the on-disk cache).
CACHE_ENV = "NAPARI_INSTSEG_CACHE"
#: Environment variable with the cache size limit in GB (default :data:`CACHE_MAX_GB`).
CACHE_MAX_ENV = "NAPARI_INSTSEG_CACHE_MAX_GB"
CACHE_MAX_GB = 2.0
_OFF = {"", "0", "off", "no", "none", "false"}

_MODELS: dict[str, Any] = {}
_PREDICTIONS: OrderedDict[tuple[str, str, str], Prediction] = OrderedDict()
_MAX_CACHED = 6
#: ... and at most this many bytes of them (the newest is always kept): a 4000 x 4000
#: image's maps take about 2 GB, a 520 x 696 image's 30 MB
_MAX_CACHED_BYTES = 3 * 2**30


class Cancelled(Exception):
    """Raised from a progress callback to stop a running prediction."""


def array_digest(array: np.ndarray) -> str:
    """Return a short content hash of an array (shape, dtype and bytes).

    Parameters
    ----------
    array : np.ndarray
        Any array (a copy is made only if it is not C-contiguous).

    Returns
    -------
    str
        Hex digest, 32 characters.
    """
    arr = np.ascontiguousarray(np.asarray(array))
    h = hashlib.blake2b(digest_size=16)
    h.update(str((arr.shape, arr.dtype.str)).encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def model_key(model: str | Path | None) -> str:
    """Name a model choice for cache keys: ``"shipped"`` or the resolved weights path."""
    if model in (None, "", SHIPPED):
        return SHIPPED
    path = Path(model).expanduser().resolve()
    stamp = path.stat().st_mtime_ns if path.exists() else 0
    return f"{path}@{stamp}"


def get_model(model: str | Path | None = None) -> Any:
    """Load (once) the shipped model or a weights file.

    Parameters
    ----------
    model : str or Path or None
        ``None``/``"shipped"`` for the packaged weights, or a path to a weights file.

    Returns
    -------
    object
        The loaded model (see :func:`napari_instseg.core.weights.load_model`).

    Raises
    ------
    FileNotFoundError
        If a weights path is given that does not exist.
    """
    key = model_key(model)
    if key not in _MODELS:
        from ..core.weights import load_model

        if key == SHIPPED:
            _MODELS[key] = load_model(None)
        else:
            path = Path(model).expanduser()  # type: ignore[arg-type]
            if not path.exists():
                raise FileNotFoundError(f"Model weights file not found: {path}")
            _MODELS[key] = load_model(path)
    return _MODELS[key]


def cache_dir() -> Path | None:
    """The folder of the on-disk prediction cache, or None when it is switched off.

    ``$NAPARI_INSTSEG_CACHE`` when set (``off`` switches the cache off), else the user cache
    folder of the platform (``~/.cache/napari-instseg`` on Linux).

    Returns
    -------
    Path or None
        ``<root>/predictions``.
    """
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        if value.strip().lower() in _OFF:
            return None
        root = Path(value).expanduser()
    else:
        try:
            from platformdirs import user_cache_dir

            root = Path(user_cache_dir("napari-instseg", appauthor=False))
        except ImportError:  # platformdirs comes with napari; be safe anyway
            root = Path.home() / ".cache" / "napari-instseg"
    return root / "predictions"


def _usable_cache() -> Path | None:
    folder = cache_dir()
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK) else None


def prune_cache(folder: Path | None = None, max_gb: float | None = None) -> list[Path]:
    """Delete the least recently written predictions until the cache fits its size limit.

    Parameters
    ----------
    folder : Path, optional
        The cache folder (default :func:`cache_dir`).
    max_gb : float, optional
        Size limit in GB (default ``$NAPARI_INSTSEG_CACHE_MAX_GB`` or 2).

    Returns
    -------
    list of Path
        The entries deleted.
    """
    folder = cache_dir() if folder is None else Path(folder)
    if folder is None or not folder.is_dir():
        return []
    if max_gb is None:
        try:
            max_gb = float(os.environ.get(CACHE_MAX_ENV, CACHE_MAX_GB))
        except ValueError:
            max_gb = CACHE_MAX_GB
    entries = []
    for entry in folder.glob("*.zarr"):
        size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        entries.append((entry.stat().st_mtime, size, entry))
    entries.sort()
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, entry in entries[:-1]:  # never the newest one
        if total <= max_gb * 1e9:
            break
        shutil.rmtree(entry, ignore_errors=True)
        total -= size
        removed.append(entry)
    return removed


@contextmanager
def leave_a_core() -> Iterator[None]:
    """Let torch use at most all cores but one, so the GUI thread keeps a core.

    The thread count is restored afterwards; with one core (or one torch thread, e.g.
    ``OMP_NUM_THREADS=1``) nothing changes.
    """
    import torch

    before = torch.get_num_threads()
    wanted = max(1, min(before, (os.cpu_count() or 1) - 1))
    if wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if wanted != before:
            torch.set_num_threads(before)


def predict_image(
    image: np.ndarray,
    model: str | Path | None = None,
    device: str = "auto",
    progress: Callable[..., Any] | None = None,
    tta: int = 1,
    scale: float | str = 1.0,
) -> Prediction:
    """Run the network on one 2D image, or read its maps from the on-disk cache.

    No in-memory caching here (see :func:`cached_predict`). The disk cache
    (:func:`cache_dir`) is used when it is writable; torch leaves a core to the GUI
    (:func:`leave_a_core`).

    Parameters
    ----------
    image : np.ndarray
        (H, W) or (C, H, W) raw image.
    model : str or Path or None
        Model choice, as for :func:`get_model`.
    device : str
        ``"auto"``, ``"cuda"``, ``"mps"`` or ``"cpu"``.
    progress : callable, optional
        Called by the core with progress information; may raise :class:`Cancelled`.
    tta : int
        Test-time augmentation passes (1, 2, 4 or 8; see ``core.predict.iter_predict``).
    scale : float or "auto"
        Resizing factor for objects of another size (see ``core.predict.predict``).

    Returns
    -------
    Prediction
        The network outputs.
    """
    from ..core.predict import predict

    folder = _usable_cache()
    with leave_a_core():
        prediction = predict(
            image,
            model=get_model(model),
            device=device,
            tta=tta,
            progress=progress,
            cache=folder,
            scale=scale,
        )
    if folder is not None and not prediction.metadata.get("cached", False):
        prune_cache(folder)
    return prediction


def cached_predict(
    image: np.ndarray,
    model: str | Path | None = None,
    device: str = "auto",
    progress: Callable[..., Any] | None = None,
    tta: int = 1,
    scale: float | str = 1.0,
) -> Prediction:
    """Like :func:`predict_image`, but reuse the result for the same image and model.

    The last ``_MAX_CACHED`` results are kept in memory, fewer when together they would
    take more than ``_MAX_CACHED_BYTES`` (large images; a prediction at another scale
    holds the network's grid too).

    Parameters
    ----------
    image : np.ndarray
        (H, W) or (C, H, W) raw image.
    model : str or Path or None
        Model choice.
    device : str
        Device name; results from any device are reused (they agree up to float error).
    progress : callable, optional
        Progress callback passed to the core.
    tta : int
        Test-time augmentation passes; part of the cache key.
    scale : float or "auto"
        Resizing factor (see ``core.predict.predict``); part of the cache key.

    Returns
    -------
    Prediction
        The network outputs, possibly from the cache.
    """
    key = _memory_key(image, model, tta, scale)
    if key in _PREDICTIONS:
        _PREDICTIONS.move_to_end(key)
        return _PREDICTIONS[key]
    prediction = predict_image(
        image, model=model, device=device, progress=progress, tta=tta, scale=scale
    )
    _PREDICTIONS[key] = prediction
    while len(_PREDICTIONS) > _MAX_CACHED or (
        len(_PREDICTIONS) > 1 and sum(p.nbytes for p in _PREDICTIONS.values()) > _MAX_CACHED_BYTES
    ):
        _PREDICTIONS.popitem(last=False)
    return prediction


def _memory_key(
    image: np.ndarray, model: str | Path | None, tta: int, scale: float | str = 1.0
) -> tuple[str, str, str]:
    """Key of :data:`_PREDICTIONS`: image content, model, augmentation passes, scale."""
    options = (f"tta{tta}" if tta != 1 else "") + (f"scale{scale}" if scale != 1.0 else "")
    return (array_digest(image), model_key(model), options)


def is_cached(
    image: np.ndarray, model: str | Path | None = None, tta: int = 1, scale: float | str = 1.0
) -> bool:
    """Whether :func:`cached_predict` would return without running the network."""
    return _memory_key(image, model, tta, scale) in _PREDICTIONS


def clear_cache() -> None:
    """Forget cached predictions and loaded models (in memory; the disk cache stays)."""
    _PREDICTIONS.clear()
    _MODELS.clear()


def device_in_use(preference: str) -> str:
    """Return the device that ``preference`` resolves to on this machine, e.g. ``"cpu"``.

    Parameters
    ----------
    preference : str
        ``"auto"``, ``"cuda"``, ``"mps"`` or ``"cpu"``.

    Returns
    -------
    str
        The device type, or a message starting with ``"unavailable"``.
    """
    from ..core.device import get_device

    try:
        return get_device(preference).type
    except ValueError as err:
        return f"unavailable ({err})"
