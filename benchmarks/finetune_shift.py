"""Fine-tuning where the shipped model is off: images unlike its training images.

A user's microscope is not BBBC010's. This benchmark stands in for that user: BBBC010
images are changed the same way everywhere (``SHIFTS``: inverted contrast, as in dark-field;
blur and noise, as out of focus; a gamma curve), the shipped model segments them as it is
(``segment(method="auto")``, what the plugin's Segment all gives), the ground truth of a
few changed training images plays the user's corrections (exported as a training folder,
all reviewed), ``napari_instseg.finetune`` fine-tunes the shipped model on them as the
plugin's Fine-tune widget does, and the fine-tuned model segments the changed held-out
images again. Usage::

    python benchmarks/finetune_shift.py --shifts invert,blur --variants 200:auto,200:none

Each variant is ``STEPS:REPLAY`` (``auto``: half the crops from the parent's own training
images, the default of ``finetune``; ``none``: the corrections only; a number: that share
of the crops from the parent's images). Corrections come
from training wells of the shipped model (``--corrected``); the measured wells are the
shipped model's held-out ones (``--wells``), changed the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from napari_instseg.core.device import cpu_name  # noqa: E402
from napari_instseg.core.evaluate import evaluate, parse_wells  # noqa: E402
from napari_instseg.core.finetune import finetune  # noqa: E402
from napari_instseg.core.instances import segment  # noqa: E402
from napari_instseg.core.io import read_bbbc010  # noqa: E402
from napari_instseg.core.predict import predict  # noqa: E402
from napari_instseg.core.training_folder import write_training_folder  # noqa: E402
from napari_instseg.core.types import Sample  # noqa: E402
from napari_instseg.core.weights import load_model  # noqa: E402


def invert(image: np.ndarray, seed: int = 0) -> np.ndarray:
    """Dark worms on a bright well become bright worms on a dark one (the range kept)."""
    image = image.astype(np.float32)
    return image.max() + image.min() - image


def blur(image: np.ndarray, seed: int = 0) -> np.ndarray:
    """Out of focus: a Gaussian blur of 2 px, then noise of 5 % of the contrast."""
    out = ndimage.gaussian_filter(image.astype(np.float32), 2.0)
    noise = np.random.default_rng(seed).normal(0, 0.05 * out.std(), out.shape)
    return out + noise.astype(np.float32)


def gamma(image: np.ndarray, seed: int = 0) -> np.ndarray:
    """Another camera response: intensities through a gamma of 2.5 (the range kept)."""
    image = image.astype(np.float32)
    lo, hi = image.min(), image.max()
    return ((image - lo) / (hi - lo)) ** 2.5 * (hi - lo) + lo


def identity(image: np.ndarray, seed: int = 0) -> np.ndarray:
    """No change: corrections of images like the parent's own (the in-domain control)."""
    return image.astype(np.float32)


SHIFTS = {"invert": invert, "blur": blur, "gamma": gamma, "identity": identity}


def changed(samples: list[Sample], shift: str) -> list[Sample]:
    """The samples with their images changed by ``SHIFTS[shift]`` (seeded per image)."""
    return [
        Sample(image=SHIFTS[shift](s.image, seed=i), masks=s.masks, name=s.name)
        for i, s in enumerate(samples)
    ]


def measure(weights: Path | None, samples: list[Sample]) -> dict:
    """Accuracy of ``segment(method="auto")`` with these weights (None: the shipped)."""
    model = load_model(weights)
    found = [segment(predict(s.image, model, "cpu"), method="auto") for s in samples]
    result = evaluate(found, [s.masks for s in samples])
    return {k: result[k] for k in ("AP", "AP50", "AP75", "avS", "S", "n_pred", "n_gt")}


def row(label: str, r: dict, extra: str = "") -> str:
    return (
        f"| {label} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['AP75']:.3f} | {r['avS']:.3f} | "
        f"{r['S']['0.5']:.3f} | {r['n_pred']} | {extra} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/bbbc010")
    parser.add_argument("--shifts", default="invert,blur,gamma")
    parser.add_argument("--variants", default="200:auto", help="STEPS:REPLAY,...")
    parser.add_argument(
        "--corrected", default="A02,A07,A15,A20,B05", help="the 'user' images (training wells)"
    )
    parser.add_argument("--wells", default="A11-A12,B11-B12,C01-C02,B13-B24")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="the fine-tuning's random seed")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    held_out = read_bbbc010(args.data, parse_wells(args.wells), with_w1=False)
    user = read_bbbc010(args.data, args.corrected.split(","), with_w1=False)
    results: dict = {"unchanged": measure(None, held_out)}
    print(row("shipped, unchanged images", results["unchanged"]), flush=True)
    for shift in args.shifts.split(","):
        images = changed(held_out, shift)
        results[shift] = {"shipped": measure(None, images)}
        print(row(f"{shift}: shipped", results[shift]["shipped"]), flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_training_folder(Path(tmp) / "corrected", changed(user, shift))
            for variant in args.variants.split(","):
                steps, replay = variant.split(":")
                t0 = time.perf_counter()
                fraction = 0.5 if replay in ("auto", "none") else float(replay)
                version = finetune(
                    [folder],
                    None,
                    steps=int(steps),
                    device="cpu",
                    num_threads=args.threads,
                    name=f"ft-{shift}-{steps}-{replay}",
                    replay=None if replay == "none" else "auto",
                    replay_fraction=fraction,
                    seed=args.seed,
                )
                seconds = time.perf_counter() - t0
                r = measure(version.path, images)
                r["fine_tune_s"] = round(seconds, 1)
                results[shift][variant] = r
                label = f"{shift}: fine-tuned, {steps} steps, replay {replay}"
                print(row(label, r, f"{seconds:.0f} s"), flush=True)
    print(f"machine: {cpu_name()}, torch threads {args.threads}, seed {args.seed}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
