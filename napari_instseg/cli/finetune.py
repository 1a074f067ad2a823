"""``napari-instseg finetune``: fine-tune a model on corrected labels; list model versions.

Examples
--------
Fine-tune the shipped model on two exports from the plugin (a version appears in
``corrected_a/models/bbbc010-ft1``)::

    napari-instseg finetune corrected_a corrected_b

From another parent, freezing the encoder, 300 steps::

    napari-instseg finetune corrected_a --model my.safetensors --freeze encoder --steps 300

Mix the parent's own training images (when they are on this computer) into the crops::

    napari-instseg finetune corrected_a --replay parent

List the versions kept beside some data::

    napari-instseg finetune corrected_a --list

Ctrl-C stops fine-tuning; once the first weights were kept (after the first epoch of 20
steps) they become the version, as the widget's Stop button does, and the exit status is 130.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``finetune`` arguments.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The sub-command's parser.
    """
    parser.add_argument(
        "data", nargs="+", type=Path, metavar="DIR", help="training folders (plugin exports)"
    )
    parser.add_argument("--model", help="parent weights (default: the shipped model)")
    parser.add_argument(
        "--steps",
        type=int,
        default=200,
        help="optimiser steps (default 200), in epochs of 20; a last epoch may be shorter",
    )
    parser.add_argument(
        "--freeze",
        default="",
        choices=["", "encoder", "backbone"],
        help='keep part of the network fixed ("" = train everything)',
    )
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    parser.add_argument(
        "--val", help="comma-separated validation image names (default: hold out 20%%)"
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.2, help="fraction held out for validation"
    )
    parser.add_argument(
        "--name", help="version name, a plain folder name (default <parent>-ft<N>)"
    )
    parser.add_argument("--out", type=Path, help="version folder (default DATA/models/NAME)")
    parser.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--time-limit", type=float, default=0.0, help="stop after N minutes")
    parser.add_argument(
        "--replay",
        nargs="+",
        metavar="DIR",
        help='earlier training folders mixed into the crops, or "parent": the parent\'s own '
        "training images (found from its metadata)",
    )
    parser.add_argument(
        "--no-replay",
        action="store_true",
        help="train on the given folders only (default: replay the parent's training "
        "images when they are on this computer)",
    )
    parser.add_argument(
        "--replay-names", default="", help="image names / well ranges of --replay DIRs"
    )
    parser.add_argument(
        "--replay-fraction", type=float, default=0.5, help="share of crops from --replay (0.5)"
    )
    parser.add_argument("--list", action="store_true", help="only list the model versions")


def run(args: argparse.Namespace) -> int:
    """Fine-tune (or list versions); prints the new version.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments of :func:`configure`.

    Returns
    -------
    int
        0 on success, 130 when interrupted (Ctrl-C).
    """
    from ..core.finetune import FinetuneInterrupted, finetune, list_model_versions

    if args.list:
        for folder in args.data:
            versions = list_model_versions(folder)
            if not versions:
                print(f"{folder}: no model versions")
            for version in versions:
                print(f"{version.label}\t{version.created}\t{version.path}")
        return 0

    def report(row: dict) -> None:
        val = f", val AP {row['val_ap']:.3f}" if "val_ap" in row else ""
        print(f"epoch {row['epoch']}: loss {row['loss_total']:.3f}{val}", flush=True)

    try:
        version = finetune(
            args.data,
            args.model,
            steps=args.steps,
            freeze=args.freeze,
            lr=args.lr,
            val_names=[v for v in args.val.split(",") if v] if args.val else None,
            val_fraction=args.val_fraction,
            seed=args.seed,
            name=args.name,
            out=args.out,
            device=args.device,
            num_threads=args.threads,
            time_limit_minutes=args.time_limit,
            progress=True,
            callback=report,
            replay=None
            if args.no_replay
            else "parent"
            if args.replay == ["parent"]
            else (args.replay or "auto"),
            replay_names=args.replay_names,
            replay_fraction=args.replay_fraction,
        )
    except FinetuneInterrupted as stop:
        print(f"interrupted: kept model version {stop.version.label}: {stop.version.path}")
        return 130
    except KeyboardInterrupt:
        print("interrupted before the first weights were kept: no model version")
        return 130
    print(f"model version {version.label}: {version.path}")
    print(replay_summary(version.path, args.no_replay))
    return 0


def replay_summary(weights: Path, no_replay: bool) -> str:
    """One line on what a fine-tuned version replayed, read from its metadata.

    The default replay is silent where it finds nothing, so the command line says which.

    Parameters
    ----------
    weights : Path
        The version's ``model.safetensors`` (its ``model.json`` beside it).
    no_replay : bool
        Whether ``--no-replay`` was given.

    Returns
    -------
    str
        ``replay: <folders> (<names>), <fraction> of the crops``, or why there was none.
    """
    from ..core.weights import read_metadata

    tuned = read_metadata(weights).get("finetune") or {}
    replay = tuned.get("replay")
    if tuned.get("replay_skipped"):
        return f"replay: none ({tuned['replay_skipped']}; --replay parent replays them anyway)"
    if replay:
        names = replay.get("names") or "all images"
        return (
            f"replay: {', '.join(map(str, replay['folders']))} ({names}), "
            f"{replay['fraction']:.0%} of the crops"
        )
    if no_replay:
        return "replay: none (--no-replay)"
    return (
        "replay: none (the parent's training images were not found on this computer; "
        "--replay DIR names earlier training folders)"
    )
