"""Running the network on images: normalisation, tiling with a halo, caching in zarr.

``iter_predict`` is a generator that yields ``(tiles_done, tiles_total)`` while it works and
returns the :class:`~napari_instseg.core.types.Prediction` (as stardist's prediction
generator does), so GUIs and CLIs can show progress; ``predict`` drives it.
Semi-convolutional coordinates are global image coordinates, so tiled and whole-image
predictions agree.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
from collections.abc import Callable, Generator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .device import autocast, exact_float32, get_device, inference_dtype, memory_format
from .edges import local_contrast
from .model import InstSegNet
from .normalize import model_input
from .scale import SCALE_TOLERANCE, check_scale, estimate_scale, resize_image, resize_prediction
from .types import Prediction
from .weights import DEFAULT_NORMALIZATION, load_model, model_signature

CACHE_VERSION = 2  # 2: predictions carry the image contrast (core/edges.py)


@lru_cache(maxsize=4)
def _shipped_model(device: str) -> InstSegNet:
    return load_model(None, device=device)


_LUMINANCE = np.array([0.2125, 0.7154, 0.0721], np.float32)  # skimage.color.rgb2gray's weights


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Grey values of colours on the last axis (RGB or RGBA; alpha left out).

    Parameters
    ----------
    rgb : np.ndarray
        ``(..., 3)`` or ``(..., 4)``, any number of leading axes.

    Returns
    -------
    np.ndarray
        ``(...)`` float32, ``0.2125 R + 0.7154 G + 0.0721 B`` (``skimage.color.rgb2gray``).
    """
    return np.asarray(rgb)[..., :3].astype(np.float32) @ _LUMINANCE


def colour_to_grey(image: np.ndarray, in_channels: int = 1) -> np.ndarray:
    """A colour plane as one grey channel, for a model that takes one channel.

    For images whose channel axis is known (``read_image`` gives ``(C, H, W)`` planes): a
    bright-field image saved as RGB or RGBA is its luminance (``0.2125 R + 0.7154 G +
    0.0721 B``, as ``skimage.color.rgb2gray``; alpha left out).

    Parameters
    ----------
    image : np.ndarray
        ``(C, H, W)``, channels first.
    in_channels : int
        Channels the model takes.

    Returns
    -------
    np.ndarray
        ``(H, W)`` float32 for ``C`` = 3 or 4 and a one-channel model; else ``image``.
    """
    image = np.asarray(image)
    if in_channels == 1 and image.ndim == 3 and image.shape[0] in (3, 4):
        return luminance(np.moveaxis(image, 0, -1))
    return image


def as_model_input(image: np.ndarray, in_channels: int) -> np.ndarray:
    """Check an image and bring it to (C, H, W) float32.

    Parameters
    ----------
    image : np.ndarray
        (H, W), (C, H, W) or (H, W, C) with C = ``in_channels``. For a one-channel model
        an RGB or RGBA image, (H, W, 3) or (H, W, 4), is taken as its luminance
        (``0.2125 R + 0.7154 G + 0.0721 B``, as ``skimage.color.rgb2gray``; alpha left
        out): a bright-field image saved in colour.
    in_channels : int
        Channels the model takes.

    Returns
    -------
    np.ndarray
        (C, H, W) float32.

    Raises
    ------
    ValueError
        Wrong dimensionality or channel count, empty, non-numeric or non-finite images.
    """
    image = np.asarray(image)
    if image.dtype.kind not in "biuf":
        raise ValueError(f"image must be numeric, got dtype {image.dtype}")
    if image.size == 0:
        raise ValueError(f"image is empty (shape {image.shape})")
    if image.ndim == 2:
        image = image[None]
    elif image.ndim == 3:
        if in_channels == 1 and image.shape[-1] in (3, 4) and min(image.shape[:2]) > 4:
            image = luminance(image)[None]
        elif image.shape[0] != in_channels and image.shape[-1] == in_channels:
            image = np.moveaxis(image, -1, 0)
        if image.shape[0] != in_channels:
            hint = ""
            if image.shape[0] > in_channels:
                hint = (
                    f"; if its first axis holds {image.shape[0]} planes of a stack or time "
                    "series, predict them plane by plane"
                )
            raise ValueError(
                f"image of shape {image.shape} does not have the model's {in_channels} "
                f"channel(s) on its first or last axis{hint}"
            )
    else:
        raise ValueError(
            f"predict takes one 2D image, (H, W) or (C, H, W); got shape {image.shape}. "
            "Predict a stack plane by plane."
        )
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values")
    if min(image.shape[-2:]) < MIN_IMAGE_SIDE:
        raise ValueError(
            f"image {image.shape[-2:]} is too small (at least {MIN_IMAGE_SIDE} x {MIN_IMAGE_SIDE})"
        )
    return image


def _tiles(size: int, tile: int) -> list[tuple[int, int]]:
    if size <= tile:
        return [(0, size)]
    n = int(np.ceil(size / tile))
    edges = np.linspace(0, size, n + 1).round().astype(int)
    return list(zip(edges[:-1], edges[1:], strict=True))


def cache_key(image: np.ndarray, model: InstSegNet, params: dict) -> str:
    """Key of a cached prediction: image content, model tensors and parameters.

    The model is its tensors and its architecture (``model.config``): the same tensors
    with semi-convolutional coordinates on or off, another ``coord_scale``, other taus or
    another flat-field blur give other maps, so they must not share a key.
    """
    digest = hashlib.sha256()
    arr = np.ascontiguousarray(image)
    digest.update(str((arr.shape, arr.dtype.str)).encode())
    digest.update(arr.tobytes())
    digest.update(model_signature(model).encode())
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(json.dumps(params, sort_keys=True).encode())
    digest.update(str(CACHE_VERSION).encode())
    return digest.hexdigest()[:32]


def iter_predict(
    image: np.ndarray,
    model: InstSegNet | None = None,
    device: str | torch.device = "auto",
    tile_size: int = 1024,
    halo: int = 64,
    tta: int | str = 1,
    precision: str = "auto",
) -> Generator[tuple[int, int], None, Prediction]:
    """Predict tile by tile, yielding ``(done, total)`` after each tile.

    Parameters
    ----------
    image : np.ndarray
        (H, W) or (C, H, W) raw intensities.
    model : InstSegNet, optional
        Defaults to the shipped model.
    device : str or torch.device
        ``auto`` picks CUDA, then MPS, then CPU.
    tile_size : int
        Images larger than this (either side) run in tiles of about this size.
    halo : int
        Context added around each tile and cropped away afterwards.
    tta : int or "auto"
        Test-time augmentation: 1 (none), 2, 4 or 8 flips/transposes of every tile whose
        boundary, foreground and class probabilities are averaged (``tta`` times the work);
        ``"auto"``: the model's ``recommended_tta`` (see :func:`resolve_tta`).
    precision : str
        ``"auto"``, ``"float32"`` or ``"bfloat16"``: what the network computes in (see
        :func:`~napari_instseg.core.device.inference_dtype`; ``"auto"`` is bfloat16 where
        the hardware has it, about twice as fast on such CPUs).

    Yields
    ------
    tuple of int
        Network passes done and in total (tiles times ``tta``).

    Returns
    -------
    Prediction
        The outputs (via ``StopIteration.value``; use :func:`predict` for a plain call).
    """
    dev = get_device(device)
    if model is None:
        model = _shipped_model(str(dev))
    model = model.to(dev).eval()
    cfg = model.config
    chw = as_model_input(image, cfg.in_channels)
    norm = model_input(
        chw,
        cfg.input_norm,
        DEFAULT_NORMALIZATION["low"],
        DEFAULT_NORMALIZATION["high"],
        cfg.flatfield_sigma,
    )
    prediction = yield from iter_predict_normalized(
        norm, model, dev, tile_size, halo, tta=tta, precision=precision
    )
    prediction.contrast = local_contrast(chw[0])
    return prediction


def iter_predict_normalized(
    norm: np.ndarray,
    model: InstSegNet,
    dev: torch.device,
    tile_size: int = 1024,
    halo: int = 64,
    origin: tuple[int, int] = (0, 0),
    tta: int | str = 1,
    precision: str = "auto",
) -> Generator[tuple[int, int], None, Prediction]:
    """The tiled network pass of :func:`iter_predict` on an already normalised input.

    Tiles start on multiples of the model's divisor (the pooling grid of the whole image)
    and get ``halo`` pixels of context, cropped away afterwards. ``origin`` offsets the
    semi-convolutional coordinates: a window of a larger plane (``core/batch.py``) gets the
    embeddings a prediction of the whole plane would give it.

    Parameters
    ----------
    norm : np.ndarray
        ``(C_net, H, W)`` float32, from :func:`~napari_instseg.core.normalize.model_input`.
    model : InstSegNet
        The network, on ``dev`` and in eval mode.
    dev : torch.device
        Where it runs.
    tile_size, halo : int
        As in :func:`iter_predict`.
    origin : tuple of int
        Global ``(row, col)`` of ``norm``'s first pixel.
    tta : int or "auto"
        Test-time augmentation, as in :func:`iter_predict`.
    precision : str
        As in :func:`iter_predict`.

    Yields
    ------
    tuple of int
        Network passes done and in total (tiles times ``tta``).

    Returns
    -------
    Prediction
        The outputs; ``metadata`` names the model, device, tiles and origin.
    """
    tta = resolve_tta(model, tta)
    dtype = inference_dtype(dev, precision)
    cfg = model.config
    layout = memory_format(dev)  # channels-last on CPU and CUDA, the same values
    model.to(memory_format=layout)
    _, h, w = norm.shape
    t_count, c1 = len(cfg.taus), cfg.n_classes + 1
    embeddings = np.empty((cfg.embedding_dim, h, w), np.float32)
    class_scores = np.empty((t_count, c1, h, w), np.float32)
    boundary = np.empty((h, w), np.float32)
    foreground = np.empty((h, w), np.float32)
    tiles = [(r, c) for r in _tiles(h, tile_size) for c in _tiles(w, tile_size)]
    x_all = torch.from_numpy(np.ascontiguousarray(norm, np.float32))
    for i, ((r0, r1), (c0, c1_)) in enumerate(tiles):
        # tile starts on multiples of the divisor: the same pooling grid as the whole image
        rr0, rr1 = max(r0 - halo, 0) // cfg.divisor * cfg.divisor, min(r1 + halo, h)
        cc0, cc1 = max(c0 - halo, 0) // cfg.divisor * cfg.divisor, min(c1_ + halo, w)
        x = x_all[:, rr0:rr1, cc0:cc1][None].to(dev)
        th, tw = x.shape[-2:]
        ph, pw = (-th) % cfg.divisor, (-tw) % cfg.divisor
        if ph or pw:
            mode = "reflect" if ph < th and pw < tw else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        x = x.contiguous(memory_format=layout)
        passes = _network_maps(model, x, (origin[0] + rr0, origin[1] + cc0), tta, layout)
        for k in itertools.count(1):
            # the contexts are entered per pass: a generator must not yield inside them
            with torch.inference_mode(), autocast(dev, dtype), exact_float32(dev, dtype):
                try:
                    next(passes)
                except StopIteration as stop:
                    emb, probs, bnd, fg = stop.value
                    break
            if k < tta:  # progress (and a chance to cancel) after every augmented pass
                yield i * tta + k, len(tiles) * tta
        sl = (slice(r0 - rr0, r0 - rr0 + (r1 - r0)), slice(c0 - cc0, c0 - cc0 + (c1_ - c0)))
        emb = emb[:, sl[0], sl[1]]
        probs = probs[:, :, sl[0], sl[1]]
        bnd = bnd[sl]
        fg = fg[sl]
        embeddings[:, r0:r1, c0:c1_] = emb.cpu().numpy()
        class_scores[:, :, r0:r1, c0:c1_] = probs.cpu().numpy()
        boundary[r0:r1, c0:c1_] = bnd.cpu().numpy()
        foreground[r0:r1, c0:c1_] = fg.cpu().numpy()
        yield (i + 1) * tta, len(tiles) * tta
    seediness = class_scores[:, 1:].max(axis=(0, 1))
    return Prediction(
        embeddings=embeddings,
        seediness=seediness,
        class_scores=class_scores,
        boundary=boundary,
        foreground=foreground,
        taus=tuple(cfg.taus),
        metadata={
            **_model_metadata(model),
            "device": str(dev),
            "tiles": len(tiles),
            "origin": tuple(origin),
            "tta": tta,
            "precision": str(dtype).removeprefix("torch."),
        },
    )


def resolve_tta(model: InstSegNet, tta: int | str) -> int:
    """The number of test-time augmentation passes ``tta`` asks for.

    Parameters
    ----------
    model : InstSegNet
        Its metadata's ``recommended_tta`` (what its segmentation parameters were tuned on)
        answers ``"auto"``; 1 when it has none.
    tta : int or "auto"
        1, 2, 4 or 8, or ``"auto"``.

    Returns
    -------
    int
        1, 2, 4 or 8.
    """
    if isinstance(tta, str) and tta == "auto":
        meta = getattr(model, "metadata", {}) or {}
        tta = meta.get("recommended_tta", 1)
    if isinstance(tta, bool) or not isinstance(tta, int | np.integer) or tta not in (1, 2, 4, 8):
        raise ValueError(
            f"tta must be 1, 2, 4 or 8 (augmented passes per tile) or 'auto', not {tta!r}"
        )
    return int(tta)


#: Test-time augmentations: (transpose, flipped axes) of the dihedral group's elements, in
#: the order ``tta`` takes them (1: none, 2: + left-right, 4: + flips, 8: + transposes).
TTA_TRANSFORMS: tuple[tuple[bool, tuple[int, ...]], ...] = (
    (False, ()),
    (False, (-1,)),
    (False, (-2,)),
    (False, (-2, -1)),
    (True, ()),
    (True, (-1,)),
    (True, (-2,)),
    (True, (-2, -1)),
)


def _dihedral(
    t: torch.Tensor, transpose: bool, dims: tuple[int, ...], inverse: bool
) -> torch.Tensor:
    """Apply one of :data:`TTA_TRANSFORMS` to the last two axes of ``t`` (or undo it)."""
    if inverse:
        t = t.flip(dims) if dims else t
        return t.transpose(-2, -1) if transpose else t
    t = t.transpose(-2, -1) if transpose else t
    return t.flip(dims) if dims else t


def _probability_maps(out: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Class probabilities, boundary and foreground of the network's first image."""
    return [
        out["class_logits"][0].float().softmax(1),
        torch.sigmoid(out["boundary_logits"][0].float()),
        torch.sigmoid(out["foreground_logits"][0].float()),
    ]


def _network_maps(
    model: InstSegNet,
    x: torch.Tensor,
    origin: tuple[int, int],
    tta: int,
    layout: torch.memory_format = torch.channels_last,
) -> Generator[None, None, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One tile through the network: embeddings, class probabilities, boundary, foreground.

    A generator that yields after each of the ``tta`` passes but the last and returns the maps.
    ``layout`` is the memory format the augmented copies of the tile are given.

    With ``tta > 1`` the boundary, foreground and class probabilities are the mean over the
    first ``tta`` flips/transposes of the tile (each mapped back). The embeddings always come
    from the tile as it is: the semi-convolutional coordinates and the learned offsets of a
    flipped tile are not the flipped embeddings, so averaging them would be wrong.
    """
    out = model(x, origin)
    emb = out["embeddings"][0].float()
    maps = _probability_maps(out)
    for transpose, dims in TTA_TRANSFORMS[1:tta]:
        yield
        xt = _dihedral(x, transpose, dims, inverse=False)
        passed = _probability_maps(model(xt.contiguous(memory_format=layout), origin))
        for total, new in zip(maps, passed, strict=True):
            total += _dihedral(new, transpose, dims, inverse=True)
    if tta > 1:
        for total in maps:
            total /= tta
    probs, bnd, fg = maps
    return emb, probs, bnd, fg


def _model_metadata(model: InstSegNet) -> dict:
    """What a prediction carries about its model, read from the model as it is now.

    The segmentation parameters and recommended method live in the weights' metadata and
    change when a model is re-tuned without new tensors, so a cached prediction takes them
    from the model at hand, never from the cache.
    """
    meta = getattr(model, "metadata", {}) or {}
    return {
        "model": meta.get("name", getattr(model, "source", "unsaved model")),
        "model_sha256": meta.get("sha256"),
        "recommended_method": meta.get("recommended_method"),
        "segment_params": meta.get("segment_params", {}),
    }


def predict(
    image: np.ndarray,
    model: InstSegNet | str | Path | None = None,
    device: str | torch.device = "auto",
    tile_size: int = 1024,
    halo: int = 64,
    tta: int | str = 1,
    cache: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    scale: float | str = 1.0,
    precision: str = "auto",
) -> Prediction:
    """Predict every per-pixel output for one 2D image.

    Parameters
    ----------
    image : np.ndarray
        (H, W) or (C, H, W) raw intensities (normalised inside, per image).
    model : InstSegNet or path, optional
        A model, a weights file, or None for the shipped BBBC010 model.
    device : str or torch.device
        ``auto``, ``cuda``, ``mps`` or ``cpu``.
    tile_size, halo : int
        Tiling for large images (see :func:`iter_predict`): tiles of at most
        ``tile_size`` (>= 16) pixels a side, with ``halo`` (>= 0) pixels of context.
    tta : int or "auto"
        Test-time augmentation: 1 (none, default), 2, 4 or 8 flipped/transposed passes whose
        boundary, foreground and class maps are averaged (see :func:`iter_predict`);
        ``"auto"``: as many as the model's segmentation parameters were tuned with.
    cache : str or Path, optional
        Folder of a zarr cache. A result is reused only when the image content, the model's
        tensors and these parameters are all the same (they make its key).
    progress : callable, optional
        Called with ``(done, total)`` after every tile and every augmented pass.
    scale : float or "auto"
        Resize the image by this factor before the network sees it, for objects wider
        (``scale < 1``) or narrower (``> 1``) than the ones the model was trained on
        (``model.metadata["object_width"]``, about 8 px for the shipped model); the outputs
        come back on the image's pixels and ``metadata["scale"]`` records the factor, which
        :func:`~napari_instseg.core.instances.segment` follows. ``"auto"`` estimates it
        from three to six quick passes (see :func:`auto_scale`).
    precision : str
        ``"auto"`` (default), ``"float32"`` or ``"bfloat16"``: what the network computes in
        (:func:`~napari_instseg.core.device.inference_dtype`). ``"auto"`` takes bfloat16 on
        CUDA and on CPUs with hardware bfloat16 (AMX, AVX512-BF16), where it is about twice
        as fast; the maps differ from float32 by a few hundredths at most, the segmentation
        accuracy not measurably (docs/benchmarks.md). Part of the cache key.

    Returns
    -------
    Prediction
        The outputs, ``metadata["cached"]`` tells whether it came from the cache.
    """
    if isinstance(tile_size, bool) or int(tile_size) != tile_size or tile_size < 16:
        raise ValueError(f"tile_size must be an integer >= 16, got {tile_size!r}")
    if isinstance(halo, bool) or int(halo) != halo or halo < 0:
        raise ValueError(f"halo must be an integer >= 0, got {halo!r}")
    dev = get_device(device)
    if model is None:
        model = _shipped_model(str(dev))
    elif isinstance(model, str | Path):
        model = load_model(model, device=dev)
    tta = resolve_tta(model, tta)
    dtype = inference_dtype(dev, precision)
    scale = check_scale(scale)
    estimated = scale == "auto"
    chw = as_model_input(image, model.config.in_channels)
    if estimated:
        scale = _cached_auto_scale(chw, model, dev, tile_size, halo, cache, precision)
    store = None
    if cache is not None:
        key = cache_key(
            chw,
            model,
            {
                "tile_size": tile_size,
                "halo": halo,
                **DEFAULT_NORMALIZATION,
                **({"tta": tta} if tta != 1 else {}),
                **({"scale": scale} if scale != 1.0 else {}),
                **({"precision": str(dtype)} if dtype != torch.float32 else {}),
            },
        )
        store = Path(cache) / f"{key}.zarr"
        cached = _read_cache(store)
        if cached is not None:
            cached.metadata.update(_model_metadata(model))
            if progress is not None:
                progress(1, 1)
            return cached
    network_input = chw if scale == 1.0 else resize_image(chw, scale)
    gen = iter_predict(network_input, model, dev, tile_size, halo, tta, precision)
    while True:
        try:
            done, total = next(gen)
        except StopIteration as stop:
            prediction = stop.value
            break
        if progress is not None:
            progress(done, total)
    if scale != 1.0:  # the network's own maps are kept for segment() (model_grid)
        network_grid = prediction
        prediction = resize_prediction(prediction, chw.shape[-2:])
        prediction.model_grid = network_grid
        # outlines are decided on the image's own pixels: its contrast, not a resized one
        prediction.contrast = local_contrast(chw[0])
    prediction.metadata["scale"] = scale
    if estimated:
        prediction.metadata["scale_estimated"] = True
    prediction.metadata["cached"] = False
    if store is not None:
        _write_cache(store, prediction)
    return prediction


#: Scales of the passes with which ``scale="auto"`` looks for the objects' size.
AUTO_SCALE_PASSES = (1.0, 0.5, 0.25)

#: the smallest image side (pixels) the network is run on
MIN_IMAGE_SIDE = 8
#: ``scale="auto"`` runs again at its estimate until two estimates agree within this ratio.
AUTO_SCALE_AGREEMENT = 1.1


def model_object_width(model: InstSegNet) -> float:
    """The typical width of a model's training objects, pixels (``scale="auto"`` needs it).

    Raises
    ------
    ValueError
        When the model's metadata has no ``object_width`` (models trained before it
        was recorded).
    """
    reference = (getattr(model, "metadata", {}) or {}).get("object_width")
    if not reference:
        raise ValueError(
            "scale='auto' needs the width of the model's training objects "
            "(metadata 'object_width'), which this model does not have; give the scale "
            "as a number (the model's object width over yours)"
        )
    return float(reference)


def auto_scale(
    image: np.ndarray,
    model: InstSegNet,
    device: str | torch.device = "auto",
    tile_size: int = 1024,
    halo: int = 64,
    precision: str = "auto",
) -> float:
    """Estimate the resizing factor that brings an image's objects to the model's width.

    Passes at the scales ``AUTO_SCALE_PASSES`` (1, 1/2, 1/4) each measure the predicted
    worms' mean width (see :func:`~napari_instseg.core.scale.estimate_scale`) and so
    estimate the factor; the pass whose estimate is closest to its own scale saw worms of
    the model's width, and its estimate is taken, refined by passes at the estimate
    until two agree within 10 % (three more at most). Within ``SCALE_TOLERANCE`` of 1
    the answer is 1.

    Parameters
    ----------
    image : np.ndarray
        (H, W) or (C, H, W) raw intensities.
    model : InstSegNet
        A model whose metadata has ``object_width`` (the typical width of its training
        objects in pixels).
    device : str or torch.device
        Where to run the passes.
    tile_size, halo : int
        Tiling (see :func:`iter_predict`).
    precision : str
        What the network computes in (see :func:`predict`).

    Returns
    -------
    float
        The factor, rounded to two decimals; 1.0 when no foreground is found.

    Raises
    ------
    ValueError
        When the model's metadata has no ``object_width``.
    """
    reference = model_object_width(model)
    close = math.log(SCALE_TOLERANCE)

    def estimate(scale: float) -> float | None:
        return estimate_scale(
            predict(image, model, device, tile_size, halo, scale=scale, precision=precision),
            reference,
        )

    # too-wide worms come out as hollow outlines, so the width measured at one scale
    # misleads; the pass whose estimate agrees best with its own scale has seen worms of
    # the model's width (the two smaller passes cost 1/4 and 1/16 of the first)
    # passes that would shrink a small image below what the network takes are left out
    shortest = min(np.asarray(image).shape[-2:])
    passes = [s for s in AUTO_SCALE_PASSES if round(shortest * s) >= MIN_IMAGE_SIDE]
    found = {s: e for s in passes if (e := estimate(s)) is not None}
    if not found:
        return 1.0
    seen, best = min(found.items(), key=lambda item: abs(math.log(item[1] / item[0])))
    # narrow worms come out a little wide: run again at the estimate until it settles
    for _ in range(3):
        if abs(math.log(best)) <= close or abs(math.log(best / seen)) <= math.log(
            AUTO_SCALE_AGREEMENT
        ):
            break
        seen = round(best, 2)
        best = estimate(seen) or best
    return 1.0 if abs(math.log(best)) <= close else round(best, 2)


def _cached_auto_scale(
    chw: np.ndarray,
    model: InstSegNet,
    device: torch.device,
    tile_size: int,
    halo: int,
    cache: str | Path | None,
    precision: str = "auto",
) -> float:
    """:func:`auto_scale`, its answer kept in the cache folder (same image and model)."""
    if cache is None:
        return auto_scale(chw, model, device, tile_size, halo, precision)
    key = cache_key(chw, model, {"tile_size": tile_size, "halo": halo, "scale": "auto"})
    path = Path(cache) / f"{key}.scale.json"
    try:
        return float(json.loads(path.read_text())["scale"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    scale = auto_scale(chw, model, device, tile_size, halo, precision)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"scale": scale}))
        os.replace(tmp, path)
    except OSError:  # a read-only cache: the estimate is still good, only not kept
        pass
    return scale


_FIELDS = ("embeddings", "seediness", "class_scores", "boundary", "foreground")


def _write_maps(group: Any, prediction: Prediction) -> None:
    for name in _FIELDS + (("contrast",) if prediction.contrast is not None else ()):
        arr = getattr(prediction, name)
        group.create_array(name, shape=arr.shape, dtype=arr.dtype)[...] = arr


def _read_maps(group: Any) -> dict[str, np.ndarray]:
    arrays = {name: np.asarray(group[name][...]) for name in _FIELDS}
    if "contrast" in group:
        arrays["contrast"] = np.asarray(group["contrast"][...])
    return arrays


def _write_cache(store: Path, prediction: Prediction) -> None:
    import zarr

    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.with_name(f".{store.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    group = zarr.open_group(str(tmp), mode="w")
    _write_maps(group, prediction)
    if prediction.model_grid is not None:
        _write_maps(group.create_group("model_grid"), prediction.model_grid)
    group.attrs["taus"] = list(prediction.taus)
    group.attrs["metadata"] = {k: v for k, v in prediction.metadata.items() if k != "cached"}
    group.attrs["complete"] = True
    if store.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return
    os.replace(tmp, store)


def _read_cache(store: Path) -> Prediction | None:
    import zarr

    if not store.is_dir():
        return None
    try:
        group = zarr.open_group(str(store), mode="r")
        if not group.attrs.get("complete"):
            return None
        meta = dict(group.attrs.get("metadata", {}))
        taus = tuple(group.attrs["taus"])
        network_grid = None
        if "model_grid" in group:
            network_grid = Prediction(**_read_maps(group["model_grid"]), taus=taus)
        elif float(meta.get("scale") or 1.0) != 1.0:
            return None  # written before the network's maps were kept: predict again
        meta["cached"] = True
        return Prediction(**_read_maps(group), taus=taus, metadata=meta, model_grid=network_grid)
    except (KeyError, ValueError, OSError):
        return None
