"""Fine-tuning benchmark (issue 6): does correcting five images make the model better?

Stands in for a user: a base model trained on wells A01-A12 only
(``napari-instseg train --config configs/bbbc010_a01_a12.toml``) segments five images of
B01-B12; the ground truth plays the user's corrections, exported as a training folder
(all instances reviewed); ``napari_instseg.finetune`` fine-tunes the base on them (one of
the five held out for validation automatically); both models are measured on the
validation wells B13-C02. Usage::

    python benchmarks/finetune_bbbc010.py --base runs/bbbc010_a01_a12/best.safetensors \\
        --variants "none:200,encoder:200" --out docs/benchmarks.md

Each variant is ``FREEZE:STEPS[:replay|:control]`` (freeze ``none``, ``encoder`` or
``backbone``; ``replay``: half the crops from the base's own training images A01-A12;
``control``: all of them, the corrections only choose the checkpoint). Every model is
measured with the same boundary pipeline (:data:`PIPELINE`) at its own and at the best
boundary threshold. Results are printed and, with ``--out``, written between the
``bench:finetune`` markers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from napari_instseg.core.device import cpu_name  # noqa: E402
from napari_instseg.core.evaluate import evaluate, parse_wells  # noqa: E402
from napari_instseg.core.finetune import finetune  # noqa: E402
from napari_instseg.core.instances import segment  # noqa: E402
from napari_instseg.core.io import read_bbbc010  # noqa: E402
from napari_instseg.core.predict import predict  # noqa: E402
from napari_instseg.core.train import VALIDATION_BOUNDARY_THRESHOLDS  # noqa: E402
from napari_instseg.core.training_folder import write_training_folder  # noqa: E402
from napari_instseg.core.weights import load_model, read_metadata  # noqa: E402

START, END = "<!-- bench:finetune:start -->", "<!-- bench:finetune:end -->"
#: variant suffixes: ``replay`` mixes the base's own training images into half the crops;
#: ``control`` trains on them only (same steps, corrections unused except for validation),
#: which tells the gain from the corrections apart from the gain of more steps
REPLAY_FRACTIONS = {"replay": 0.5, "control": 1.0}


#: the rest of the boundary pipeline, the same for every model compared: the shipped
#: model's tuned values (min_size and the split of merged segments included)
PIPELINE = {
    "marker_threshold": 1.0,
    "dilate_iterations": 0,
    "fg_threshold": 0.3,
    "min_size": 500,
    "split_factor": 1.3,
    "split_tau": 0.2,
}


def measure(weights: Path, samples) -> dict:
    """AP of the boundary pipeline: at the model's own threshold and the best of the grid."""
    model = load_model(weights)
    meta = read_metadata(weights)
    own = (meta.get("segment_params") or {}).get("boundary", {}).get("boundary_threshold", 0.92)
    preds = [predict(s.image, model, "cpu") for s in samples]
    gts = [s.masks for s in samples]
    out = {"own_threshold": own}

    def run(threshold: float) -> dict:
        params = {**PIPELINE, "boundary_threshold": threshold}
        return evaluate([segment(p, "boundary", **params) for p in preds], gts)

    out["own"] = run(own)
    best = None
    for t in VALIDATION_BOUNDARY_THRESHOLDS:
        r = run(t)
        if best is None or r["AP"] > best[1]["AP"]:
            best = (t, r)
    out["grid_threshold"], out["grid"] = best
    return out


def row(name: str, r: dict, key: str, extra: str = "") -> str:
    m = r[key]
    t = r["own_threshold"] if key == "own" else r["grid_threshold"]
    return (
        f"| {name} | {t:.2f} | {m['AP']:.3f} | {m['AP50']:.3f} | {m['AP75']:.3f} | "
        f"{m['avS']:.3f} | {m['S']['0.5']:.3f} | {extra} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, type=Path, help="base weights (A01-A12)")
    parser.add_argument("--data", default="../shared/data/bbbc010")
    parser.add_argument("--corrected", default="B01,B03,B05,B08,B11", help="the 5 'user' images")
    parser.add_argument("--val", default="B13-C02", help="wells measured before and after")
    parser.add_argument("--variants", default="none:200", help="FREEZE:STEPS,...")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="markdown file to update")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    corrected = [w for w in args.corrected.split(",") if w]
    val = read_bbbc010(args.data, parse_wells(args.val), with_w1=False)
    results = {"base": measure(args.base, val)}
    print("base", json.dumps({k: results["base"][k]["AP"] for k in ("own", "grid")}))
    user = read_bbbc010(args.data, corrected, with_w1=False)
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_training_folder(Path(tmp) / "corrected", user, model=str(args.base))
        for variant in args.variants.split(","):
            freeze, steps, *rest = variant.split(":")
            replay = rest[0] if rest else ""
            t0 = time.perf_counter()
            version = finetune(
                [folder],
                args.base,
                steps=int(steps),
                freeze="" if freeze == "none" else freeze,
                num_threads=args.threads,
                device="cpu",
                name=f"ft-{variant.replace(':', '-')}",
                replay="parent" if replay else None,
                replay_fraction=REPLAY_FRACTIONS.get(replay, 0.5),
            )
            timings[variant] = time.perf_counter() - t0
            results[variant] = measure(version.path, val)
            results[variant]["held_out"] = read_metadata(version.path)["data"]["val"]
            print(variant, f"{timings[variant]:.0f} s", results[variant]["own"]["AP"])
    base_meta = read_metadata(args.base)
    lines = [
        START,
        "",
        f"- Machine: {cpu_name()}, torch threads {args.threads}, CPU",
        "- Command: `python benchmarks/finetune_bbbc010.py --base "
        f"{args.base} --variants {args.variants}" + (f" --out {args.out}`" if args.out else "`"),
        f"- Base model: {base_meta.get('name')} trained on "
        f"{base_meta.get('training', {}).get('train_wells')} "
        f"({base_meta.get('training', {}).get('training_time_s')} s).",
        f"- 'User' corrections: ground truth of {', '.join(corrected)} exported as a training "
        "folder (all reviewed); fine-tuning holds one of them out for validation "
        "(checkpoint and boundary threshold chosen on it).",
        f"- Measured on {args.val} ({len(val)} images), boundary pipeline: at the model's own "
        "threshold, and at the best threshold of the validation grid "
        f"{list(VALIDATION_BOUNDARY_THRESHOLDS)}; the rest of the pipeline is the same "
        f"for every model: {PIPELINE}.",
        "",
        "| model | threshold | AP | AP50 | AP75 | avS | S0.5 | fine-tune wall time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        row("base (own threshold)", results["base"], "own"),
        row("base (best of grid)", results["base"], "grid"),
    ]
    for variant, seconds in timings.items():
        freeze, steps, *rest = variant.split(":")
        label = f"fine-tuned, freeze {freeze}, {steps} steps"
        label += {"replay": ", replay 50 %", "control": ", control (A01-A12 only)"}.get(
            rest[0] if rest else "", ""
        )
        lines.append(row(label + " (own threshold)", results[variant], "own", f"{seconds:.0f} s"))
        lines.append(row(label + " (best of grid)", results[variant], "grid"))
    lines += ["", END]
    text = "\n".join(lines)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "timings": timings}, default=str))
    if args.out:
        doc = args.out.read_text()
        if START in doc and END in doc:
            doc = doc[: doc.index(START)] + text + doc[doc.index(END) + len(END) :]
        else:
            doc = doc.rstrip() + "\n\n## Fine-tuning from corrected labels\n\n" + text + "\n"
        args.out.write_text(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
