"""Reading images and instance masks from disk."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tifffile
from imageio.v3 import imread as _imread_png

from .types import Sample

_BBBC010_IMAGE = re.compile(r"_(?P<well>[A-P]\d{2})_(?P<channel>w[12])_[0-9A-Fa-f-]+\.tif{1,2}$")
_BBBC010_MASK = re.compile(r"^(?P<well>[A-P]\d{2})_(?P<index>\d+)_ground_truth\.png$")


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
    root: str | Path, wells: Iterable[str] | None = None, with_w1: bool = True
) -> list[Sample]:
    """Read BBBC010-style data: a bright-field (w2) image and one mask PNG per worm.

    Parameters
    ----------
    root : str or Path
        Folder with ``images/*_<WELL>_w{1,2}_<GUID>.tif`` and ``masks/<WELL>_<NN>_ground_truth.png``.
    wells : iterable of str, optional
        Wells to read (default: all with a w2 image).
    with_w1 : bool
        Also read the Sytox (w1) channel into ``Sample.channels["w1"]`` when present.

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
        If a mask's size differs from its image's.
    """
    root = Path(root)
    available = bbbc010_wells(root)
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

    samples = []
    for well in wells:
        image = tifffile.imread(images[(well, "w2")]).astype(np.float32)
        if image.ndim != 2:
            raise ValueError(f"{images[(well, 'w2')]} is not a 2D image (shape {image.shape})")
        channels = {}
        if with_w1 and (well, "w1") in images:
            channels["w1"] = tifffile.imread(images[(well, "w1")]).astype(np.float32)
        files = sorted(masks.get(well, []))
        if not files:
            raise FileNotFoundError(f"No masks/{well}_NN_ground_truth.png for well {well}")
        stack = []
        for _, path in files:
            mask = np.asarray(_imread_png(path))
            if mask.ndim == 3:
                mask = mask[..., 0]
            if mask.shape != image.shape:
                raise ValueError(f"{path.name} is {mask.shape} but the image is {image.shape}")
            stack.append(mask > 0)
        samples.append(
            Sample(
                image=image,
                masks=np.stack(stack),
                name=well,
                channels=channels,
                metadata={"source": str(images[(well, "w2")]), "dataset": "BBBC010"},
            )
        )
    return samples
