"""Training: augmentations in torch, the joint loss, checkpoints, resume, logs, selection.

``train(config)`` is the Python entry point; ``napari-instseg train`` the command line.
Everything a run needs is in :class:`TrainConfig`, saved as TOML next to every checkpoint.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import time
import tomllib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from scipy import ndimage
from tqdm.auto import tqdm

from . import losses as L
from .device import (
    autocast,
    cpu_name,
    get_device,
    memory_format,
    training_autocast_dtype,
)
from .evaluate import parse_names
from .model import InstSegNet, ModelConfig
from .normalize import model_input
from .scale import at_recorded_scale, object_width
from .types import Sample
from .weights import DEFAULT_NORMALIZATION, save_model


@dataclass
class TrainConfig:
    """Everything a training run needs.

    Attributes
    ----------
    data : list of str
        Data folders: BBBC010-style (``images/``, ``masks/``) or training folders (with a
        ``manifest.json``, or ``images/<name>.tif`` and ``masks/<name>.tif`` label images);
        a single ``str`` or ``Path`` is one folder.
    train_wells, val_wells : str
        Wells (BBBC010) or image names used for training / validation, as comma-separated
        names or ranges ``"A01-B12"``. Empty ``train_wells``: all images; empty
        ``val_wells``: no validation. When no data folder is in BBBC010's layout, the
        default BBBC010 ranges (which would name no image) become empty
        (:func:`default_wells`).
    out : str
        Run folder (checkpoints, log, config).
    model : dict
        :class:`ModelConfig` fields.
    init : str
        Weights to start from (fine-tuning); empty: from scratch.
    epochs, steps_per_epoch, batch_size, crop_size : int
        Schedule: an epoch is ``steps_per_epoch`` batches of random crops.
    max_steps : int
        Stop after this many steps in all, the last epoch being shorter; 0 (default):
        ``epochs * steps_per_epoch``.
    lr, weight_decay : float
        AdamW; cosine decay over all steps.
    seed : int
        Seeds torch and numpy.
    n_embedding_samples, n_class_samples : int
        Pixels sampled per instance for the embedding and classification losses.
    lambda_max, lambda_start, lambda_end : float
        Classification-loss weight ramp (epochs), Fathi et al. use 0 -> 0.2.
    boundary_weight, foreground_weight, attraction_weight, contrast_weight : float
        Weights of the other losses (0 disables).
    boundary_max_alpha : float
        Cap on the class balance of the boundary loss (1 = BAISeg's full balance).
    boundary_contact_weight : float
        Weight of the boundary loss within 2 px of two instances, where worms touch or
        cross (:func:`napari_instseg.core.losses.contact_zone`); 1 = no extra weight.
    foreground_edge_weight : float
        Extra cross-entropy weight of the pixels on either side of a foreground edge
        (:func:`napari_instseg.core.losses.foreground_loss`); 0 = plain.
    rotation, scale_min, scale_max, flips : augmentation
        Fathi et al.: rotation within 10 degrees, scale 0.7-1.5, flips.
    aligned_fraction : float
        Share of the crops taken on the image's own pixel grid: no rotation or rescaling and
        whole-pixel offsets (flips and transposes only), so image and masks are copied, not
        resampled. Resampling blurs every other crop a little and moves mask edges by up
        to half a pixel, while prediction sees unresampled images. 0 = Fathi et al. only.
    crop_candidates : int
        Crops are chosen among this many random windows, biased toward more worms.
    val_every : int
        Validate every this many epochs.
    time_limit_minutes : float
        Stop cleanly (checkpoint saved) after this long; 0 = no limit.
    freeze : str
        ``""`` trains everything; ``"encoder"`` freezes the U-Net's down path;
        ``"backbone"`` freezes encoder and decoder (only the heads learn). For fine-tuning.
    select_metric : str
        Validation metric that picks ``best.safetensors``: ``val_grow_iou`` (embeddings) or
        ``val_ap`` (COCO AP of the boundary pipeline at the best of a few thresholds).
    device : str
        ``auto``, ``cuda``, ``mps`` or ``cpu``.
    amp : bool
        Mixed precision (bfloat16 autocast) on CUDA.
    cpu_amp : bool
        bfloat16 autocast on the CPU as well. Two to three times faster on CPUs with native
        bfloat16 (AVX512-BF16 or AMX), slower on CPUs without; off by default. Losses,
        semi-convolutional coordinates and weights stay float32.
    num_threads : int
        torch CPU threads (0 = torch default).
    data_on_device : bool or "auto"
        Keep the training images, masks and trusted maps on the training device, so crops
        are cut there (``grid_sample`` on the GPU) and no batch is copied per step; the
        random draws stay on the CPU, so the same crops are drawn on any device.
        ``"auto"`` (default): on CUDA yes, on the CPU (where it changes nothing) and MPS no.
        BBBC010's 32 training images take about 270 MB (masks 170 MB).
    replay : list of str
        More data folders mixed into training (fine-tuning: the parent's own training
        images, so a few corrections add to what the model knew instead of replacing it);
        a single ``str`` or ``Path`` is one folder.
    replay_wells : str
        Names or ranges of the replay images (empty: all of them).
    replay_fraction : float
        Share of the crops drawn from the replay images when there are any.
    oversample_wells : str
        Names or ranges of training images drawn ``oversample_factor`` times as often as
        the others (e.g. a kind of image the model fits worst; empty: uniform).
    oversample_factor : float
        How many times as often those images are drawn (any positive factor).
    """

    data: list[str] = field(default_factory=lambda: ["../shared/data/bbbc010"])
    train_wells: str = "A01-B12"
    val_wells: str = "B13-C02"
    out: str = "runs/bbbc010"
    model: dict[str, Any] = field(default_factory=dict)
    init: str = ""
    epochs: int = 60
    steps_per_epoch: int = 50
    max_steps: int = 0
    batch_size: int = 4
    crop_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    n_embedding_samples: int = 32
    n_class_samples: int = 10
    lambda_max: float = 0.2
    lambda_start: float = 4.0
    lambda_end: float = 12.0
    boundary_weight: float = 1.0
    boundary_max_alpha: float = 1.0
    boundary_contact_weight: float = 1.0
    foreground_weight: float = 1.0
    foreground_edge_weight: float = 0.0
    attraction_weight: float = 0.0
    contrast_weight: float = 0.0
    rotation: float = 10.0
    scale_min: float = 0.7
    scale_max: float = 1.5
    flips: bool = True
    aligned_fraction: float = 0.0
    crop_candidates: int = 8
    val_every: int = 2
    time_limit_minutes: float = 0.0
    freeze: str = ""
    select_metric: str = "val_grow_iou"
    device: str = "auto"
    amp: bool = True
    cpu_amp: bool = False
    num_threads: int = 0
    data_on_device: bool | str = "auto"
    replay: list[str] = field(default_factory=list)
    replay_wells: str = ""
    replay_fraction: float = 0.5
    oversample_wells: str = ""
    oversample_factor: float = 1.0

    def __post_init__(self) -> None:
        # a single folder given as a str is one folder, not a list of characters
        self.data = folder_list(self.data, "data")
        self.replay = folder_list(self.replay, "replay")
        if isinstance(self.device, torch.device):  # kept as text: the config is saved as TOML
            self.device = str(self.device)

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        """Read a config; unknown keys raise ``ValueError``."""
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
        if data.get("model"):
            try:
                ModelConfig.from_dict(data["model"])
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}: [model]: {err}") from err
        return cls(**data)

    def to_toml(self, path: str | Path) -> None:
        """Write the config as TOML."""
        Path(path).write_text(tomli_w.dumps(asdict(self)))


def folder_list(value: Any, what: str) -> list[str]:
    """Folders given as one path or a sequence of paths, as a list of ``str``.

    Parameters
    ----------
    value : str, os.PathLike or sequence of them
        The folders; a single ``str`` or ``Path`` is one folder.
    what : str
        The argument's name, for the error message.

    Returns
    -------
    list of str
        The folders.

    Raises
    ------
    TypeError
        If ``value`` or one of its items is not a ``str`` or path (e.g. ``bytes``).
    """
    if isinstance(value, str | os.PathLike):
        value = [value]
    elif isinstance(value, bytes | bytearray) or not isinstance(value, Sequence):
        raise TypeError(
            f"{what} must be a folder path (str or Path) or a list of them, "
            f"got {type(value).__name__}"
        )
    items = list(value)
    bad = [item for item in items if not isinstance(item, str | os.PathLike)]
    if bad:
        raise TypeError(
            f"{what} must hold folder paths (str or Path), got {type(bad[0]).__name__} {bad[0]!r}"
        )
    return [os.fspath(item) for item in items]


def is_bbbc010_layout(folder: str | Path) -> bool:
    """Whether ``folder`` holds BBBC010-style images (``images/*_<WELL>_w2_*.tif``).

    Parameters
    ----------
    folder : str or Path
        A data folder.

    Returns
    -------
    bool
        False for a training folder (``manifest.json``), a folder with other images and a
        missing folder.
    """
    from .io import bbbc010_wells

    if (Path(folder) / "manifest.json").is_file():  # a training folder
        return False
    try:
        return bool(bbbc010_wells(folder))
    except (FileNotFoundError, ValueError):
        return False


def default_wells(config: TrainConfig) -> TrainConfig:
    """The config with BBBC010's default well ranges dropped when they cannot apply.

    The defaults of ``train_wells`` and ``val_wells`` are BBBC010's split; when no data
    folder is in BBBC010's layout they would name no image, so they become ``""`` (all
    images for training, no validation). Other values are kept.

    Parameters
    ----------
    config : TrainConfig
        The run.

    Returns
    -------
    TrainConfig
        ``config`` itself, or a copy with the defaults replaced.
    """
    defaults = TrainConfig()
    names = [
        name
        for name in ("train_wells", "val_wells")
        if getattr(config, name) == getattr(defaults, name)
    ]
    if not names or any(is_bbbc010_layout(d) for d in config.data):
        return config
    return replace(config, **dict.fromkeys(names, ""))


def image_draw_probabilities(names: Sequence[str], spec: str, factor: float) -> np.ndarray:
    """Probability of drawing each training image for a crop.

    Parameters
    ----------
    names : sequence of str
        The training images' names, in order.
    spec : str
        Names or ranges (:func:`parse_names`) drawn ``factor`` times as often; empty: uniform.
    factor : float
        Positive weight of the named images relative to the others.

    Returns
    -------
    numpy.ndarray
        (len(names),) probabilities summing to 1.
    """
    if not factor > 0:
        raise ValueError(f"oversample_factor must be positive, got {factor}")
    chosen = set(parse_names(spec)) if spec else set()
    if spec and not chosen & set(names):
        raise ValueError(f"oversample_wells {spec!r} names none of the training images")
    weights = np.array([factor if n in chosen else 1.0 for n in names], float)
    return weights / weights.sum()


def load_samples(
    folders: str | Path | Sequence[str | Path], names: Sequence[str] | None
) -> list[Sample]:
    """Read samples from BBBC010-style folders or training folders, filtered by name.

    A single ``str`` or ``Path`` is one folder. A folder is read as a training folder
    (:func:`~napari_instseg.core.training_folder.read_training_folder`) when it has a
    ``manifest.json`` or when its ``images/`` holds no BBBC010-style image (then it needs
    ``masks/<name>.tif`` label images), else in BBBC010's layout.
    """
    from .io import read_bbbc010
    from .training_folder import read_training_folder

    folders = folder_list(folders, "data")
    samples: list[Sample] = []
    wanted = None if names is None else set(names)
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise FileNotFoundError(f"data folder {folder} does not exist")
        if is_bbbc010_layout(folder):
            from .io import bbbc010_wells

            wells = bbbc010_wells(folder)
            pick = wells if wanted is None else [w for w in wells if w in wanted]
            samples.extend(read_bbbc010(folder, pick, with_w1=False))
            continue
        if not (folder / "manifest.json").is_file() and not (folder / "images").is_dir():
            raise FileNotFoundError(
                f"{folder} is neither a training folder (no manifest.json) nor a folder of "
                "images/ and masks/ (BBBC010's layout, or images/<name>.tif with "
                "masks/<name>.tif label images): it has no images/"
            )
        found = read_training_folder(folder)
        samples.extend(s for s in found if wanted is None or s.name in wanted)
    if not samples:
        raise ValueError(
            f"no images named {sorted(wanted or [])[:5]}... in {[str(f) for f in folders]}; "
            "train_wells / val_wells (--train-wells / --val-wells) name the images to use, "
            '"" for all of them'
        )
    return samples


@dataclass
class _Item:
    """A prepared training image: tensors (on the CPU or the training device), and numbers.

    The numbers are what crop making reads on the CPU (boxes and pixel coordinates).

    Attributes
    ----------
    image : torch.Tensor
        (C, H, W) normalised.
    masks : torch.Tensor
        (N, H, W) bool.
    trusted : torch.Tensor
        (H, W) bool: pixels that count in the loss.
    boxes : torch.Tensor
        (N, 4) ``[r0, r1, c0, c1]`` bounding boxes (:func:`mask_boxes`), ends exclusive.
    box_array : numpy.ndarray
        ``boxes`` as int64 numpy on the CPU (the same memory while ``boxes`` is there).
    pixels : list of tuple of numpy.ndarray
        Per instance, its pixels' rows and columns (int32, on the CPU): which instances a
        candidate window holds is counted from them, without reading the masks.
    packed : torch.Tensor
        (P, H, W) float32: the masks and then ``trusted`` as bits of whole numbers below
        2**24, ``PACKED_BITS`` per plane (:func:`pack_masks`), so that one nearest
        ``grid_sample`` of a plane or two samples every mask (float32 holds them exactly).
    """

    image: torch.Tensor
    masks: torch.Tensor
    trusted: torch.Tensor
    boxes: torch.Tensor = field(init=False)
    box_array: np.ndarray = field(init=False, repr=False)
    pixels: list[tuple[np.ndarray, np.ndarray]] = field(init=False, repr=False)
    packed: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.boxes = mask_boxes(self.masks)
        self.box_array = np.asarray(self.boxes.cpu().numpy(), np.int64)  # shared on the CPU
        masks = self.masks.cpu().numpy()
        self.pixels = []
        for mask, (r0, r1, c0, c1) in zip(masks, self.box_array, strict=True):
            rows, cols = np.nonzero(mask[r0:r1, c0:c1])
            self.pixels.append(((rows + r0).astype(np.int32), (cols + c0).astype(np.int32)))
        self.packed = pack_masks(torch.cat([self.masks, self.trusted[None]]))

    def to(self, device: torch.device | str) -> _Item:
        """The item with its tensors on ``device`` (itself when they are there already).

        Parameters
        ----------
        device : torch.device or str
            Where ``image``, ``masks``, ``trusted``, ``boxes`` and ``packed`` go; the numpy
            caches stay.

        Returns
        -------
        _Item
            A shallow copy with the tensors moved.
        """
        device = torch.device(device)
        if self.image.device == device:
            return self
        moved = object.__new__(_Item)
        moved.__dict__.update(self.__dict__)
        for name in ("image", "masks", "trusted", "boxes", "packed"):
            setattr(moved, name, getattr(self, name).to(device))
        return moved


#: masks per plane of :func:`pack_masks`: whole numbers below 2**24 are exact in float32
PACKED_BITS = 24


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool masks as (ceil(N / 24), H, W) float32 planes of bits.

    Mask ``i`` is bit ``i % 24`` of plane ``i // 24`` (:func:`unpack_masks` undoes it).
    Nearest sampling copies values, so sampling the planes samples every mask at once.
    """
    n, h, w = masks.shape
    planes = torch.zeros(
        (max(math.ceil(n / PACKED_BITS), 1), h, w), dtype=torch.int32, device=masks.device
    )
    for i in range(n):
        planes[i // PACKED_BITS] |= masks[i].to(torch.int32) << (i % PACKED_BITS)
    return planes.float()


def unpack_masks(planes: torch.Tensor, which: Sequence[int] | np.ndarray) -> torch.Tensor:
    """Masks ``which`` (K, ...) bool of planes packed by :func:`pack_masks` (P, ...)."""
    which = np.asarray(which, np.int64)
    ints = planes.to(torch.int32)
    bits = torch.from_numpy((1 << (which % PACKED_BITS)).astype(np.int32))
    bits = bits.to(planes.device).view((-1,) + (1,) * (planes.dim() - 1))
    if ints.shape[0] > 1:  # (one plane: broadcast, no copy)
        ints = ints[torch.from_numpy(which // PACKED_BITS).to(planes.device)]
    return (ints & bits).bool()


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Bounding boxes of (N, H, W) bool masks as (N, 4) ``[r0, r1, c0, c1]``, ends exclusive.

    An empty mask gets the empty box ``[0, 0, 0, 0]``.
    """
    n, h, w = masks.shape
    rows, cols = masks.any(2), masks.any(1)
    boxes = torch.stack(
        [
            rows.int().argmax(1),
            h - rows.flip(1).int().argmax(1),
            cols.int().argmax(1),
            w - cols.flip(1).int().argmax(1),
        ],
        1,
    )
    boxes[~rows.any(1)] = 0
    return boxes


def _in_window(boxes: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    """Which boxes reach into the window rows r0:r1, cols c0:c1."""
    return (boxes[:, 0] < r1) & (boxes[:, 1] > r0) & (boxes[:, 2] < c1) & (boxes[:, 3] > c0)


def prepare(
    sample: Sample, in_channels: int = 1, model_config: ModelConfig | None = None
) -> _Item:
    """Normalise a sample and turn it into tensors for training.

    ``model_config`` (when given) decides the input normalisation and the channel count
    (:func:`napari_instseg.core.normalize.model_input`); otherwise percentile
    normalisation of ``in_channels`` channels.
    Pixels of unreviewed instances (``Sample.reviewed`` False) are left out of the loss:
    they are marked untrusted, and those instances are dropped from the targets.
    """
    if model_config is not None:
        in_channels = model_config.in_channels
    image = np.asarray(sample.image, np.float32)
    if image.ndim == 2:
        image = image[None]
    if image.shape[0] != in_channels:
        raise ValueError(
            f"{sample.name}: image has {image.shape[0]} channels, model takes {in_channels}"
        )
    image = model_input(
        image,
        model_config.input_norm if model_config else "percentile",
        DEFAULT_NORMALIZATION["low"],
        DEFAULT_NORMALIZATION["high"],
        model_config.flatfield_sigma if model_config else 16.0,
    )
    masks = np.asarray(sample.masks, bool)
    trusted = np.ones(masks.shape[1:], bool)
    if sample.reviewed is not None and len(sample.reviewed) == len(masks):
        reviewed = np.asarray(sample.reviewed, bool)
        if not reviewed.all():
            unreviewed = masks[~reviewed].any(0)
            trusted &= ~ndimage.binary_dilation(unreviewed, iterations=2)
            masks = masks[reviewed]
    return _Item(torch.from_numpy(image), torch.from_numpy(masks), torch.from_numpy(trusted))


def random_crop(
    item: _Item, config: TrainConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One augmented crop: rotation, scale, flips, a window biased toward more worms.

    Done with ``grid_sample`` in torch: bilinear for the image, nearest for the masks. A
    share ``config.aligned_fraction`` of the crops is pixel-aligned instead (whole-pixel
    window, flips and a transpose only), so the sampling copies pixels exactly. Returns
    image (C, S, S), masks (N', S, S) of the instances still visible and the
    trusted-pixel map (S, S).
    """
    size = config.crop_size
    c, h, w = item.image.shape
    device = item.image.device
    # drawn only when used, so older configs keep their random stream
    aligned = config.aligned_fraction > 0 and rng.random() < config.aligned_fraction
    scale = float(np.exp(rng.uniform(np.log(config.scale_min), np.log(config.scale_max))))
    angle = math.radians(rng.uniform(-config.rotation, config.rotation))
    if aligned:
        scale, angle = 1.0, 0.0
    half = size / scale / 2  # half window in input pixels
    # candidate centres; weight by how many worms their window touches
    centres = np.stack(
        [rng.uniform(0, h, config.crop_candidates), rng.uniform(0, w, config.crop_candidates)], 1
    )
    if item.masks.shape[0]:
        counts = [window_count(item, r, col, half) for r, col in centres]
        weights = np.asarray(counts, float) + 0.5
        centre = centres[rng.choice(len(centres), p=weights / weights.sum())]
    else:
        centre = centres[0]
    half_span = (size - 1) / 2
    if aligned:  # sample at whole input pixels
        centre = np.round(np.asarray(centre) - half_span) + half_span
    flip_r = -1.0 if config.flips and rng.random() < 0.5 else 1.0
    flip_c = -1.0 if config.flips and rng.random() < 0.5 else 1.0
    # output pixel offsets from the crop centre -> input pixel coordinates
    cos, sin = math.cos(angle), math.sin(angle)
    lin = (torch.arange(size, dtype=torch.float32, device=device) - half_span) / scale
    dr = lin[:, None].expand(size, size) * flip_r
    dc = lin[None, :].expand(size, size) * flip_c
    if aligned and config.flips and rng.random() < 0.5:  # transpose
        dr, dc = dc, dr
    rows = centre[0] + cos * dr - sin * dc
    cols = centre[1] + sin * dr + cos * dc
    image = _sample_image(item, rows, cols)
    masks, trusted = _sample_masks(item, rows, cols)
    return _jitter(image, rng), masks, trusted


def _sample_image(item: _Item, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The image at input coordinates ``rows``, ``cols`` (S, S): bilinear, reflected."""
    h, w = item.image.shape[-2:]
    grid = torch.stack([(2 * cols + 1) / w - 1, (2 * rows + 1) / h - 1], -1)[None]
    return F.grid_sample(
        item.image[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )[0]


def _sample_masks(
    item: _Item, rows: torch.Tensor, cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks (N', S, S) of the instances visible at ``rows``, ``cols`` and the trusted map.

    Nearest sampling, zero outside the image, of the part of the image the crop reads (a
    pixel of margin) and only of the instances whose boxes reach into it: the very pixels
    ``grid_sample(..., mode="nearest")`` of each mask as float would give, found by
    sampling the masks' bits packed in float planes (:func:`pack_masks`).
    """
    h, w = item.image.shape[-2:]
    row_min, row_max, col_min, col_max = torch.stack(
        [rows.min(), rows.max(), cols.min(), cols.max()]
    ).tolist()  # one transfer from a GPU
    r0, r1 = max(math.floor(row_min) - 1, 0), min(math.ceil(row_max) + 2, h)
    c0, c1 = max(math.floor(col_min) - 1, 0), min(math.ceil(col_max) + 2, w)
    part_grid = torch.stack(  # the window holds the crop's centre: never empty
        [(2 * (cols - c0) + 1) / (c1 - c0) - 1, (2 * (rows - r0) + 1) / (r1 - r0) - 1], -1
    )[None]
    # the planes of bits of the masks and trusted (pack_masks): one sampling for them all
    planes = F.grid_sample(
        item.packed[None, :, r0:r1, c0:c1],
        part_grid,
        mode="nearest",
        padding_mode="zeros",
        align_corners=False,
    )[0]
    n = item.masks.shape[0]
    near = np.flatnonzero(_in_window_np(item.box_array, r0, r1, c0, c1))
    unpacked = unpack_masks(planes, np.append(near, n))  # trusted is "mask" n
    masks, trusted = unpacked[:-1], unpacked[-1]
    return masks[masks.flatten(1).any(1)], trusted


def _jitter(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Intensity jitter: a random gain and offset, and Gaussian noise (numpy's stream)."""
    gain, bias = rng.uniform(0.8, 1.25), rng.uniform(-0.1, 0.1)
    image = image * gain + bias
    noise = torch.from_numpy(rng.normal(0, 0.02, image.shape).astype(np.float32))
    return image + noise.to(image.device, non_blocking=True)


def _in_window_np(boxes: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """:func:`_in_window` on numpy boxes."""
    return (boxes[:, 0] < r1) & (boxes[:, 1] > r0) & (boxes[:, 2] < c1) & (boxes[:, 3] > c0)


def window_count(item: _Item, r: float, col: float, half: float) -> int:
    """How many instances have a pixel in the window of half size ``half`` around (r, col).

    The window is rows ``int(max(r - half, 0))`` to ``int(min(r + half, H))`` (end
    excluded), columns alike. Instances whose boxes lie within the window count without a
    look at their pixels, those whose boxes miss it not at all; only the rest are checked
    pixel by pixel (``item.pixels``), on the CPU wherever the masks are.

    Parameters
    ----------
    item : _Item
        A prepared image.
    r, col : float
        The window's centre.
    half : float
        Half its side, in input pixels.

    Returns
    -------
    int
        The number of instances reaching into the window.
    """
    h, w = item.image.shape[-2:]
    r0, r1 = int(max(r - half, 0)), int(min(r + half, h))
    c0, c1 = int(max(col - half, 0)), int(min(col + half, w))
    boxes = item.box_array
    touching = _in_window_np(boxes, r0, r1, c0, c1)
    within = (boxes[:, 0] >= r0) & (boxes[:, 1] <= r1) & (boxes[:, 2] >= c0)
    within &= boxes[:, 3] <= c1
    count = int((touching & within).sum())
    for i in np.flatnonzero(touching & ~within):
        rows, cols = item.pixels[i]
        if ((rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1)).any():
            count += 1
    return count


def training_loss(
    outputs: dict[str, torch.Tensor],
    masks: list[torch.Tensor],
    trusted: torch.Tensor,
    config: TrainConfig,
    taus: tuple[float, ...],
    cls_weight: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The joint loss L = L_e + lambda L_cls + w_b L_B + w_f L_fg (+ options) for a batch.

    Returns a dict of the scalar terms and their weighted ``total``.
    """
    terms: dict[str, list[torch.Tensor]] = {"embedding": [], "classification": []}
    terms.update({"boundary": [], "foreground": [], "attraction": [], "contrast": []})
    emb = outputs["embeddings"].float()
    for i, inst in enumerate(masks):
        keep = trusted[i]
        inst_t = inst & keep  # instances restricted to pixels that count
        terms["embedding"].append(
            _embedding_term(emb[i], inst_t, keep, config.n_embedding_samples, generator)
        )
        if cls_weight > 0:
            idx, target = L.grown_mask_targets(
                emb[i],
                inst_t,
                taus,
                config.n_class_samples,
                config.n_class_samples,
                generator=generator,
            )
            if idx.numel():
                idx_keep = keep.reshape(-1)[idx]
                idx, target = idx[idx_keep], target[:, idx_keep]
            terms["classification"].append(
                L.classification_loss(outputs["class_logits"][i].float(), idx, target)
            )
        bnd = L.boundary_target(inst)
        fg = inst.any(0).float() if inst.shape[0] else torch.zeros_like(bnd)
        k = keep.float()
        contact = None
        if config.boundary_contact_weight != 1.0:
            zone = L.contact_zone(inst)
            contact = (1.0 + (config.boundary_contact_weight - 1.0) * zone)[keep]
        terms["boundary"].append(
            L.balanced_boundary_loss(
                outputs["boundary_logits"][i].float()[keep],
                bnd[keep],
                config.boundary_max_alpha,
                contact,
            )
        )
        terms["foreground"].append(
            L.foreground_loss(
                outputs["foreground_logits"][i].float() * k - 20 * (1 - k),
                fg * k,
                config.foreground_edge_weight,
            )
        )
        if config.attraction_weight:
            terms["attraction"].append(L.attraction_loss(emb[i], inst_t))
        if config.contrast_weight:
            terms["contrast"].append(L.pixel_contrast_loss(emb[i], bnd, generator=generator))
    out = {k: torch.stack(v).mean() for k, v in terms.items() if v}
    total = out["embedding"] + config.boundary_weight * out["boundary"]
    total = total + config.foreground_weight * out["foreground"]
    if "classification" in out:
        total = total + cls_weight * out["classification"]
    if "attraction" in out:
        total = total + config.attraction_weight * out["attraction"]
    if "contrast" in out:
        total = total + config.contrast_weight * out["contrast"]
    out["total"] = total
    return out


def _embedding_term(
    emb: torch.Tensor,
    masks: torch.Tensor,
    trusted: torch.Tensor,
    k: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if trusted.all():
        return L.embedding_pair_loss(emb, masks, k, generator)
    # untrusted pixels: neither instance nor background; hide them from background sampling
    # by adding them as an instance and dropping its samples is overkill: crop them out
    # of the background via a fake instance that is then removed from the pair set.
    bg_trusted = trusted & ~(masks.any(0) if masks.shape[0] else torch.zeros_like(trusted))
    extra = torch.cat([masks, (~trusted)[None]], 0)
    d = emb.shape[0]
    idx, group = L.sample_instance_pixels(extra, k, generator, include_background=False)
    bidx, _ = L.sample_instance_pixels(bg_trusted[None], k, generator, include_background=False)
    n = masks.shape[0]
    keep = group < n
    idx, group = idx[keep], group[keep]
    idx = torch.cat([idx, bidx])
    group = torch.cat([group, torch.full_like(bidx, n)])
    if idx.numel() < 2:
        return emb.sum() * 0.0
    flat = masks.reshape(n, masks.shape[-2] * masks.shape[-1])
    e = emb.reshape(d, -1)[:, idx].T
    member = torch.cat([flat[:, idx].T, (group == n)[:, None]], 1).float()
    same = member @ member.T > 0
    sizes = torch.cat([flat.sum(1).float(), bg_trusted.sum().float()[None]])
    if n:
        sizes[n] = torch.minimum(sizes[n], sizes[:n].max())
    w_p = 1.0 / sizes[group].clamp_min(1.0)
    weights = w_p[:, None] * w_p[None, :]
    weights = weights / weights.sum()
    log_sim, log_dissim = L.log_similarity_terms(L.squared_distances(e, e))
    return -(weights * torch.where(same, log_sim, log_dissim)).sum()


def pad_to_multiple(image: torch.Tensor, divisor: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad (..., H, W) at the bottom/right to multiples of ``divisor``."""
    h, w = image.shape[-2:]
    ph, pw = (-h) % divisor, (-w) % divisor
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        image = F.pad(image, (0, pw, 0, ph), mode=mode)
    return image, (h, w)


@torch.no_grad()
def validate(model: InstSegNet, items: Sequence[_Item], device: torch.device) -> dict[str, float]:
    """Cheap validation: grow each GT worm from its most central pixel and measure IoU.

    For every ground-truth instance the seed is the pixel farthest from its outline; the mask
    grown at tau = 0.5 (global threshold) is compared with the instance. Also reports the
    foreground Dice and the fraction of seeds whose best class is "worm".
    """
    model.eval()
    ious, dices, seed_ok = [], [], []
    boundaries, foregrounds = [], []
    for item in items:
        x, (h, w) = pad_to_multiple(item.image[None].to(device), model.config.divisor)
        out = model(x)
        boundaries.append(torch.sigmoid(out["boundary_logits"][0, :h, :w].float()).cpu().numpy())
        foregrounds.append(
            torch.sigmoid(out["foreground_logits"][0, :h, :w].float()).cpu().numpy()
        )
        emb = out["embeddings"][0, :, :h, :w].float().reshape(model.config.embedding_dim, -1)
        fg = torch.sigmoid(out["foreground_logits"][0, :h, :w].float()) > 0.5
        masks = item.masks.to(device)
        gt_fg = masks.any(0)
        dices.append(float(2 * (fg & gt_fg).sum() / (fg.sum() + gt_fg.sum()).clamp_min(1)))
        probs = out["class_logits"][0, :, :, :h, :w].float().softmax(1)  # (T, C+1, H, W)
        for m in item.masks.numpy():
            dist = ndimage.distance_transform_edt(m)
            r, c = np.unravel_index(np.argmax(dist), m.shape)
            seed = emb[:, r * w + c]
            d2 = ((emb - seed[:, None]) ** 2).sum(0)
            grown = (d2 <= math.log(3.0)).reshape(h, w).cpu().numpy()
            inter = np.logical_and(grown, m).sum()
            ious.append(inter / max(np.logical_or(grown, m).sum(), 1))
            seed_ok.append(float(probs[:, 1:, r, c].amax() > probs[:, 0, r, c].amin()))
    model.train()
    ap, ap_threshold = boundary_ap(boundaries, foregrounds, [it.masks.numpy() for it in items])
    return {
        "val_ap": ap,
        "val_ap_threshold": ap_threshold,
        "val_grow_iou": float(np.mean(ious)) if ious else 0.0,
        "val_grow_iou_gt50": float(np.mean(np.asarray(ious) > 0.5)) if ious else 0.0,
        "val_fg_dice": float(np.mean(dices)) if dices else 0.0,
        "val_seed_fg": float(np.mean(seed_ok)) if seed_ok else 0.0,
    }


VALIDATION_BOUNDARY_THRESHOLDS = (0.5, 0.7, 0.85, 0.92, 0.95)


def boundary_ap(
    boundaries: Sequence[np.ndarray],
    foregrounds: Sequence[np.ndarray],
    ground_truth: Sequence[np.ndarray],
    thresholds: Sequence[float] = VALIDATION_BOUNDARY_THRESHOLDS,
) -> tuple[float, float]:
    """COCO AP of BAISeg's mask extraction on boundary and foreground maps.

    The cheap validation metric of instance quality: no embeddings needed, a few
    boundary thresholds tried, the best kept.

    Parameters
    ----------
    boundaries, foregrounds : sequence of np.ndarray
        (H, W) probabilities per image.
    ground_truth : sequence of np.ndarray
        (N, H, W) bool masks per image.
    thresholds : sequence of float
        Boundary thresholds to try.

    Returns
    -------
    tuple of float
        Best AP and its boundary threshold (0, 0 without images).
    """
    from .evaluate import evaluate
    from .instances import segment_boundary

    if not len(boundaries):
        return 0.0, 0.0
    best = (-1.0, 0.0)
    for threshold in thresholds:
        found = [
            segment_boundary(_maps_only(b, f), boundary_threshold=threshold)
            for b, f in zip(boundaries, foregrounds, strict=True)
        ]
        ap = float(evaluate(found, list(ground_truth))["AP"])
        best = max(best, (ap, float(threshold)))
    return best


def _maps_only(boundary: np.ndarray, foreground: np.ndarray):
    """A Prediction carrying only the maps the boundary pipeline reads."""
    from .types import Prediction

    h, w = boundary.shape
    return Prediction(
        embeddings=np.zeros((1, h, w), np.float32),
        seediness=np.zeros((h, w), np.float32),
        class_scores=np.zeros((1, 2, h, w), np.float32),
        boundary=boundary,
        foreground=foreground,
        taus=(0.5,),
    )


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def hardware_description(device: torch.device) -> str:
    """A one-line description of where training ran."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA), torch {torch.__version__}"
    if device.type == "mps":
        return f"{cpu_name()} (Apple MPS), torch {torch.__version__}"
    cpu = cpu_name()
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, CPU"


def _save_checkpoint(path: Path, model, optimizer, state: dict) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()
    for pid, pstate in opt_state["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = (
                    value.detach().cpu().contiguous().reshape(value.shape)
                )
    meta = dict(state)
    meta["param_groups"] = opt_state["param_groups"]
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
    os.chmod(tmp, 0o644)  # as the weights beside it: a colleague may resume the run
    os.replace(tmp, path)


def checkpoint_epoch(out: str | Path) -> int | None:
    """Epochs done by the run in ``out`` as its checkpoint records, or None without one.

    Parameters
    ----------
    out : str or Path
        A run folder (``TrainConfig.out``).

    Returns
    -------
    int or None
        What a resumed run starts after (its metadata only is read).
    """
    from safetensors import safe_open

    path = Path(out) / "last.ckpt.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            return int(json.loads(handle.metadata()["state"])["epoch"])
    except (OSError, KeyError, ValueError, TypeError, SafetensorError):  # not one of ours
        return None


def _load_checkpoint(path: Path, model, optimizer) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["state"])
    tensors = load_file(str(path))
    model.load_state_dict(
        {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    )
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


FREEZE_OPTIONS = ("", "encoder", "backbone")
SELECT_METRICS = ("val_grow_iou", "val_ap", "val_fg_dice")


def freeze_parameters(model: InstSegNet, freeze: str = "") -> list[torch.nn.Parameter]:
    """Freeze part of the network for fine-tuning; return the parameters left to train.

    Parameters
    ----------
    model : InstSegNet
        The network (modified in place: ``requires_grad``).
    freeze : {"", "encoder", "backbone"}
        Nothing, the down path, or down and up path (only the heads train).

    Returns
    -------
    list of torch.nn.Parameter
        Trainable parameters.
    """
    if freeze not in FREEZE_OPTIONS:
        raise ValueError(f"freeze must be one of {FREEZE_OPTIONS}, not {freeze!r}")
    frozen_prefixes = {"": (), "encoder": ("encoders.",), "backbone": ("encoders.", "decoders.")}
    prefixes = frozen_prefixes[freeze]
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(prefixes) if prefixes else True)
        if param.requires_grad:
            params.append(param)
    return params


DATA_ON_DEVICE_OPTIONS = ("auto", True, False)


def data_device(config: TrainConfig, device: torch.device) -> torch.device:
    """Where the training data lives and its crops are made (``config.data_on_device``).

    Parameters
    ----------
    config : TrainConfig
        The run.
    device : torch.device
        The training device.

    Returns
    -------
    torch.device
        ``device`` when the data goes there (``"auto"``: on CUDA), else the CPU.
    """
    choice = config.data_on_device
    if not isinstance(choice, bool | str) or choice not in DATA_ON_DEVICE_OPTIONS:
        raise ValueError(f'data_on_device must be true, false or "auto", got {choice!r}')
    if choice == "auto":
        choice = device.type == "cuda"
    return device if choice else torch.device("cpu")


def train(
    config: TrainConfig | str | Path,
    resume: bool = True,
    progress: bool = True,
    callback: Callable[[dict[str, Any]], bool | None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Path:
    """Train a model; returns the path of the best weights (``out/best.safetensors``).

    Parameters
    ----------
    config : TrainConfig or path to a TOML file
        The run.
    resume : bool
        Continue from ``out/last.ckpt.safetensors`` when it exists.
    progress : bool
        Show a tqdm progress bar.
    callback : callable, optional
        Called after every epoch with the log row; returning True stops training (the GUI's
        live curves use this).
    should_stop : callable, optional
        Asked after every step; when it returns True the epoch ends there (validated,
        logged and checkpointed as a whole one) and training stops: a Stop button, or
        closing napari, waits one step instead of up to an epoch.

    Returns
    -------
    Path
        Best weights (by ``config.select_metric`` on the validation images), or the last
        ones without validation.
    """
    if not isinstance(config, TrainConfig):
        config = TrainConfig.from_toml(config)
    # TrainConfig's fields can be reassigned after it was made: normalise them again
    config = default_wells(replace(config))
    if config.select_metric not in SELECT_METRICS:
        raise ValueError(f"select_metric must be one of {SELECT_METRICS}")
    for name in ("epochs", "steps_per_epoch", "batch_size", "crop_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {config.max_steps}")
    out = Path(config.out)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = get_device(config.device)
    on = data_device(config, device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    train_names = parse_names(config.train_wells) if config.train_wells else None
    val_names = parse_names(config.val_wells) if config.val_wells else []
    if train_names is not None and set(train_names) & set(val_names):
        raise ValueError("train_wells and val_wells overlap")
    samples = load_samples(config.data, train_names)
    samples = [s for s in samples if s.name not in set(val_names)]
    val_samples = load_samples(config.data, val_names) if val_names else []
    replay_samples = []
    if not 0.0 <= config.aligned_fraction <= 1.0:
        raise ValueError(f"aligned_fraction must be in [0, 1], got {config.aligned_fraction}")
    if config.replay:
        if not 0.0 <= config.replay_fraction <= 1.0:
            raise ValueError(f"replay_fraction must be in [0, 1], got {config.replay_fraction}")
        replay_names = parse_names(config.replay_wells) if config.replay_wells else None
        replay_samples = load_samples(config.replay, replay_names)
        replay_samples = [s for s in replay_samples if s.name not in set(val_names)]

    if config.init:
        from .weights import load_model

        model = load_model(config.init)
        base_meta = {"parent": str(config.init), "parent_sha256": model.metadata.get("sha256")}
    else:
        model_cfg = ModelConfig.from_dict(config.model) if config.model else ModelConfig()
        model = InstSegNet(model_cfg)
        base_meta = {}
    model.to(device).train()
    # channels-last convolutions: ~1.7x faster training steps on the CPU (oneDNN), faster
    # under CUDA autocast; MPS support is patchy, so it keeps the default layout
    layout = memory_format(device)
    model.to(memory_format=layout)
    # labels corrected at another scale train at the model's (metadata "scale", see scale.py)
    samples = [at_recorded_scale(s) for s in samples]
    val_samples = [at_recorded_scale(s) for s in val_samples]
    replay_samples = [at_recorded_scale(s) for s in replay_samples]
    items = [prepare(s, model_config=model.config) for s in samples]
    val_items = [prepare(s, model_config=model.config) for s in val_samples]
    replay_items = [prepare(s, model_config=model.config) for s in replay_samples]
    # crops are made where the data is: on a GPU, nothing is copied per step
    items = [item.to(on) for item in items]
    replay_items = [item.to(on) for item in replay_items]
    draw_p = image_draw_probabilities(
        [s.name for s in samples], config.oversample_wells, config.oversample_factor
    )

    trainable = freeze_parameters(model, config.freeze)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    total_steps = config.epochs * config.steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    epochs = math.ceil(total_steps / config.steps_per_epoch)
    # the arguments are checked and the data read: only now does the run folder appear
    out.mkdir(parents=True, exist_ok=True)
    config.to_toml(out / "config.toml")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
    )
    start_epoch, best, elapsed_before = 0, -1.0, 0.0
    # the code that trained: HEAD when training started (kept across resumes), not at the end
    commits = {"commit": _git_commit()}
    ckpt = out / "last.ckpt.safetensors"
    if resume and ckpt.is_file():
        state = _load_checkpoint(ckpt, model, optimizer)
        start_epoch, best = state["epoch"], state["best"]
        elapsed_before = state.get("elapsed", 0.0)
        if state.get("commit", commits["commit"]) != commits["commit"]:
            commits = {"commit": state["commit"], "resumed_commit": commits["commit"]}
        rng = np.random.default_rng([config.seed, start_epoch])
        generator.manual_seed(config.seed + start_epoch)
        with warnings.catch_warnings():  # fast-forwarding the schedule, not a misuse
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
            for _ in range(start_epoch * config.steps_per_epoch):
                scheduler.step()
    base_meta = {**commits, **base_meta}
    # the width of the training objects (median over the images): predict(...,
    # scale="auto") resizes images so that their objects come to this width
    widths = [object_width(s.masks) for s in samples if len(s.masks)]
    widths = [w for w in widths if math.isfinite(w)]
    size_meta = {"object_width": round(float(np.median(widths)), 2)} if widths else {}
    log_path = out / "log.csv"
    # bfloat16 forward pass (no gradient scaling needed); losses stay float32
    amp_dtype = training_autocast_dtype(device, config.amp, config.cpu_amp)
    t0 = time.time()
    taus = model.config.taus
    bar = tqdm(
        total=total_steps,
        initial=min(start_epoch * config.steps_per_epoch, total_steps),
        disable=not progress,
        desc="train",
        unit="step",
    )
    best_path = out / "best.safetensors"
    stop = False
    for epoch in range(start_epoch, epochs):
        cls_weight = L.lambda_ramp(
            epoch, config.lambda_start, config.lambda_end, config.lambda_max
        )
        sums: dict[str, float] = {}
        # every epoch is steps_per_epoch long but a last one cut short by max_steps
        n_steps = min(config.steps_per_epoch, total_steps - epoch * config.steps_per_epoch)
        done = 0
        for _ in range(n_steps):
            crops = []
            for _ in range(config.batch_size):
                pool = items
                if replay_items and rng.random() < config.replay_fraction:
                    pool = replay_items
                if pool is items and config.oversample_wells:
                    index = rng.choice(len(pool), p=draw_p)
                else:  # uniform: the same random stream as runs made before oversampling
                    index = rng.integers(len(pool))
                crops.append(random_crop(pool[index], config, rng))
            x = torch.stack([c[0] for c in crops]).to(device)
            x = x.contiguous(memory_format=layout)
            masks = [c[1].to(device) for c in crops]
            trusted = torch.stack([c[2] for c in crops]).to(device)
            offset = torch.from_numpy(rng.uniform(0, 1024, (len(crops), 2)).astype(np.float32))
            with autocast(device, amp_dtype):
                outputs = model(x, offset.to(device))
            terms = training_loss(outputs, masks, trusted, config, taus, cls_weight, generator)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            torch.nn.utils.clip_grad_norm_(trainable, 5.0)
            optimizer.step()
            scheduler.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{float(terms['total'].detach()):.3f}", epoch=epoch + 1)
            done += 1
            if should_stop is not None and should_stop():
                stop = True
                break
        n_steps = done  # (fewer when stopped within the epoch)
        elapsed = elapsed_before + time.time() - t0
        row: dict[str, Any] = {"epoch": epoch + 1, "elapsed_s": round(elapsed, 1)}
        row.update({f"loss_{k}": v / n_steps for k, v in sums.items()})
        row["lambda"] = cls_weight
        row["lr"] = scheduler.get_last_lr()[0]
        last_epoch = epoch + 1 == epochs or stop
        over_time = config.time_limit_minutes and elapsed > 60 * config.time_limit_minutes
        if val_items and ((epoch + 1) % config.val_every == 0 or last_epoch or over_time):
            row.update(validate(model, val_items, device))
            if row[config.select_metric] > best:
                best = row[config.select_metric]
                _save_weights(model, best_path, config, row, elapsed, device, base_meta, size_meta)
        elif not val_items:
            _save_weights(model, best_path, config, row, elapsed, device, base_meta, size_meta)
        _append_csv(log_path, row)
        _save_checkpoint(
            ckpt,
            model,
            optimizer,
            {"epoch": epoch + 1, "best": best, "elapsed": elapsed, "commit": commits["commit"]},
        )
        if callback is not None and callback(row):
            stop = True
        if over_time:
            stop = True
        if stop:
            break
    bar.close()
    if not best_path.exists():
        _save_weights(model, best_path, config, {}, time.time() - t0, device, base_meta, size_meta)
    return best_path


def _save_weights(model, path, config, row, elapsed, device, base_meta, size_meta) -> None:
    meta = {
        "name": Path(config.out).name,
        **size_meta,
        "training": {
            "data": [str(d) for d in config.data],
            "train_wells": config.train_wells,
            "val_wells": config.val_wells,
            "epoch": row.get("epoch"),
            "training_time_s": round(elapsed, 1),
            "hardware": hardware_description(device),
            "config": asdict(config),
            **base_meta,
        },
        "metrics": {k: v for k, v in row.items() if k.startswith("val_")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    save_model(model, path, meta)


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    rows = []
    if path.exists():
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    rows.append({k: str(v) for k, v in row.items()})
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
