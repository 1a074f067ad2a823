"""Model loading and prediction for the widget, with an in-memory cache.

The widget calls only :func:`get_model` and :func:`predict_image`; tests replace them
(``monkeypatch``) with an oracle so that no trained network is needed.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..core.types import Prediction

#: The model choice meaning "weights shipped with the package".
SHIPPED = "shipped"

_MODELS: dict[str, Any] = {}
_PREDICTIONS: OrderedDict[tuple[str, str, str], Prediction] = OrderedDict()
_MAX_CACHED = 6


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


def predict_image(
    image: np.ndarray,
    model: str | Path | None = None,
    device: str = "auto",
    progress: Callable[..., Any] | None = None,
) -> Prediction:
    """Run the network on one 2D image (no caching here; see :func:`cached_predict`).

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

    Returns
    -------
    Prediction
        The network outputs.
    """
    from ..core.predict import predict

    return predict(image, model=get_model(model), device=device, progress=progress)


def cached_predict(
    image: np.ndarray,
    model: str | Path | None = None,
    device: str = "auto",
    progress: Callable[..., Any] | None = None,
) -> Prediction:
    """Like :func:`predict_image`, but reuse the result for the same image and model.

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

    Returns
    -------
    Prediction
        The network outputs, possibly from the cache.
    """
    key = (array_digest(image), model_key(model), "")
    if key in _PREDICTIONS:
        _PREDICTIONS.move_to_end(key)
        return _PREDICTIONS[key]
    prediction = predict_image(image, model=model, device=device, progress=progress)
    _PREDICTIONS[key] = prediction
    while len(_PREDICTIONS) > _MAX_CACHED:
        _PREDICTIONS.popitem(last=False)
    return prediction


def is_cached(image: np.ndarray, model: str | Path | None = None) -> bool:
    """Whether :func:`cached_predict` would return without running the network."""
    return (array_digest(image), model_key(model), "") in _PREDICTIONS


def clear_cache() -> None:
    """Forget cached predictions and loaded models."""
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
