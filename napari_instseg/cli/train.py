"""``napari-instseg train``: train or fine-tune a model from a TOML config and/or flags.

Examples
--------
Train the shipped BBBC010 model (checkpoints and ``log.csv`` in ``runs/bbbc010``)::

    napari-instseg train --config configs/bbbc010.toml

Fine-tune it on a corrected training folder for a few epochs::

    napari-instseg train --init napari_instseg/weights/bbbc010.safetensors
        --data my_training_folder --train-wells "" --val-wells "" --epochs 5 --out runs/mine

(one line; ``--train-wells ""`` takes every image of the folder, ``--val-wells ""`` none).
When no ``--data`` folder is in BBBC010's layout and neither the flags nor the TOML name
wells, these two are the defaults: the BBBC010 well ranges would name no image.

Flags override the TOML; without ``--config`` the defaults of
:class:`~napari_instseg.core.train.TrainConfig` apply. A run resumes from its
``last.ckpt.safetensors`` unless ``--no-resume`` is given.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

# flag destination -> TrainConfig field
_OVERRIDES = {
    "out": "out",
    "epochs": "epochs",
    "device": "device",
    "init": "init",
    "data": "data",
    "train_wells": "train_wells",
    "val_wells": "val_wells",
    "steps_per_epoch": "steps_per_epoch",
    "batch_size": "batch_size",
    "crop_size": "crop_size",
    "lr": "lr",
    "seed": "seed",
    "time_limit": "time_limit_minutes",
    "threads": "num_threads",
}


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` arguments.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The sub-command's parser.
    """
    parser.add_argument("--config", type=Path, help="TOML file of TrainConfig fields")
    parser.add_argument("--out", help="run folder (checkpoints, log.csv, best weights)")
    parser.add_argument("--epochs", type=int, help="number of epochs")
    parser.add_argument("--device", help="auto, cuda (cuda:1: a given GPU), mps or cpu")
    parser.add_argument(
        "--no-amp",
        action="store_true",
        help="train in float32 on CUDA (default: bfloat16 mixed precision where the GPU has it)",
    )
    parser.add_argument(
        "--no-resume", action="store_true", help="start afresh even if the run has a checkpoint"
    )
    parser.add_argument("--init", help="weights to start from (fine-tuning)")
    parser.add_argument(
        "--data", nargs="+", metavar="DIR", help="BBBC010-style folders or training folders"
    )
    parser.add_argument(
        "--train-wells",
        help='wells / image names for training, e.g. "A01-B12" ("" = all; the default for '
        "--data folders not in BBBC010's layout)",
    )
    parser.add_argument(
        "--val-wells",
        help='wells / image names for validation, e.g. "B13-C02" ("" = none; the default '
        "for --data folders not in BBBC010's layout)",
    )
    parser.add_argument("--steps-per-epoch", type=int, help="batches per epoch")
    parser.add_argument("--batch-size", type=int, help="crops per batch")
    parser.add_argument("--crop-size", type=int, help="crop side in pixels")
    parser.add_argument("--lr", type=float, help="learning rate")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--time-limit", type=float, help="stop after this many minutes")
    parser.add_argument("--threads", type=int, help="torch CPU threads (0 = default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_config(args: argparse.Namespace):
    """Merge the TOML (or the defaults) with the flags given.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments of :func:`configure`.

    Returns
    -------
    TrainConfig
        The run's configuration.
    """
    from ..core.train import TrainConfig, default_wells

    if args.config is not None:
        if not args.config.is_file():
            raise FileNotFoundError(f"config file {args.config} does not exist")
        config = TrainConfig.from_toml(args.config)
    else:
        config = TrainConfig()
    changes = {
        field: getattr(args, dest)
        for dest, field in _OVERRIDES.items()
        if getattr(args, dest, None) is not None
    }
    if getattr(args, "no_amp", False):
        changes["amp"] = False
    for name in ("epochs", "steps_per_epoch", "batch_size", "crop_size"):
        if name in changes and changes[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    # the default wells are BBBC010's: for training folders they would name no image
    return default_wells(replace(config, **changes))


def run(args: argparse.Namespace) -> int:
    """Train; prints where the best weights went.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments of :func:`configure`.

    Returns
    -------
    int
        0 on success.
    """
    from ..core.device import get_device
    from ..core.train import checkpoint_epoch, hardware_description, train

    config = build_config(args)
    for folder in config.data:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"data folder {folder} does not exist{_relative_hint(folder)}")
    if config.init and not Path(config.init).exists():
        raise FileNotFoundError(f"--init weights {config.init} do not exist")
    if config.num_threads:  # (train sets it too) so that the line below tells the threads used
        import torch

        torch.set_num_threads(config.num_threads)
    # the device resolved here, so that "auto" falling back to the CPU is seen at once
    where = hardware_description(get_device(config.device))
    print(f"training into {config.out} (epochs {config.epochs}, device {config.device}: {where})")
    done = None if args.no_resume else checkpoint_epoch(config.out)
    if done is not None and done >= config.epochs:
        print(
            f"the run in {config.out} has finished its {done} epochs already: nothing to train "
            "(raise --epochs to go on, or --no-resume to start afresh)"
        )
    elif done is not None:
        print(f"resuming after epoch {done} from its checkpoint (--no-resume starts afresh)")
    best = train(config, resume=not args.no_resume, progress=not args.no_progress)
    print(f"best weights: {best}")
    print(tuning_hint(best, config))
    return 0


def tuning_hint(best: str | Path, config: object) -> str:
    """What to run next: a trained model segments with its own parameters once tuned.

    Parameters
    ----------
    best : str or Path
        The run's best weights.
    config : TrainConfig
        The run's configuration (its data folders and validation wells).

    Returns
    -------
    str
        The line to print: the ``napari-instseg evaluate ... --tune --write`` command on the
        run's validation images, or, without any, on labelled images of the user's.
    """
    val_wells = str(getattr(config, "val_wells", "") or "")
    data = list(getattr(config, "data", []) or [])
    if val_wells and data:
        where = f"--gt {data[0]} --wells {val_wells}"
        images = "its validation images"
    else:
        where = "--gt LABELLED_FOLDER"
        images = "labelled images it did not train on"
    return (
        "before using it for automatic segmentation, choose its parameters on "
        f"{images}: napari-instseg evaluate --model {best} {where} --tta 8 --tune --write"
    )


def _relative_hint(folder: str | Path) -> str:
    """Where a relative ``data`` path of a config was looked for (empty for absolute ones).

    Parameters
    ----------
    folder : str or Path
        A ``data`` entry of the run's configuration.

    Returns
    -------
    str
        `` (relative paths are read from the current folder, <cwd>: ...)``, or ``""``.
    """
    if Path(folder).is_absolute():
        return ""
    return (
        f" (relative paths are read from the current folder, {Path.cwd()}: run from the "
        "folder the config was written for, or give --data)"
    )
