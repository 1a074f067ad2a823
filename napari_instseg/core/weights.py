"""Saving and loading model weights: safetensors plus a JSON metadata file, never pickle.

A model is two files side by side::

    bbbc010.safetensors   tensors only (safetensors cannot run code when loaded)
    bbbc010.json          {"format": ..., "architecture": {...}, "normalization": {...},
                           "training": {wells, commit, time, hardware, ...}, "metrics": {...}}

The JSON is also embedded in the safetensors header, so a lone ``.safetensors`` file loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import InstSegNet, ModelConfig

FORMAT = "napari-instseg-weights/1"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "weights"
SHIPPED_NAME = "bbbc010"
DEFAULT_NORMALIZATION = {"method": "percentile", "low": 1.0, "high": 99.8}


def shipped_weights_path() -> Path:
    """Path of the weights shipped inside the package (BBBC010 bright-field)."""
    return SHIPPED_DIR / f"{SHIPPED_NAME}.safetensors"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(
    model: InstSegNet, path: str | Path, metadata: dict[str, Any] | None = None
) -> Path:
    """Save a model as ``path`` (.safetensors) and ``path`` with suffix .json, atomically.

    Parameters
    ----------
    model : InstSegNet
        The model.
    path : str or Path
        Target ``.safetensors`` file.
    metadata : dict, optional
        Extra metadata (training, metrics, ...); ``architecture``, ``normalization`` and
        ``format`` are filled in when missing.

    Returns
    -------
    Path
        The ``.safetensors`` path written.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(metadata or {})
    meta.setdefault("format", FORMAT)
    meta["architecture"] = model.config.to_dict()
    meta.setdefault("normalization", dict(DEFAULT_NORMALIZATION))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta["sha256"] = state_signature(state)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"napari_instseg": json.dumps(meta)})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta, indent=2).encode())
    return path


def state_signature(state: dict[str, torch.Tensor]) -> str:
    """A SHA-256 of the tensors (names, shapes, values): identifies a model for caching."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Read a weights file's metadata (the JSON beside it, else the safetensors header).

    Parameters
    ----------
    path : str or Path
        The ``.safetensors`` file.

    Returns
    -------
    dict
        The metadata.
    """
    path = Path(path)
    side = path.with_suffix(".json")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    inside = json.loads(header["napari_instseg"]) if "napari_instseg" in header else None
    if side.is_file():
        beside = json.loads(side.read_text())
        # a JSON left from other weights (a copied .safetensors) must not describe these
        if inside is None or beside.get("sha256") == inside.get("sha256"):
            return beside
        warnings.warn(
            f"{side.name} describes other weights than {path.name} (sha256 differs); "
            "using the metadata inside the weights file",
            stacklevel=2,
        )
        return inside
    if inside is None:
        raise ValueError(
            f"{path} has no napari-instseg metadata (no {side.name} beside it and none in the "
            "file header): it was not saved by napari-instseg"
        )
    return inside


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> InstSegNet:
    """Load a model from a weights file, or the shipped BBBC010 model when ``path`` is None.

    Parameters
    ----------
    path : str or Path, optional
        A ``.safetensors`` file saved by :func:`save_model` (or a folder holding exactly one).
    device : str or torch.device
        Where to put the model: ``cpu`` (default), ``cuda``, ``mps`` or ``auto`` (see
        :func:`~napari_instseg.core.device.get_device`).

    Returns
    -------
    InstSegNet
        The model in eval mode, with ``model.metadata`` (dict) and ``model.source`` (path).

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file is not a napari-instseg weights file or does not fit its architecture,
        or the device is unknown or not available.
    """
    from .device import get_device

    target = get_device(device)  # a clear error for an unknown or missing device first
    path = shipped_weights_path() if path is None else Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise ValueError(f"{path} holds {len(found)} .safetensors files; name one")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"No weights file at {path}")
    meta = read_metadata(path)
    if "architecture" not in meta:
        raise ValueError(f"{path}: metadata has no 'architecture'")
    config = ModelConfig.from_dict(meta["architecture"])
    model = InstSegNet(config)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not fit the architecture in its metadata: "
            f"{len(missing)} missing tensors {missing[:3]}, {len(unexpected)} unexpected "
            f"{unexpected[:3]}, {len(wrong)} with wrong shapes {wrong[:3]}"
        )
    model.load_state_dict(state)
    model.metadata = meta
    model.source = str(path)
    return model.to(target).eval()


def model_signature(model: InstSegNet) -> str:
    """The model's identity for caches, computed from its current tensors (a few ms)."""
    return state_signature(model.state_dict())
