"""napari reader, writer and sample data of napari-instseg (see ``napari.yaml``).

- Reader: a BBBC010-style folder (``images/`` + ``masks/``; all wells become one stack, or
  one well when a ``*_w2_*.tif`` file inside ``images/`` is opened) or a training folder
  written by the plugin. Each sample gives an Image layer and a Labels layer; the full,
  possibly overlapping masks and the reviewed flags travel in the Labels layer's
  ``metadata["napari_instseg"]`` so the widget can keep overlaps (for a stack, one such
  entry per plane under ``"planes"``). The layers of one image (image, worms, channels)
  share an id, ``metadata["napari_instseg"]["link"]``: the widget pairs them by it, not by
  their names, which the user may change. Image layers carry the
  folder read (``metadata["napari_instseg"]["folder"]``): the main widget lists the model
  versions fine-tuned beside it.
- Writer: a Labels layer (+ its Image layer) to the training-folder format.
- Sample data: the synthetic worms of :func:`napari_instseg.core.synthetic.sample_worms`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.types import Instances, Sample

LayerData = tuple[Any, dict[str, Any], str]

META = "napari_instseg"
_W2 = re.compile(r"_(?P<well>[A-P]\d{2})_w2_[0-9A-Fa-f-]+\.tif{1,2}$")
#: a BBBC010 file name or layer name (napari names a layer after the file's stem)
_BBBC010_NAME = re.compile(
    r"_(?P<well>[A-P]\d{2})_(?P<channel>w[12])_[0-9A-Fa-f-]+(?:\.tif{1,2})?(?: \[\d+\])?$"
)
#: BBBC010's channels: w2 bright-field (what the model segments), w1 Sytox fluorescence
STAIN_CHANNELS = ("w1",)


# ------------------------------------------------------------------ sample data
def sample_data() -> list[LayerData]:
    """Synthetic bright-field worms (520 x 696, crossing and touching), as an Image layer.

    Returns
    -------
    list of LayerData
        One image layer named ``"sample worms"``.
    """
    from ..core.synthetic import sample_worms

    sample = sample_worms()
    return [(sample.image, {"name": "sample worms"}, "image")]


# ------------------------------------------------------------------------ reader
def as_source_dtype(image: np.ndarray, dtype: Any) -> np.ndarray:
    """``image`` in ``dtype`` (its file's) when that holds every value exactly, else as is.

    The core reads BBBC010's uint16 files as float32; an export writes the image in its
    own dtype (``docs/data-format.md``), so the widget and the writer give it back the
    file's dtype, which the reader records (``metadata["napari_instseg"]["dtype"]``).

    Parameters
    ----------
    image : np.ndarray
        The image data (e.g. float32).
    dtype : str or numpy dtype or None
        The dtype of the file it was read from; None: unknown.

    Returns
    -------
    np.ndarray
        ``image.astype(dtype)`` when the values survive the round trip (integers in range,
        finite), else ``image`` unchanged.
    """
    image = np.asarray(image)
    if dtype is None:
        return image
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        return image
    if image.dtype == dtype or dtype.kind not in "iuf" or image.dtype.kind not in "biuf":
        return image
    if dtype.kind in "iu" and image.size:
        info = np.iinfo(dtype)
        if not np.isfinite(image).all() or image.min() < info.min or image.max() > info.max:
            return image
    with np.errstate(invalid="ignore", over="ignore"):
        cast = image.astype(dtype)
    return cast if np.array_equal(cast, image) else image


def source_dtype(path: Any) -> str | None:
    """The dtype of the image in a TIFF file (its header only), or None when unknown.

    Parameters
    ----------
    path : str or Path or None
        The file an image was read from.

    Returns
    -------
    str or None
    """
    if not path or Path(str(path)).suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        import tifffile

        with tifffile.TiffFile(str(path)) as tif:
            return str(np.dtype(tif.series[0].dtype))
    except Exception:  # noqa: BLE001 - unreadable header: the export keeps the data's dtype
        return None


def layer_link(layer: Any) -> str | None:
    """The id linking the layers the reader made of one image, or None.

    The reader puts the same ``metadata["napari_instseg"]["link"]`` in an image's layer,
    its worms layer and its channels' layers, so that they stay together whatever the
    user renames (an image renamed before the widget is opened keeps its worms).

    Parameters
    ----------
    layer : napari.layers.Layer
        Any layer (only its ``metadata`` is read).

    Returns
    -------
    str or None
    """
    meta = (getattr(layer, "metadata", None) or {}).get(META) or {}
    link = meta.get("link")
    return str(link) if link else None


def _labels_meta(sample: Sample) -> dict[str, Any]:
    n = sample.n_instances
    reviewed = sample.reviewed if sample.reviewed is not None else np.zeros(n, bool)
    classes = sample.classes if sample.classes is not None else np.ones(n, np.int64)
    return {
        META: {
            "masks": sample.masks,
            "reviewed": np.asarray(reviewed, bool),
            "classes": np.asarray(classes, np.int64),
            "provenance": dict(sample.metadata),
        }
    }


def samples_to_layers(samples: Sequence[Sample]) -> list[LayerData]:
    """Image and Labels layer data for samples (2D each; several of one size are stacked).

    Parameters
    ----------
    samples : sequence of Sample
        Images with instance masks.

    Returns
    -------
    list of LayerData
        ``(image, kwargs, "image")`` and ``(labels, kwargs, "labels")`` pairs. Label images
        follow ``Instances.to_labels`` (label i + 1 is instance i; a smaller instance wins
        overlapping pixels).
    """
    if not samples:
        raise ValueError("no samples to show")
    layers: list[LayerData] = []
    if len(samples) == 1:
        s = samples[0]
        labels = Instances(masks=s.masks).to_labels()
        name = s.name or "image"
        link = uuid.uuid4().hex  # the layers of this image, whatever their names become
        labels_meta = _labels_meta(s)
        labels_meta[META]["link"] = link
        layers.append((s.image, {"name": name, "metadata": {META: {"link": link}}}, "image"))
        layers.append((labels, {"name": f"{name} worms", "metadata": labels_meta}, "labels"))
        for cname, chan in s.channels.items():  # tagged: the widget measures, never segments
            meta = {META: {"channel": cname, "image": name, "link": link}}
            kwargs = {"name": f"{name} {cname}", "visible": False, "metadata": meta}
            layers.append((chan, kwargs, "image"))
        return layers
    shapes = {s.image.shape for s in samples}
    if len(shapes) == 1:
        images = np.stack([s.image for s in samples])
        labels = np.stack([Instances(masks=s.masks).to_labels() for s in samples])
        names = [s.name for s in samples]
        # each plane's full masks, reviewed flags and provenance: the widget gives them to
        # the plane's own worms layer (planes[i] is what _labels_meta gives a single image)
        planes = [_labels_meta(s)[META] for s in samples]
        layers.append((images, {"name": "images", "metadata": {META: {"names": names}}}, "image"))
        layers.append(
            (
                labels,
                {"name": "worms", "metadata": {META: {"names": names, "planes": planes}}},
                "labels",
            )
        )
        return layers
    for s in samples:
        layers.extend(samples_to_layers([s]))
    return layers


def _bbbc010_name(layer: Any) -> re.Match | None:
    """The BBBC010 file-name match of a layer's name or of the file it was read from."""
    texts = [str(getattr(layer, "name", ""))]
    path = getattr(getattr(layer, "source", None), "path", None)
    if path:
        texts.append(Path(str(path)).name)
    for text in texts:
        m = _BBBC010_NAME.search(text)
        if m:
            return m
    return None


def stain_channel(layer: Any) -> str | None:
    """The stain channel an Image layer holds (e.g. ``"w1"``), or None for an image to segment.

    A channel the reader read beside an image (``metadata["napari_instseg"]["channel"]``,
    e.g. BBBC010's Sytox ``w1``), or a BBBC010 ``*_w1_*.tif`` opened by napari's own reader
    (its layer is named after the file). Such a layer is for measuring (mean intensity
    per worm, live/dead), not for the model, which is for bright-field.

    Parameters
    ----------
    layer : napari.layers.Layer
        Any layer (only its ``name``, ``metadata`` and ``source`` are read).

    Returns
    -------
    str or None
    """
    meta = (getattr(layer, "metadata", None) or {}).get(META) or {}
    if meta.get("channel"):
        return str(meta["channel"])
    m = _bbbc010_name(layer)
    if m and m["channel"] in STAIN_CHANNELS:
        return str(m["channel"])
    return None


def is_channel_of(channel: Any, image: Any) -> bool:
    """Whether ``channel`` (see :func:`stain_channel`) was taken with ``image``.

    The reader records the image a channel belongs to (the same :func:`layer_link` id,
    whatever either is renamed to; else the image's name); BBBC010 files opened by
    napari's own reader belong together when they name the same well.

    Parameters
    ----------
    channel, image : napari.layers.Layer
        A stain channel and an image layer.

    Returns
    -------
    bool
    """
    meta = (getattr(channel, "metadata", None) or {}).get(META) or {}
    link = layer_link(channel)
    if link is not None and layer_link(image) is not None:  # read together: the same id
        return link == layer_link(image)
    if meta.get("image") is not None:
        return str(meta["image"]) == str(image.name)
    a, b = _bbbc010_name(channel), _bbbc010_name(image)
    return bool(a and b and a["well"] == b["well"])


def _is_bbbc010(root: Path) -> bool:
    images = root / "images"
    if not (images.is_dir() and (root / "masks").is_dir()):
        return False
    return any(_W2.search(p.name) for p in images.iterdir())


def _read_bbbc010(path: Path) -> list[Sample]:
    from ..core.io import read_bbbc010

    if path.is_file():
        m = _W2.search(path.name)
        return read_bbbc010(path.parent.parent, wells=[m["well"]] if m else None)
    return read_bbbc010(path)


def _read_training(path: Path) -> list[Sample]:
    from ..core.training_folder import read_training_folder

    return read_training_folder(path)


def get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """Return a reader for a BBBC010-style folder/image or a training folder, else None.

    Parameters
    ----------
    path : str or list of str
        What the user opened (napari passes a list when several paths are opened).

    Returns
    -------
    callable or None
        ``reader(path) -> list of LayerData``, or None when this plugin cannot read it.
    """
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if p.is_file():
        if _W2.search(p.name) and p.parent.name == "images" and _is_bbbc010(p.parent.parent):
            return read
        return None
    if not p.is_dir():
        return None
    if _is_bbbc010(p) or _looks_like_training_folder(p):
        return read
    return None


def _looks_like_training_folder(p: Path) -> bool:
    try:
        from ..core.training_folder import is_training_folder  # type: ignore[attr-defined]
    except ImportError:
        is_training_folder = None
    if is_training_folder is not None:
        return bool(is_training_folder(p))
    return (p / "images").is_dir() and (p / "masks").is_dir()


def read(path: str | list[str]) -> list[LayerData]:
    """Read a BBBC010-style folder/image or a training folder into Image + Labels layers.

    Parameters
    ----------
    path : str or list of str
        A folder (or one BBBC010 ``*_w2_*.tif``).

    Returns
    -------
    list of LayerData
        See :func:`samples_to_layers`.
    """
    if isinstance(path, list):
        path = path[0]
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    bbbc010 = p.is_file() or _is_bbbc010(p)
    samples = _read_bbbc010(p) if bbbc010 else _read_training(p)
    layers = samples_to_layers(samples)
    folder = str(p.parent.parent if p.is_file() else p)
    for _, kwargs, kind in layers:  # the widget lists the model versions kept beside it
        if kind == "image":
            meta = kwargs.setdefault("metadata", {}).setdefault(META, {})
            meta["folder"] = folder
    if bbbc010:  # read as float32: the files' dtype (uint16), which an export writes again
        dtypes = [source_dtype(s.metadata.get("source")) for s in samples]
        images = [
            kwargs["metadata"][META]
            for _, kwargs, kind in layers
            if kind == "image" and "channel" not in kwargs["metadata"][META]
        ]
        if len(images) == 1 and len(set(dtypes)) == 1:  # one well, or the wells' stack
            dtypes = dtypes[:1]
        if len(images) == len(dtypes):
            for meta, dtype in zip(images, dtypes, strict=True):
                if dtype is not None:
                    meta["dtype"] = dtype
    return layers


# ------------------------------------------------------------------------ writer
def _masks_for(labels: np.ndarray, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Per-instance masks for a labels layer: the live session's (overlaps) or from labels."""
    from .session import live_session_for

    session = live_session_for(labels)
    if session is not None:
        sample = session.to_sample()
        return sample.masks, sample.reviewed, dict(sample.metadata)
    info = (meta.get("metadata") or {}).get(META, {})
    masks = info.get("masks")
    if masks is not None and np.array_equal(Instances(masks=masks).to_labels(), labels):
        reviewed = info.get("reviewed")
        if reviewed is None:
            reviewed = np.zeros(len(masks), bool)
        return (
            np.asarray(masks, bool),
            np.asarray(reviewed, bool),
            dict(info.get("provenance", {})),
        )
    inst = Instances.from_labels(labels)
    return inst.masks, np.zeros(len(inst), bool), {}


def write_training(path: str, layer_data: list[LayerData]) -> list[str]:
    """Write a Labels layer (and the Image layer it annotates) as a training folder.

    A new or empty folder becomes a training folder; a training folder gets the image
    added (as the widget's Export does). The writer never overwrites: an image of the same
    name in the folder, or a non-empty folder that is no training folder, is refused. The
    core writes atomically.

    Parameters
    ----------
    path : str
        Folder to create.
    layer_data : list of LayerData
        Exactly one labels layer and at most one image layer.

    Returns
    -------
    list of str
        The folder written.

    Raises
    ------
    ValueError
        If there is no labels layer, no image can be found, or sizes disagree.
    FileExistsError
        If the folder holds an image of that name, or files but no training folder.
    """
    from ..core.training_folder import write_training_folder

    labels = [(d, m) for d, m, t in layer_data if t == "labels"]
    images = [(d, m) for d, m, t in layer_data if t == "image"]
    if len(labels) != 1:
        raise ValueError(f"select exactly one Labels layer to export, got {len(labels)}")
    data, meta = labels[0]
    data = np.asarray(data)
    if data.ndim != 2:
        raise ValueError(f"the Labels layer must be 2D (H, W), got shape {data.shape}")
    from .session import live_session_for

    session = live_session_for(data)
    image = None
    name = str(meta.get("name", "image"))
    if images:
        image = np.asarray(images[0][0])
        name = str(images[0][1].get("name", name))
        # the file's dtype when the reader read it as float32 (BBBC010's uint16)
        recorded = ((images[0][1].get("metadata") or {}).get(META) or {}).get("dtype")
        image = as_source_dtype(image, recorded)
        if images[0][1].get("rgb"):  # its luminance, as the widget and the CLI see it
            from ..core.predict import luminance

            image = luminance(image)
    elif session is not None:
        image = session.image
        name = str(session.image_layer.name)
    if image is None:
        raise ValueError("select the Image layer together with the Labels layer to export")
    if image.shape[-2:] != data.shape:
        raise ValueError(f"image is {image.shape[-2:]} but labels are {data.shape}")
    root = Path(path)
    from .session import export_conflict

    conflict = export_conflict(root, name)
    if conflict:  # a training folder without this image is extended, as the widget does
        raise FileExistsError(f"{conflict}; choose another folder (nothing is overwritten)")
    masks, reviewed, provenance = _masks_for(data, meta)
    if session is not None:  # labels corrected on a prediction at another scale
        provenance.update(session.scale_metadata())
    sample = Sample(image=image, masks=masks, name=name, reviewed=reviewed, metadata=provenance)
    write_training_folder(root, [sample])
    return [str(root)]
