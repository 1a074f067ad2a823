"""Fine-tuning from corrected labels, and the model versions it leaves beside the data.

The loop the plugin exists for: a user corrects a few images, exports them as training
folders (:mod:`napari_instseg.core.training_folder`), and :func:`finetune` turns them into a
better model in minutes. It is :func:`napari_instseg.core.train.train` with few-shot
defaults:

- starts from a parent model (the shipped one unless told otherwise);
- holds part of the images out for validation automatically (at least one when there are
  two or more) and keeps the checkpoint with the best validation AP of the boundary
  pipeline;
- trains everything by default (``freeze=""``); ``"encoder"`` or ``"backbone"`` freeze
  parts of the network (see docs/benchmarks.md for what each gives);
- unreviewed instances of an export are left out of the loss (:func:`train.prepare`);
- the result is a *model version* in ``<first data folder>/models/<name>/``: weights
  (``model.safetensors`` + JSON metadata with parent, data, metrics, time), the config and
  the per-epoch log. :func:`list_model_versions` finds them again (the widget lists them).
"""

from __future__ import annotations

import json
import numbers
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .device import get_device
from .io import path_list
from .train import FREEZE_OPTIONS, TrainConfig, folder_list, load_samples, train
from .weights import load_model, read_metadata, save_model, shipped_weights_path

MODELS_DIRNAME = "models"
#: ``replay="auto"`` leaves the parent's images out when the parent scores less than this
#: share of its own validation AP on the held-out corrections: images unlike its training
#: images, where replaying them held the new model back (docs/benchmarks.md, "Session 31:
#: fine-tuning where the shipped model is off")
REPLAY_MIN_PARENT_SCORE = 0.5
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class ModelVersion:
    """A fine-tuned model found beside its data.

    Attributes
    ----------
    name : str
        Folder name, e.g. ``bbbc010-ft3``.
    path : Path
        The weights file.
    parent : str
        Weights it was fine-tuned from.
    created : str
        ISO time.
    metrics : dict
        Validation metrics at the kept checkpoint.
    images : list of str
        Training and validation image names.
    """

    name: str
    path: Path
    parent: str
    created: str
    metrics: dict[str, Any]
    images: list[str]

    @property
    def label(self) -> str:
        """Short text for a model chooser."""
        ap = self.metrics.get("val_ap")
        score = f", val AP {ap:.2f}" if isinstance(ap, int | float) else ""
        n = len(self.images)
        return f"{self.name} ({n} image{'' if n == 1 else 's'}{score})"


def split_holdout(
    names: Sequence[str], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Choose validation images: ``round(val_fraction * n)``, at least 1 when ``n >= 2``.

    Parameters
    ----------
    names : sequence of str
        Image names (unique).
    val_fraction : float
        Fraction held out, in [0, 1).
    seed : int
        The split is random but reproducible.

    Returns
    -------
    tuple of list of str
        Training names, validation names (both in the input order).
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    names = list(names)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"image names must be unique across the data folders: {dup}")
    n = len(names)
    n_val = 0 if n < 2 or val_fraction == 0 else min(max(1, round(val_fraction * n)), n - 1)
    picked = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    train = [x for i, x in enumerate(names) if i not in picked]
    val = [x for i, x in enumerate(names) if i in picked]
    return train, val


def models_folder(data: str | Path | Sequence[str | Path]) -> Path:
    """Where model versions of these data are kept: ``<first folder>/models``."""
    data = path_list(data)
    if not data:
        raise ValueError("no data folders given")
    return Path(data[0]) / MODELS_DIRNAME


def _claim_next_name(folder: Path, stem: str) -> str:
    """The first free ``<stem>-ftN`` in ``folder``, its folder created to claim it.

    The folder is made with ``exist_ok=False``, so two fine-tunes started at once (the CLI
    and the plugin, say) never take the same name and write into one folder.
    """
    folder.mkdir(parents=True, exist_ok=True)
    i = 1
    while True:
        try:
            (folder / f"{stem}-ft{i}").mkdir()
        except FileExistsError:
            i += 1
            continue
        return f"{stem}-ft{i}"


#: held-out images needed before fine-tuning re-chooses the boundary threshold
MIN_IMAGES_TO_RETUNE = 3


class FinetuneInterrupted(KeyboardInterrupt):
    """Fine-tuning was interrupted (Ctrl-C) after some weights were kept.

    The best weights so far are registered as a model version before this is raised.

    Attributes
    ----------
    version : ModelVersion
        The version kept.
    """

    def __init__(self, version: ModelVersion) -> None:
        super().__init__(f"fine-tuning interrupted; kept model version {version.name}")
        self.version = version


def check_version_name(name: str) -> str:
    """Check that a model version's name is one folder name inside the models folder.

    Parameters
    ----------
    name : str
        The version name.

    Returns
    -------
    str
        ``name``.

    Raises
    ------
    TypeError
        If ``name`` is not a ``str``.
    ValueError
        If it is empty, ``.`` or ``..``, starts with ``.``, or contains a path separator
        or a drive colon.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if not name.strip() or name != name.strip():
        raise ValueError(f"name must be a non-empty name without surrounding spaces: {name!r}")
    if name.startswith(".") or any(c in name for c in "/\\:\0"):
        raise ValueError(
            f"name {name!r} must be a plain folder name inside the models folder: no path "
            "separators (/ \\), no ':', no leading '.' (no '..')"
        )
    return name


def _check_types(**values: tuple[Any, type | tuple[type, ...], str]) -> None:
    """Raise TypeError naming the first argument whose value is not of its kind."""
    for arg, (value, kind, text) in values.items():
        if isinstance(value, bool) or not isinstance(value, kind):  # True is no number here
            raise TypeError(f"{arg} must be {text}, got {type(value).__name__} {value!r}")


def finetune(
    data: str | Path | Sequence[str | Path],
    init: str | Path | None = None,
    *,
    steps: int = 200,
    freeze: str = "",
    lr: float = 5e-4,
    val_names: Sequence[str] | None = None,
    val_fraction: float = 0.2,
    batch_size: int = 4,
    crop_size: int = 256,
    steps_per_epoch: int = 20,
    seed: int = 0,
    name: str | None = None,
    out: str | Path | None = None,
    device: str | torch.device = "auto",
    num_threads: int = 0,
    time_limit_minutes: float = 0.0,
    progress: bool = False,
    callback: Callable[[dict[str, Any]], bool | None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    replay: Sequence[str | Path] | str | None = "auto",
    replay_names: str = "",
    replay_fraction: float = 0.5,
) -> ModelVersion:
    """Fine-tune a model on training folders (or BBBC010-style folders).

    Parameters
    ----------
    data : path or sequence of path
        Training folders (the plugin's export format) or BBBC010-style folders; a single
        ``str`` or ``Path`` is one folder.
    init : path, optional
        Parent weights; default: the shipped model.
    steps : int
        Optimiser steps (batches of ``batch_size`` random crops), exactly: the last epoch
        is shorter when ``steps`` is not a multiple of ``steps_per_epoch``.
    freeze : {"", "encoder", "backbone"}
        Parts of the network kept fixed.
    lr : float
        Peak learning rate (cosine decay to 0).
    val_names : sequence of str, optional
        Validation images; default: :func:`split_holdout` with ``val_fraction``.
    val_fraction : float
        Fraction of the images held out when ``val_names`` is not given.
    batch_size, crop_size, steps_per_epoch : int
        Batches; validation and the ``callback`` run after every ``steps_per_epoch`` steps.
    seed : int
        Seeds the split, the crops and the network.
    name : str, optional
        Version name, a plain folder name (no path separators, no leading ``.``); default
        ``<parent name>-ft<N>``.
    out : path, optional
        Version folder; default ``<first data folder>/models/<name>``.
    device : str or torch.device
        ``auto``, ``cuda``, ``mps`` or ``cpu`` (``cuda:1``: a given GPU).
    num_threads : int
        torch CPU threads (0: torch's default).
    time_limit_minutes : float
        Stop early (best checkpoint kept) after this long; 0: no limit.
    progress : bool
        tqdm progress bar.
    callback : callable, optional
        Gets every epoch's log row (losses, ``val_ap``, ...); returning True stops.
    should_stop : callable, optional
        Asked after every step; True ends the epoch there and stops (a Stop button need
        not wait for the epoch's end). The best weights so far become the version.
    replay : sequence of path, "auto", "parent" or None
        Folders of earlier training images mixed into the crops, so the corrections add
        to what the parent knew; ``"parent"``: the parent's own training images, as
        recorded in its metadata (:func:`parent_training_data`), an error when they are
        not on this computer; ``"auto"`` (default): those when found, else no replay, and
        none either when the parent scores less than ``REPLAY_MIN_PARENT_SCORE`` of its
        own validation AP on the held-out corrections (images unlike its training images:
        recorded as ``finetune.replay_skipped``); None: no replay. (Benchmarks: replay
        turned "no gain" into a gain on images like the parent's, and held fine-tuning
        back on images unlike them; see docs/benchmarks.md.)
    replay_names : str
        Image names or well ranges of ``replay`` to use (empty: all; ignored for
        ``"parent"``, whose recorded wells are used).
    replay_fraction : float
        Share of the crops drawn from the replay images.

    Returns
    -------
    ModelVersion
        The new version (weights in ``out/model.safetensors``).

    Raises
    ------
    FinetuneInterrupted
        On a KeyboardInterrupt (Ctrl-C) after the first weights were kept: the best
        weights so far are registered as a version first (its ``version`` attribute). A
        KeyboardInterrupt before that leaves no version.
    TypeError
        If an argument has the wrong type (e.g. ``data`` as ``bytes``).
    """
    data = folder_list(data, "data")
    if not data:
        raise ValueError("no data folders given")
    integer, real = (numbers.Integral, "an int"), (numbers.Real, "a number")
    path_or_none = ((str, os.PathLike, type(None)), "a path (str or Path) or None")
    string = (str, "a str")
    _check_types(
        init=(init, *path_or_none),
        steps=(steps, *integer),
        freeze=(freeze, *string),
        lr=(lr, *real),
        val_fraction=(val_fraction, *real),
        batch_size=(batch_size, *integer),
        crop_size=(crop_size, *integer),
        steps_per_epoch=(steps_per_epoch, *integer),
        seed=(seed, *integer),
        out=(out, *path_or_none),
        device=(device, (str, torch.device), "a str or torch.device"),
        num_threads=(num_threads, *integer),
        time_limit_minutes=(time_limit_minutes, *real),
        replay_names=(replay_names, *string),
        replay_fraction=(replay_fraction, *real),
    )
    if name is not None:
        check_version_name(name)
    if isinstance(val_names, str):  # one image name, not a list of characters
        val_names = [val_names]
    if val_names is not None:
        bad_names = [v for v in val_names if not isinstance(v, str)]
        if bad_names:
            raise TypeError(f"val_names must hold image names (str), got {bad_names[0]!r}")
    get_device(device)  # an unknown or missing device: a clear error before any folder
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if freeze not in FREEZE_OPTIONS:
        raise ValueError(f"freeze must be one of {FREEZE_OPTIONS}, not {freeze!r}")
    # checked here, before the version folder is made (train() checks some only after)
    if not 0.0 <= replay_fraction <= 1.0:
        raise ValueError(f"replay_fraction must be in [0, 1], got {replay_fraction}")
    for label, value in (
        ("batch_size", batch_size),
        ("crop_size", crop_size),
        ("steps_per_epoch", steps_per_epoch),
    ):
        if value < 1:
            raise ValueError(f"{label} must be >= 1, got {value}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    missing = [str(d) for d in data if not Path(d).is_dir()]
    if missing:
        raise FileNotFoundError(f"data folder(s) not found: {missing}")
    parent = Path(init) if init else shipped_weights_path()
    if not parent.is_file():
        raise FileNotFoundError(f"parent weights not found: {parent}")
    parent_meta = read_metadata(parent)
    replay_folders: list[str] = []
    if isinstance(replay, str) and replay in ("auto", "parent"):
        found = parent_training_data(parent)
        if found is None and replay == "auto":
            found = ([], "")
        if found is None:
            raise FileNotFoundError(
                f"the training images of {parent.name} are not on this computer "
                f"(recorded: {(parent_meta.get('training') or {}).get('data')})"
            )
        # images trained on now are not replayed as well (a fine-tuned parent's own data)
        training_now = {Path(d).resolve() for d in data}
        kept = [f for f in found[0] if Path(f).resolve() not in training_now]
        replay_folders = [str(f) for f in kept]
        replay_names = found[1] if kept else ""
    elif replay:
        replay_folders = folder_list(replay, "replay")
        gone = [f for f in replay_folders if not Path(f).is_dir()]
        if gone:
            raise FileNotFoundError(f"replay folder(s) not found: {gone}")
    samples = load_samples(list(data), None)
    worms = sum(s.n_instances for s in samples)
    trusted = sum(
        s.n_instances if s.reviewed is None else int(np.count_nonzero(s.reviewed)) for s in samples
    )
    if worms and not trusted:
        raise ValueError(
            f"nothing to learn from: none of the {worms} worms in these folders is marked "
            "reviewed, and fine-tuning learns only from reviewed worms (the others are left "
            "out of the loss); mark the worms you checked as reviewed (K in the widget) and "
            "export again"
        )
    names = [s.name for s in samples]
    bad = [n for n in names if "," in n]
    if bad:
        raise ValueError(f"image names must not contain commas: {bad}")
    if val_names is None:
        train_names, val_list = split_holdout(names, val_fraction, seed)
    else:
        val_list = list(val_names)
        unknown = sorted(set(val_list) - set(names))
        if unknown:
            raise ValueError(f"validation images not in the data: {unknown}")
        train_names = [n for n in names if n not in set(val_list)]
    if not train_names:
        raise ValueError("no images left for training after holding out validation images")
    parent_score = None
    skipped = ""
    if replay == "auto" and replay_folders and val_list:
        reference = float((parent_meta.get("metrics") or {}).get("val_ap") or 0.0)
        held_out = [s for s in samples if s.name in set(val_list)]
        parent_score = score_on(parent, held_out, device)
        if reference > 0 and parent_score < REPLAY_MIN_PARENT_SCORE * reference:
            skipped = (
                f"the parent scores AP {parent_score:.2f} on the held-out corrections, less "
                f"than {REPLAY_MIN_PARENT_SCORE:.0%} of its own {reference:.2f}: images unlike "
                "its training images, which replaying them would hold back"
            )
            replay_folders, replay_names = [], ""
    stem = str(parent_meta.get("name") or parent.stem).split("-ft")[0]
    claimed = False  # a version folder made here just now to claim its name
    if out is None:
        folder = models_folder(data)
        claimed = name is None
        name = name or _claim_next_name(folder, stem)
        out = folder / name
    out = Path(out)
    name = name or out.name
    if (out / WEIGHTS_NAME).exists():
        raise FileExistsError(f"{out / WEIGHTS_NAME} exists; choose another name")
    try:
        epochs = max(1, int(np.ceil(steps / steps_per_epoch)))  # the last one may be shorter
        config = TrainConfig(
            data=[str(d) for d in data],
            train_wells=",".join(train_names),
            val_wells=",".join(val_list),
            out=str(out),
            init=str(parent),
            epochs=epochs,
            steps_per_epoch=min(steps_per_epoch, steps),
            max_steps=steps,
            batch_size=batch_size,
            crop_size=crop_size,
            lr=lr,
            seed=seed,
            lambda_start=-1.0,
            lambda_end=0.0,
            val_every=1,
            time_limit_minutes=time_limit_minutes,
            freeze=freeze,
            select_metric="val_ap",
            device=str(device),
            num_threads=num_threads,
            replay=replay_folders,
            replay_wells=replay_names if replay_folders else "",
            replay_fraction=replay_fraction,
        )
    except Exception:
        if claimed:  # (an empty folder would make later versions skip its number)
            shutil.rmtree(out, ignore_errors=True)
        raise
    t0 = time.time()
    made = claimed or not out.exists()
    interrupted = False
    try:
        best = train(
            config, resume=True, progress=progress, callback=callback, should_stop=should_stop
        )
    except BaseException as err:
        best = out / "best.safetensors"
        # Ctrl-C after the first weights were kept: keep them, as the Stop button does
        interrupted = isinstance(err, KeyboardInterrupt) and best.is_file()
        if not interrupted:
            # a run that failed before writing any weights leaves no empty version behind
            # (it would hold only config.toml, and later versions would skip its number)
            if made and out.is_dir() and not any(out.glob("*.safetensors")):
                shutil.rmtree(out, ignore_errors=True)
            raise
    model = load_model(best)
    meta = dict(model.metadata)
    metrics = meta.get("metrics", {})
    meta["name"] = name
    meta["kind"] = "finetuned"
    meta["parent"] = {
        "path": str(parent),
        "name": parent_meta.get("name"),
        "sha256": parent_meta.get("sha256"),
    }
    meta["data"] = {"folders": [str(d) for d in data], "train": train_names, "val": val_list}
    meta["finetune"] = {
        "steps": steps,
        "freeze": freeze,
        "lr": lr,
        "wall_time_s": round(time.time() - t0, 1),
        "interrupted": interrupted,
        "replay": {"folders": replay_folders, "names": replay_names, "fraction": replay_fraction}
        if replay_folders
        else None,
    }
    if parent_score is not None:
        meta["finetune"]["parent_val_ap"] = round(parent_score, 4)
    if skipped:
        meta["finetune"]["replay_skipped"] = skipped
    params = json.loads(json.dumps(parent_meta.get("segment_params") or {}))
    # one or two held-out images are too few to re-choose the threshold (measured: the
    # choice on one image cost 0.02 AP in the benchmark); keep the parent's then
    if len(val_list) >= MIN_IMAGES_TO_RETUNE and metrics.get("val_ap_threshold"):
        params.setdefault("boundary", {})["boundary_threshold"] = metrics["val_ap_threshold"]
    meta["segment_params"] = params
    meta["recommended_method"] = parent_meta.get("recommended_method") or "boundary"
    meta["recommended_tta"] = int(parent_meta.get("recommended_tta", 1))
    meta["description"] = (
        f"Fine-tuned from {parent_meta.get('name') or parent.name} on "
        f"{len(train_names)} image(s), validated on {len(val_list)}."
    )
    weights = save_model(model, out / WEIGHTS_NAME, meta)
    (out / "best.safetensors").unlink(missing_ok=True)
    (out / "best.json").unlink(missing_ok=True)
    ckpt = out / "last.ckpt.safetensors"
    if ckpt.exists():
        ckpt.unlink()
    ckpt.with_suffix(".tmp").unlink(missing_ok=True)  # a checkpoint cut off by Ctrl-C
    version = _version(weights)
    if interrupted:
        raise FinetuneInterrupted(version)
    return version


def score_on(weights: str | Path, samples: Sequence[Any], device: str | torch.device) -> float:
    """A model's validation AP on samples, as fine-tuning measures its checkpoints.

    The cheap metric of :func:`napari_instseg.core.train.validate` (COCO AP of the
    boundary pipeline, the best of a few boundary thresholds).

    Parameters
    ----------
    weights : path
        The model.
    samples : sequence of Sample
        Images with their instances (unreviewed ones count too).
    device : str or torch.device
        Where to run it.

    Returns
    -------
    float
        The AP (0 without samples).
    """
    from .scale import at_recorded_scale
    from .train import prepare, validate

    if not samples:
        return 0.0
    dev = get_device(device)
    model = load_model(weights, device=dev)
    items = [prepare(at_recorded_scale(s), model_config=model.config).to(dev) for s in samples]
    with torch.no_grad():
        return float(validate(model, items, dev)["val_ap"])


def parent_training_data(weights: str | Path, _depth: int = 0) -> tuple[list[Path], str] | None:
    """The training images a model was trained on, if they are on this computer.

    Reads ``training.data`` and ``training.train_wells`` from the weights' metadata.
    Relative folders are tried from the current directory and from the folders above the
    weights file (a run folder or the package's ``weights/`` sits below the project).

    A fine-tuned model's ``training.data`` are a user's corrections, which a next round
    trains on again: its images to replay are those it replayed itself (recorded under
    ``finetune.replay``), else its parent's, and so on up the chain, so every round keeps
    the images the chain started from.

    Parameters
    ----------
    weights : path
        A ``.safetensors`` file with metadata.

    Returns
    -------
    (list of Path, str) or None
        The folders and the image names / well ranges; None when a folder is missing or
        nothing is recorded.
    """
    weights = Path(weights)
    meta = read_metadata(weights)
    tuned = meta.get("finetune")
    if isinstance(tuned, dict):
        replayed = tuned.get("replay") or {}
        if replayed.get("folders"):
            folders = [Path(f) for f in replayed["folders"]]
            if all(f.is_dir() for f in folders):
                return [f.resolve() for f in folders], str(replayed.get("names") or "")
            return None
        above = (meta.get("parent") or {}).get("path")
        if above and Path(above).is_file() and Path(above).resolve() != weights.resolve():
            return parent_training_data(above, _depth + 1) if _depth < 16 else None
        return None
    training = meta.get("training") or {}
    recorded = training.get("data") or []
    if not recorded:
        return None
    folders = []
    for entry in recorded:
        path = Path(entry)
        bases = [Path.cwd(), *weights.resolve().parents[:4]]
        candidates = [path] if path.is_absolute() else [base / path for base in bases]
        hit = next((c for c in candidates if c.is_dir()), None)
        if hit is None:
            return None
        folders.append(hit.resolve())
    return folders, str(training.get("train_wells") or "")


def _version(path: Path) -> ModelVersion:
    meta = read_metadata(path)
    data = meta.get("data") or {}
    return ModelVersion(
        name=str(meta.get("name") or path.parent.name),
        path=path,
        parent=str((meta.get("parent") or {}).get("path", "")),
        created=str(meta.get("created", "")),
        metrics=dict(meta.get("metrics") or {}),
        images=list(data.get("train", [])) + list(data.get("val", [])),
    )


def list_model_versions(folder: str | Path) -> list[ModelVersion]:
    """Model versions kept beside some data, newest first.

    Parameters
    ----------
    folder : path
        A data folder (its ``models/`` is searched) or a ``models`` folder itself.

    Returns
    -------
    list of ModelVersion
        Unreadable entries are skipped.
    """
    folder = Path(folder)
    root = folder if folder.name == MODELS_DIRNAME else folder / MODELS_DIRNAME
    if not root.is_dir():
        return []
    found = []
    for weights in root.glob(f"*/{WEIGHTS_NAME}"):
        try:
            found.append(_version(weights))
        except (OSError, ValueError, KeyError):
            continue
    return sorted(found, key=lambda v: (v.created, v.name), reverse=True)


def remove_model_version(version: ModelVersion) -> None:
    """Delete a version's folder (weights, config, log)."""
    folder = version.path.parent
    if folder.parent.name != MODELS_DIRNAME:
        raise ValueError(f"{folder} is not a model version folder")
    shutil.rmtree(folder)
