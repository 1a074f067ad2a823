"""The training-folder format: what the plugin exports and what fine-tuning reads.

A training folder holds corrected instances so that this package, cellpose, stardist and
EmbedSeg can all train on it directly, and so that nothing is lost on a round trip::

    <root>/
      manifest.json              format, version and one entry per image (written last)
      images/<name>.tif          the image as given: (H, W) or (C, H, W), its own dtype
      masks/<name>.tif           (H, W) uint16 label image, 0 = background, label i + 1 =
                                 instance i; where instances overlap the smaller one wins
      instances/<name>.tif       (N, H, W) uint8 0/1, one plane per instance, written only
                                 for images in which some instances overlap
      channels/<name>/<key>.tif  extra channels (H, W), e.g. the Sytox channel "w1"

Without ``instances/<name>.tif`` the label image holds every instance exactly. See
``docs/data-format.md`` for the manifest's fields.

Every file is first written under a temporary name in its own folder and then moved into
place with :func:`os.replace`; the manifest is replaced last, so a reader sees either the
previous export or the new one, never a half-written file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from .types import Instances, Sample

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "read_training_folder",
    "training_folder_names",
    "write_training_folder",
]

#: Value of the manifest's ``"format"`` field.
FORMAT = "napari-instseg-training-folder"
#: Version of the format written by this module (readers accept this and older).
FORMAT_VERSION = 1
#: Name of the manifest file in the folder.
MANIFEST = "manifest.json"
LABEL_RULE = (
    "label i+1 is instance i; where instances overlap, the smaller instance wins (ties: "
    "lower index); instances/<name>.tif keeps every instance whole"
)
_BAD_NAME = re.compile(r'[\\/:*?"<>|\x00-\x1f]')


def _check_name(name: str, what: str = "sample name") -> str:
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"{what} must be a non-empty string without surrounding spaces: {name!r}")
    if name.startswith(".") or _BAD_NAME.search(name) or len(name) > 200:
        raise ValueError(
            f"{what} {name!r} cannot be a file name: no leading '.', none of "
            '\\ / : * ? " < > | and at most 200 characters'
        )
    return name


def _jsonable(value: Any) -> Any:
    """Metadata as JSON values: arrays and tuples become lists, Paths and others strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _write_tiff(path: Path, data: np.ndarray, *, axes: str, compress: bool) -> None:
    """Write one TIFF (minisblack, so that 3- or 4-plane stacks are never taken for RGB)."""
    tifffile.imwrite(
        path,
        data,
        photometric="minisblack",
        metadata={"axes": axes},
        compression="zlib" if compress else None,
    )


def _tmp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.tmp")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a napari-instseg training-folder manifest")
    version = manifest.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {version!r}; this napari-instseg reads versions "
            f"up to {FORMAT_VERSION} (upgrade the package)"
        )
    if not isinstance(manifest.get("images"), dict):
        raise ValueError(f"{path} has no 'images' table")
    return manifest


def training_folder_names(root: str | Path) -> list[str]:
    """Names of the images in a training folder, in manifest order.

    Parameters
    ----------
    root : str or Path
        The training folder.

    Returns
    -------
    list of str
        Names from ``manifest.json``, or, for a folder without one, the stems of
        ``images/*.tif`` (sorted). Empty for a folder that does not exist yet.
    """
    root = Path(root)
    manifest = _read_manifest(root) if root.is_dir() else None
    if manifest is not None:
        return list(manifest["images"])
    images = root / "images"
    if not images.is_dir():
        return []
    return sorted(p.stem for p in images.iterdir() if p.suffix.lower() in (".tif", ".tiff"))


def _check_sample(sample: Sample) -> None:
    _check_name(sample.name)
    image = np.asarray(sample.image)
    if image.ndim not in (2, 3):
        raise ValueError(
            f"sample {sample.name!r}: image must be (H, W) or (C, H, W), got {image.shape}"
        )
    if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
        raise ValueError(f"sample {sample.name!r}: image dtype {image.dtype} is not numeric")
    hw = image.shape[-2:]
    if sample.masks.shape[1:] != hw and sample.masks.shape[0]:
        raise ValueError(f"sample {sample.name!r}: masks {sample.masks.shape} vs image {hw}")
    n = sample.n_instances
    for field in ("reviewed", "classes"):
        value = getattr(sample, field)
        if value is not None and np.shape(value) != (n,):
            raise ValueError(
                f"sample {sample.name!r}: {field} has shape {np.shape(value)}, expected ({n},)"
            )
    for key, channel in sample.channels.items():
        _check_name(key, f"channel name of sample {sample.name!r}")
        if np.shape(channel) != hw:
            raise ValueError(
                f"sample {sample.name!r}: channel {key!r} is {np.shape(channel)}, image is {hw}"
            )


def write_training_folder(
    root: str | Path,
    samples: Sequence[Sample],
    *,
    model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Export samples (images with corrected instances) as a training folder.

    Parameters
    ----------
    root : str or Path
        The folder; created if missing. An existing training folder is extended: new names
        are added to its manifest, which is rewritten atomically.
    samples : sequence of Sample
        What to write. ``name`` becomes the file name (no path separators, no leading
        ``.``); ``masks`` may overlap; ``reviewed``, ``classes``, ``channels`` and
        ``metadata`` (as JSON: arrays become lists) are kept.
    model : str, optional
        Name or hash of the model that produced the proposals, stored per image; when
        omitted, ``sample.metadata["model"]`` is used if present.
    overwrite : bool
        Replace images whose name is already in the folder. Without it such a name raises
        :class:`FileExistsError` and nothing is written.

    Returns
    -------
    Path
        ``root``.

    Raises
    ------
    FileExistsError
        If a sample's name is already in the folder and ``overwrite`` is False.
    ValueError
        For an invalid or duplicated name, or inconsistent image, masks, flags or channels.
    """
    root = Path(root)
    samples = list(samples)
    for sample in samples:
        _check_sample(sample)
    names = [s.name for s in samples]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"sample names must be unique, repeated: {duplicates}")
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} exists and is not a folder")

    manifest = _read_manifest(root) if root.is_dir() else None
    if manifest is None:
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "images": {}}
    existing = set(manifest["images"]) | set(training_folder_names(root))
    taken = [n for n in names if n in existing or (root / "images" / f"{n}.tif").exists()]
    if taken and not overwrite:
        raise FileExistsError(
            f"{root} already holds {taken}; pass overwrite=True to replace them, or use "
            "other names"
        )

    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    pending: list[tuple[Path, Path]] = []  # (temporary, final)
    entries: dict[str, dict[str, Any]] = {}
    try:
        for sample in samples:
            entries[sample.name] = _stage_sample(root, sample, model, pending)
        for tmp, final in pending:
            os.replace(tmp, final)
        stale = _stale_files(root, manifest, entries)
        manifest = {
            **manifest,
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "label_rule": LABEL_RULE,
            "updated": _now(),
            "images": {**manifest["images"], **entries},
        }
        manifest["images"] = manifest.pop("images")  # keep the long table last
        _write_json_atomic(root / MANIFEST, manifest)
    finally:
        for tmp, _ in pending:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    for folder in (root / "channels").glob("*/"):
        if not any(folder.iterdir()):
            folder.rmdir()
    return root


def _stage_sample(
    root: Path, sample: Sample, model: str | None, pending: list[tuple[Path, Path]]
) -> dict[str, Any]:
    """Write a sample's files under temporary names; return its manifest entry."""
    name = sample.name
    image = np.asarray(sample.image)
    if image.dtype == bool:
        image = image.astype(np.uint8)
    masks = sample.masks
    n = len(masks)
    labels = Instances(masks).to_labels() if n else np.zeros(image.shape[-2:], np.int32)
    labels = labels.astype(np.uint16 if n < 2**16 else np.uint32)
    overlapping = bool(n) and bool((masks.sum(axis=0, dtype=np.int32) > 1).any())

    def stage(rel: str, data: np.ndarray, axes: str, compress: bool) -> str:
        final = root / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_path(final)
        pending.append((tmp, final))
        _write_tiff(tmp, data, axes=axes, compress=compress)
        return rel

    entry: dict[str, Any] = {
        "image": stage(f"images/{name}.tif", image, "YX" if image.ndim == 2 else "CYX", False),
        "mask": stage(f"masks/{name}.tif", labels, "YX", True),
        "instances": (
            stage(f"instances/{name}.tif", masks.astype(np.uint8), "QYX", True)
            if overlapping
            else None
        ),
        "channels": {
            key: stage(f"channels/{name}/{key}.tif", np.asarray(ch), "YX", False)
            for key, ch in sample.channels.items()
        },
        "shape": [int(v) for v in image.shape[-2:]],
        "image_shape": [int(v) for v in image.shape],
        "image_dtype": str(image.dtype),
        "n_instances": n,
        "reviewed": None if sample.reviewed is None else [bool(v) for v in sample.reviewed],
        "classes": None if sample.classes is None else [int(v) for v in sample.classes],
        "source": _jsonable(sample.metadata.get("source")),
        "model": model if model is not None else _jsonable(sample.metadata.get("model")),
        "created": _now(),
        "metadata": _jsonable(sample.metadata),
    }
    return entry


def _stale_files(
    root: Path, manifest: dict[str, Any], entries: dict[str, dict[str, Any]]
) -> list[Path]:
    """Files of overwritten entries that the new entries no longer use."""
    stale = []
    for name, new in entries.items():
        old = manifest["images"].get(name)
        if not old:
            continue
        used = {new["image"], new["mask"], new["instances"], *new["channels"].values()}
        for rel in (old.get("instances"), *(old.get("channels") or {}).values()):
            if rel and rel not in used:
                stale.append(root / rel)
    return stale


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = _tmp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def read_training_folder(root: str | Path) -> list[Sample]:
    """Read a training folder back into samples.

    Parameters
    ----------
    root : str or Path
        A folder written by :func:`write_training_folder`. A folder without
        ``manifest.json`` but with ``images/<name>.tif`` and ``masks/<name>.tif`` label
        images (the stardist / EmbedSeg layout) is read too, instances from the labels.

    Returns
    -------
    list of Sample
        In manifest order. ``masks`` are restored exactly (overlaps included) from
        ``instances/`` where present, else from the label image (instance i = label
        i + 1); ``reviewed``, ``classes``, ``channels`` and ``metadata`` are restored, and
        ``metadata`` gains ``"model"`` and ``"created"`` from the manifest when it lacks
        them.

    Raises
    ------
    FileNotFoundError
        If the folder, its manifest and images, or a file the manifest names is missing.
    ValueError
        If the manifest is invalid, or an image, label image, instance stack or channel
        has a size that does not match the others.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"training folder {root} does not exist")
    manifest = _read_manifest(root)
    if manifest is None:
        return _read_plain_folder(root)
    samples = []
    for name, entry in manifest["images"].items():
        samples.append(_read_entry(root, name, entry))
    return samples


def _load(root: Path, rel: str | None, name: str, what: str) -> np.ndarray:
    if not rel:
        raise ValueError(f"manifest entry {name!r} names no {what} file")
    path = root / rel
    if not path.is_file():
        raise FileNotFoundError(f"{what} of {name!r} is missing: {path}")
    return tifffile.imread(path)


def _read_entry(root: Path, name: str, entry: dict[str, Any]) -> Sample:
    image = _load(root, entry.get("image"), name, "image")
    if image.ndim not in (2, 3):
        raise ValueError(f"image of {name!r} must be (H, W) or (C, H, W), got {image.shape}")
    hw = image.shape[-2:]
    labels = _load(root, entry.get("mask"), name, "label image")
    if labels.shape != hw:
        raise ValueError(
            f"label image of {name!r} is {labels.shape} but its image is {hw[0]} x {hw[1]}"
        )
    n = int(entry.get("n_instances", int(labels.max())))
    if entry.get("instances"):
        stack = _load(root, entry["instances"], name, "instance stack")
        if stack.ndim == 2:
            stack = stack[None]
        if stack.shape[1:] != hw:
            raise ValueError(
                f"instance stack of {name!r} is {stack.shape[1:]} but its image is {hw}"
            )
        if len(stack) != n:
            raise ValueError(
                f"instance stack of {name!r} has {len(stack)} planes, manifest says {n}"
            )
        masks = stack > 0
    else:
        masks = labels[None] == np.arange(1, n + 1, dtype=labels.dtype)[:, None, None]
    channels = {}
    for key, rel in (entry.get("channels") or {}).items():
        channel = _load(root, rel, name, f"channel {key!r}")
        if channel.shape != hw:
            raise ValueError(f"channel {key!r} of {name!r} is {channel.shape}, image is {hw}")
        channels[key] = channel
    reviewed = entry.get("reviewed")
    classes = entry.get("classes")
    for field, value in (("reviewed", reviewed), ("classes", classes)):
        if value is not None and len(value) != n:
            raise ValueError(f"{field} of {name!r} has {len(value)} entries for {n} instances")
    metadata = dict(entry.get("metadata") or {})
    for key in ("model", "created"):
        if entry.get(key) is not None:
            metadata.setdefault(key, entry[key])
    return Sample(
        image=image,
        masks=masks.reshape(n, *hw),
        name=name,
        channels=channels,
        reviewed=None if reviewed is None else np.asarray(reviewed, dtype=bool),
        classes=None if classes is None else np.asarray(classes, dtype=np.int64),
        metadata=metadata,
    )


def _read_plain_folder(root: Path) -> list[Sample]:
    """images/<name>.tif + masks/<name>.tif label images, without a manifest."""
    images = root / "images"
    if not images.is_dir():
        raise FileNotFoundError(
            f"{root} is not a training folder: it has neither {MANIFEST} nor images/"
        )
    samples = []
    for path in sorted(images.iterdir()):
        if path.suffix.lower() not in (".tif", ".tiff") or path.name.startswith("."):
            continue
        mask_path = root / "masks" / path.name
        if not mask_path.is_file():
            raise FileNotFoundError(f"no label image masks/{path.name} for {path}")
        image = tifffile.imread(path)
        labels = tifffile.imread(mask_path)
        if labels.shape != image.shape[-2:]:
            raise ValueError(
                f"{mask_path} is {labels.shape} but {path.name} is {image.shape[-2:]}"
            )
        samples.append(
            Sample(
                image=image,
                masks=Instances.from_labels(labels).masks,
                name=path.stem,
                metadata={"source": str(path)},
            )
        )
    if not samples:
        raise FileNotFoundError(f"{images} holds no .tif images")
    return samples
