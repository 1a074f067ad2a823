"""Command-line interface: ``napari-instseg <command> ...``.

Each command lives in its own module of this package with two functions,
``configure(parser)`` (adds its arguments) and ``run(args) -> int`` (does the work).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("napari_instseg.cli.train", "train a model from a TOML config or flags"),
    "finetune": (
        "napari_instseg.cli.finetune",
        "fine-tune a model on corrected labels (training folders); list model versions",
    ),
    "predict": ("napari_instseg.cli.predict", "predict and segment images, write results"),
    "grow": ("napari_instseg.cli.grow", "grow masks from clicked seeds (a CSV of pixels)"),
    "evaluate": ("napari_instseg.cli.evaluate", "COCO AP and DSB accuracy against ground truth"),
    "bench": ("napari_instseg.cli.bench", "speed benchmarks (grow, similarity, predict, segment)"),
}


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every available command."""
    parser = argparse.ArgumentParser(
        prog="napari-instseg",
        description="Instance segmentation of worms and other long objects (napari-instseg).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:  # command not built yet
                continue
            raise
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (OSError, ValueError) as err:  # OSError: FileNotFoundError, FileExistsError, ...
        print(f"napari-instseg {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (train resumes from its
        # last epoch's checkpoint when run again)
        print(f"napari-instseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
