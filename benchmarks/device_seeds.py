"""Train several variants of a config at once on one lent GPU, in a fixed time.

A training step of the shipped recipe on one H200 is bound by kernel launches and Python
(66 ms, of which the network's forward and backward passes are 17 ms: session 32), so
one process leaves the GPU mostly idle. This script runs several trainings side by side
(each its own process, its own CPU threads) and fits them into the few minutes of
device time a task gets:

1. *probe*: every run trains a few short epochs at once (classification loss on, no
   validation), and the slowest run's seconds per step, with all of them sharing the
   GPU, is read from the logs;
2. *train*: as many runs as can each do at least ``--min-fraction`` of the configured
   steps in the time left (:func:`step_seconds`: linear between one run alone and the
   probe's) are started together (the first ones in ``--runs`` first),
   each with ``max_steps`` set to what fits: the cosine schedule is then compressed,
   not cut. Each run also has the trainer's own time limit as a safety (it stops
   cleanly: validated, best weights saved);
3. each run's ``best.safetensors`` (its metadata inside) is copied to ``--out`` as
   ``<name>_best.safetensors``; ``device_seeds.json`` says what ran, its steps and times
   (rewritten after each phase, so a run cut short keeps what it measured); the runs'
   logs, ``best.json`` and output go into ``device_seeds_logs.tar.gz``. At most six runs
   then make the eight files the device tool brings back.

A run is ``name:field=value,field=value`` (TrainConfig fields, ``channels`` and other
:class:`ModelConfig` fields go to the model; values in TOML/JSON syntax), e.g.::

    python benchmarks/device_seeds.py --data .device/data/bbbc010 --out $OUT \\
        --runs "v10_s1:seed=1" "wide_s0:channels=[32,64,96,192,192]"

When a call ends before its runs do (its limit, the trainer's time limit) and the machine
is still warm (the device tool keeps it 30 s after a call), ``--resume`` in the next call
finishes every run folder left in ``--work`` from its checkpoint and brings the weights
back the same way (session 33: two runs stopped at epoch 93-94 of 109 finished in 107 s).

A dry run on a CPU (seconds): ``--device cpu --steps-per-epoch 2 --epochs 3 --budget-s 120``.
The weights come back without segmentation parameters: tune each before scoring it
(``napari-instseg evaluate --model M --gt ../shared/data/bbbc010 --wells ... --tune``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: trains a config with some fields replaced (JSON in argv[2]; "model" merges)
TRAIN = """
import dataclasses, json, sys
from napari_instseg.core.train import TrainConfig, train
config = TrainConfig.from_toml(sys.argv[1])
fields = json.loads(sys.argv[2])
model = {**config.model, **fields.pop("model", {})}
config = dataclasses.replace(config, model=model, **fields)
train(config, resume=False, progress=False)
"""

#: resumes a run folder's training (argv: its config.toml, time limit in minutes, threads)
RESUME = """
import sys
from napari_instseg.core.train import TrainConfig, train
config = TrainConfig.from_toml(sys.argv[1])
config.time_limit_minutes = float(sys.argv[2])
config.num_threads = int(sys.argv[3])
train(config, resume=True, progress=False)
"""

#: the most runs: their weights, the report and the logs' archive are the 8 files the
#: device tool brings back (each model at most 16 MiB; 64 MiB together)
MAX_RUNS = 6

#: ModelConfig fields a run may set (everything else is a TrainConfig field)
MODEL_FIELDS = {
    "channels",
    "embedding_dim",
    "semi_conv",
    "coord_scale",
    "head_channels",
    "input_norm",
    "flatfield_sigma",
}

#: the runs when --runs is not given, the first ones first (one 10-minute call on an H200
#: trains two in full, session 33): the deeper U-Net (a sixth level, twice the receptive
#: field, for long worms) and a new seed of the shipped recipe (seeds 0-3 were drawn on
#: the CPU, 0 and 1 on a GPU too). Session 33 trained
#: "v10_s1" (AP 0.716 tuned) and "wide_s0" (channels 32-192: 0.682)
DEFAULT_RUNS = (
    "deep_s0:channels=[24,48,64,128,128,256]",
    "v10_s4:seed=4",
    "deep_s1:channels=[24,48,64,128,128,256],seed=1",
    "v10_s5:seed=5",
)


def parse_run(text: str) -> tuple[str, dict[str, Any]]:
    """``name:field=value,...`` -> (name, TrainConfig fields with ``model`` nested).

    Values are read as JSON (``1``, ``0.5``, ``[32,64]``, ``true``), else kept as text.
    Commas inside brackets belong to the value.
    """
    name, _, rest = text.partition(":")
    if not name:
        raise ValueError(f"run {text!r} has no name")
    parts, depth, current = [], 0, ""
    for char in rest:
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current:
        parts.append(current)
    fields: dict[str, Any] = {}
    model: dict[str, Any] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"run {text!r}: {part!r} is not field=value")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        (model if key in MODEL_FIELDS else fields)[key] = parsed
    if model:
        fields["model"] = model
    return name, fields


def read_log(path: Path) -> list[dict[str, str]]:
    """The rows of a run's ``log.csv`` (none when it is not there yet)."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def launch(config: str, fields: dict[str, Any], log: Path, threads: int) -> subprocess.Popen:
    """Start one training in a child process, its output going to ``log``."""
    fields = {**fields, "num_threads": threads}
    return _child([TRAIN, config, json.dumps(fields)], log, threads)


def launch_resume(run: Path, limit_min: float, log: Path, threads: int) -> subprocess.Popen:
    """Resume the training of run folder ``run`` in a child process (``--resume``)."""
    args = [RESUME, str(run / "config.toml"), f"{limit_min:.2f}", str(threads)]
    return _child(args, log, threads)


def _child(args: list[str], log: Path, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as handle:  # the child writes to its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-c", *args],
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )


def wait_all(procs: dict[str, subprocess.Popen], deadline: float) -> dict[str, int | None]:
    """Wait for every process until ``deadline`` (then kill the rest); their exit codes."""
    codes: dict[str, int | None] = {}
    for name, proc in procs.items():
        try:
            codes[name] = proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes[name] = None
    return codes


def seconds_per_step(rows: list[dict[str, str]], steps_per_epoch: int) -> float | None:
    """A probe's seconds per step: its last epoch's time (the first ones warm up)."""
    if len(rows) < 2:
        return None
    a, b = rows[-2], rows[-1]
    return (float(b["elapsed_s"]) - float(a["elapsed_s"])) / steps_per_epoch


def step_seconds(k: int, n: int, probe_step_s: float, single_step_s: float) -> float:
    """Seconds per step of each of ``k`` runs sharing the GPU, from a probe of ``n``.

    Linear between one run alone (``single_step_s``) and the ``n`` runs of the probe:
    each run added costs the others the same. On one H200 (session 33, the shipped
    recipe) one run took 0.066 s a step, two 0.10 and six 0.20-0.25: linear within 0.002 s.
    """
    if k >= n:
        return max(probe_step_s, single_step_s)
    return single_step_s + (probe_step_s - single_step_s) * (k - 1) / (n - 1)


def plan_runs(
    names: list[str],
    probe_step_s: float,
    single_step_s: float,
    seconds_left: float,
    configured_steps: int,
    min_fraction: float,
) -> tuple[list[str], int]:
    """How many runs to start together, and each one's steps.

    The most runs (the first of ``names``) whose steps, at :func:`step_seconds`, reach
    ``min_fraction`` of the configured ones in ``seconds_left`` are taken (at least one),
    each with the steps that fit, at most the configured ones.
    """
    n = len(names)
    for k in range(n, 0, -1):
        steps = int(seconds_left / step_seconds(k, n, probe_step_s, single_step_s))
        if steps >= min_fraction * configured_steps or k == 1:
            return names[:k], max(1, min(configured_steps, steps))
    raise AssertionError("unreachable")


def collect(
    chosen: list[str],
    codes: dict[str, int | None],
    work: Path,
    out: Path,
    t_train: float,
) -> dict[str, Any]:
    """Copy each run's best weights to ``out``; what each run did."""
    results: dict[str, Any] = {}
    for name in chosen:
        rows = read_log(work / name / "log.csv")
        last = rows[-1] if rows else {}
        kept = []
        if (work / name / "best.safetensors").is_file():  # (its metadata is inside)
            shutil.copy2(work / name / "best.safetensors", out / f"{name}_best.safetensors")
            kept.append(f"{name}_best.safetensors")
        vals = [float(r["val_ap"]) for r in rows if r.get("val_ap")]
        results[name] = {
            "exit_code": codes[name],
            "epochs_done": int(last["epoch"]) if last else 0,
            "training_s": float(last["elapsed_s"]) if last else None,
            "best_val_ap": max(vals) if vals else None,
            "kept": kept,
        }
    return {"wall_s": round(time.time() - t_train, 1), "results": results}


def archive_logs(chosen: list[str], probed: list[str], work: Path, out: Path) -> None:
    """The runs' logs, metadata and output in one archive (the tool returns 8 files)."""
    with tarfile.open(out / "device_seeds_logs.tar.gz", "w:gz") as tar:
        for name in chosen:
            for file in ("best.json", "log.csv"):
                if (work / name / file).is_file():
                    tar.add(work / name / file, arcname=f"{name}_{file}")
            train_out = out / f"{name}_train.out"
            if train_out.is_file():
                tar.add(train_out, arcname=train_out.name)
                train_out.unlink()
        for name in probed:
            if (work / f"probe_{name}.out").is_file():
                tar.add(work / f"probe_{name}.out", arcname=f"probe_{name}.out")


def resume_runs(args: argparse.Namespace, out: Path, work: Path, deadline: float) -> int:
    """``--resume``: finish the run folders an earlier call left in ``--work``.

    On a machine still warm from a call whose runs were stopped before their end (killed
    at the call's limit, or by the trainer's time limit), each run folder with a
    checkpoint is resumed from it, all side by side, to its configured steps; the
    trainer's limit (on the run's whole training time) leaves time for the validation.
    """
    t_train = time.time()
    names = [p.name for p in sorted(work.iterdir()) if (p / "last.ckpt.safetensors").is_file()]
    names = [n for n in names if not n.startswith("probe_")]
    report: dict[str, Any] = {"resumed": names, "device": args.device}
    if not names:
        print(f"nothing to resume in {work}", flush=True)
        (out / "device_seeds.json").write_text(json.dumps(report, indent=1))
        return 1
    procs = {}
    for name in names:
        rows = read_log(work / name / "log.csv")
        done_s = float(rows[-1]["elapsed_s"]) if rows else 0.0
        left = deadline - time.time() - args.reserve_s
        limit_min = max(0.5, (done_s + left) / 60)
        procs[name] = launch_resume(
            work / name, limit_min, out / f"{name}_train.out", args.threads
        )
    codes = wait_all(procs, deadline)
    report["train"] = collect(names, codes, work, out, t_train)
    (out / "device_seeds.json").write_text(json.dumps(report, indent=1))
    archive_logs(names, [], work, out)
    print(json.dumps(report["train"], indent=1), flush=True)
    return 0 if all(code == 0 for code in codes.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=".device/data/bbbc010", help="BBBC010 folder")
    parser.add_argument("--config", default=str(REPO / "configs/bbbc010_v10_contact.toml"))
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="name:f=v,...")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", required=True, help="weights, logs and device_seeds.json")
    parser.add_argument("--work", default="/tmp/device_seeds", help="run folders")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per run")
    parser.add_argument("--budget-s", type=float, default=550.0, help="for everything")
    parser.add_argument("--probe-epochs", type=int, default=3)
    parser.add_argument("--probe-steps", type=int, default=20, help="steps per probe epoch")
    parser.add_argument("--single-step-s", type=float, default=0.066, help="one run alone")
    parser.add_argument("--min-fraction", type=float, default=0.8)
    parser.add_argument(
        "--reserve-s", type=float, default=90.0, help="for the final validation and copies"
    )
    parser.add_argument("--epochs", type=int, default=None, help="dry runs: fewer epochs")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="dry runs")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="finish the runs an earlier call left in --work (a machine still warm)",
    )
    args = parser.parse_args(argv)
    start = time.time()
    deadline = start + args.budget_s
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    if args.resume:
        if not work.is_dir():
            parser.error(f"--resume: no run folders at {work}")
        return resume_runs(args, out, work, deadline)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    runs = dict(parse_run(text) for text in args.runs)
    if len(runs) > MAX_RUNS:
        parser.error(f"at most {MAX_RUNS} runs (the device tool brings back 8 files)")
    base: dict[str, Any] = {"data": [args.data], "device": args.device}
    if args.epochs:
        base["epochs"] = args.epochs
    if args.steps_per_epoch:
        base["steps_per_epoch"] = args.steps_per_epoch
    import tomllib

    config = tomllib.loads(Path(args.config).read_text())
    epochs = base.get("epochs", config.get("epochs", 60))
    steps_per_epoch = base.get("steps_per_epoch", config.get("steps_per_epoch", 50))
    configured_steps = int(epochs) * int(steps_per_epoch)
    report: dict[str, Any] = {"config": args.config, "runs": args.runs, "device": args.device}

    def save() -> None:
        (out / "device_seeds.json").write_text(json.dumps(report, indent=1))

    # 1. probe: all runs at once, short epochs with the classification loss on
    procs = {}
    for name, fields in runs.items():
        probe = {
            **fields,
            **base,
            "out": str(work / f"probe_{name}"),
            "epochs": args.probe_epochs,
            "steps_per_epoch": args.probe_steps,
            "max_steps": 0,
            "val_wells": "",
            "lambda_start": -1.0,
            "lambda_end": 0.0,
            "time_limit_minutes": 0.0,
        }
        procs[name] = launch(args.config, probe, work / f"probe_{name}.out", args.threads)
    codes = wait_all(procs, start + args.budget_s / 3)
    probe_s = time.time() - start
    rates = {
        name: seconds_per_step(read_log(work / f"probe_{name}" / "log.csv"), args.probe_steps)
        for name in runs
    }
    report["probe"] = {"exit_codes": codes, "seconds_per_step": rates, "wall_s": probe_s}
    print(f"probe ({probe_s:.0f} s): {rates}", flush=True)
    ok = [name for name in runs if codes[name] == 0 and rates[name] is not None]
    for name in runs:
        if name not in ok:
            print((work / f"probe_{name}.out").read_text()[-3000:], flush=True)
    save()
    if not ok:
        return 1
    # start-up (imports, data reading) of a run: the probe's wall time less its epochs
    loads = []
    for name in ok:
        rows = read_log(work / f"probe_{name}" / "log.csv")
        loads.append(probe_s - float(rows[-1]["elapsed_s"]))
    startup_s = max(loads)
    seconds_left = deadline - time.time() - startup_s - args.reserve_s
    probe_step_s = max(rates[name] for name in ok)
    chosen, steps = plan_runs(
        ok, probe_step_s, args.single_step_s, seconds_left, configured_steps, args.min_fraction
    )
    report["plan"] = {
        "runs": chosen,
        "max_steps": steps,
        "configured_steps": configured_steps,
        "startup_s": round(startup_s, 1),
        "seconds_left_for_steps": round(seconds_left, 1),
    }
    print(f"plan: {report['plan']}", flush=True)
    save()

    # 2. train the chosen runs together, each to its max_steps (time limit as a safety)
    t_train = time.time()
    # the trainer's own limit, should the plan be off: it then stops cleanly (validated,
    # best weights saved) with two thirds of the reserve left for that validation
    limit_min = max(0.5, (seconds_left + args.reserve_s / 3) / 60)
    procs = {}
    for name in chosen:
        fields = {
            **runs[name],
            **base,
            "out": str(work / name),
            "max_steps": steps,
            "time_limit_minutes": round(limit_min, 2),
        }
        procs[name] = launch(args.config, fields, out / f"{name}_train.out", args.threads)
    codes = wait_all(procs, deadline)
    report["train"] = collect(chosen, codes, work, out, t_train)
    report["total_s"] = round(time.time() - start, 1)
    save()
    archive_logs(chosen, list(runs), work, out)
    print(json.dumps(report["train"], indent=1), flush=True)
    return 0 if all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
