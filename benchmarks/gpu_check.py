"""One-off GPU check: versions, the GPU tests, training and prediction times, GPU memory.

Run once on a machine with an NVIDIA GPU (no internet needed), from the repository root::

    python benchmarks/gpu_check.py --data ../shared/data/bbbc010 --out gpu_check.json

It prints, and writes to ``--out`` as JSON:

1. torch, CUDA and cuDNN versions, the GPU, its compute capability and whether it has
   bfloat16 in hardware (then training and prediction use bfloat16 autocast);
2. ``pytest tests/test_cuda.py`` (train / resume / finetune / predict with tta on the GPU,
   CPU against GPU maps);
3. one training epoch of the shipped config (``configs/bbbc010_v10_contact.toml``) twice,
   under ``/usr/bin/time -v``: as configured (epoch 1: no classification loss yet) and with
   the classification loss on (epochs 6-110), and the full run's time estimated from them;
4. the full training run (``napari-instseg train --config ...``) under ``/usr/bin/time -v``
   (``--skip-full`` leaves it out; the target is 10 minutes on one H100 or H200);
5. prediction of one 520 x 696 image (well B13 when ``--data`` has it, else synthetic
   worms): one pass and tta 8, float32 and the default precision, median wall time and
   peak GPU memory (``torch.cuda.max_memory_allocated``), and the largest difference of
   the maps from the CPU's.

``--device cpu --epoch-steps 2 --skip-full --skip-tests`` dry-runs the script on a CPU.

On a lent GPU with a few minutes of device time (the workplace's ``device`` tool), run
``benchmarks/device_run.sh`` instead (made ready by ``benchmarks/device_bundle.py``): it
runs ``--order full,predict,tests`` with ``--full-time-limit`` and ``--stop-after``, so
the target is measured first, the JSON is rewritten after every step (a run cut short
keeps what it measured) and ``--keep`` brings the trained weights back.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: runs the package's command line in a child process (no console script needed)
CLI = "import sys; from napari_instseg.cli import main; sys.exit(main(sys.argv[1:]))"

#: trains one epoch of a config with some fields replaced (JSON in argv[2])
ONE_EPOCH = """
import dataclasses, json, sys
from napari_instseg.core.train import TrainConfig, train
config = TrainConfig.from_toml(sys.argv[1])
config = dataclasses.replace(config, **json.loads(sys.argv[2]))
train(config, resume=False, progress=False)
"""


#: what the script can run, in its default order
STEPS = ("tests", "epochs", "full", "predict")


def environment(device: str) -> dict[str, Any]:
    """Versions and the device, as a dict."""
    import torch

    from napari_instseg.core.device import cpu_name, cuda_has_native_bfloat16, get_device

    dev = get_device(device)
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(dev),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32_convolutions": torch.backends.cudnn.allow_tf32,
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            native_bfloat16=cuda_has_native_bfloat16(dev),
            gpus=torch.cuda.device_count(),
        )
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True)
            info["nvidia_smi"] = smi.stdout.strip().splitlines()[:4]
    return info


def timed(command: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a command under ``/usr/bin/time -v`` (when present); wall time, peak RSS, status."""
    wrapper = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    t0 = time.perf_counter()
    done = subprocess.run(
        wrapper + command, capture_output=True, text=True, env=env, cwd=REPO, check=False
    )
    result: dict[str, Any] = {
        "returncode": done.returncode,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    if rss:
        result["peak_rss_gib"] = round(int(rss.group(1)) / 2**20, 2)
    if done.returncode:
        result["stderr_tail"] = done.stderr.strip().splitlines()[-15:]
    result["stdout_tail"] = done.stdout.strip().splitlines()[-5:]
    return result


def run_log(out: Path) -> dict[str, Any]:
    """The last row of a run's log.csv and its weights' recorded hardware and time."""
    import csv

    found: dict[str, Any] = {}
    log = out / "log.csv"
    if log.is_file():
        with open(log, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if rows:
            found["log_last_row"] = {
                k: v
                for k, v in rows[-1].items()
                if k in ("epoch", "elapsed_s", "loss_total") or k.startswith("val_ap")
            }
    meta = out / "best.json"
    if meta.is_file():
        data = json.loads(meta.read_text())
        training = data.get("training", {})
        found["hardware"] = training.get("hardware")
        found["training_time_s"] = training.get("training_time_s")
        found["val_ap"] = data.get("metrics", {}).get("val_ap")
    return found


def train_epochs(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One epoch as configured and one with the classification loss; the full estimate."""
    import tomllib

    config = tomllib.loads(Path(args.config).read_text())
    base: dict[str, Any] = {"epochs": 1, "device": args.device, "data": [args.data]}
    if args.epoch_steps:
        base["steps_per_epoch"] = args.epoch_steps
    if args.threads is not None:
        base["num_threads"] = args.threads
    results: dict[str, Any] = {}
    for label, extra in (
        ("epoch_as_configured", {}),
        ("epoch_with_classification_loss", {"lambda_start": -1.0, "lambda_end": 0.0}),
    ):
        out = work / label
        fields = {**base, **extra, "out": str(out)}
        res = timed([sys.executable, "-c", ONE_EPOCH, str(args.config), json.dumps(fields)])
        res.update(run_log(out))
        results[label] = res
        print(f"  {label}: {res['wall_s']} s wall (process), {res.get('log_last_row')}")
    # estimate: epochs before lambda_start without the classification loss, the rest with it
    # (each one-epoch run also paid start-up, data loading and one validation)
    epochs = int(config.get("epochs", 60))
    plain = min(epochs, max(0, int(float(config.get("lambda_start", 4.0)))))
    first = results["epoch_as_configured"].get("log_last_row", {}).get("elapsed_s")
    cls = results["epoch_with_classification_loss"].get("log_last_row", {}).get("elapsed_s")
    if first and cls and not args.epoch_steps:
        estimate = plain * float(first) + (epochs - plain) * float(cls)
        results["full_run_estimate_s"] = round(estimate)
        print(f"  full run estimate ({epochs} epochs, upper bound): {estimate / 60:.1f} min")
    return results


def train_full(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The shipped config's whole run, as ``napari-instseg train`` runs it.

    With ``--full-time-limit`` the run stops cleanly after that many minutes (the
    trainer's own ``--time-limit``: validated, best weights and checkpoint saved); the
    result then says so and estimates the whole run from the epochs done. With
    ``--keep`` the run's weights, their metadata and its log are copied there.
    """
    out = work / "full"
    command = [sys.executable, "-c", CLI, "train", "--config", str(args.config)]
    command += ["--data", args.data, "--device", args.device, "--out", str(out)]
    command += ["--no-resume", "--no-progress"]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    if args.full_time_limit:
        command += ["--time-limit", str(args.full_time_limit)]
    if args.epoch_steps:  # a dry run: the config's epochs, each this many steps
        command += ["--steps-per-epoch", str(args.epoch_steps)]
    res = timed(command)
    res.update(run_log(out))
    res.update(full_run_estimate(out / "log.csv", args.config))
    if args.keep:
        keep = Path(args.keep)
        keep.mkdir(parents=True, exist_ok=True)
        kept = []
        for name in ("best.safetensors", "best.json", "log.csv"):
            if (out / name).is_file():
                shutil.copy2(out / name, keep / f"full_{name}")
                kept.append(f"full_{name}")
        res["kept"] = kept
    return res


def full_run_estimate(log: Path, config_path: str | Path) -> dict[str, Any]:
    """Epochs done of the configured ones and, when stopped early, the whole run's time.

    The estimate adds the epochs left at the rate of the last epochs done (with the
    classification loss on once past ``lambda_start``, the costlier part), to the time
    the run took so far.
    """
    import csv
    import tomllib

    if not log.is_file():
        return {}
    with open(log, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("elapsed_s")]
    if not rows:
        return {}
    config = tomllib.loads(Path(config_path).read_text())
    epochs = int(config.get("epochs", 60))
    done = int(rows[-1]["epoch"])
    elapsed = float(rows[-1]["elapsed_s"])
    found: dict[str, Any] = {"epochs_done": done, "epochs_configured": epochs}
    if done >= epochs:
        return found
    first = max(1, int(float(config.get("lambda_start", 0.0))) + 1)  # first with the loss
    later = [r for r in rows if int(r["epoch"]) >= first]
    if len(later) >= 2:
        a, b = later[0], later[-1]
        per_epoch = (float(b["elapsed_s"]) - float(a["elapsed_s"])) / (
            int(b["epoch"]) - int(a["epoch"])
        )
    else:
        per_epoch = elapsed / done
    found["stopped_early"] = True
    found["seconds_per_epoch_last"] = round(per_epoch, 2)
    found["full_run_estimate_s"] = round(elapsed + (epochs - done) * per_epoch)
    return found


def prediction(args: argparse.Namespace) -> dict[str, Any]:
    """Median times and peak GPU memory of one 520 x 696 image, one pass and tta 8."""
    import numpy as np
    import torch

    from napari_instseg.core.device import get_device
    from napari_instseg.core.predict import predict
    from napari_instseg.core.weights import load_model

    dev = get_device(args.device)
    image, source = None, "synthetic worms (make_worms, 520 x 696)"
    try:
        from napari_instseg.core.io import read_bbbc010

        image = read_bbbc010(args.data, ["B13"], with_w1=False)[0].image
        source = f"BBBC010 well B13 ({args.data})"
    except (OSError, ValueError, IndexError):
        from napari_instseg.core.synthetic import make_worms

        image = make_worms((520, 696), n_worms=12, seed=0).image
    cpu_model = load_model(None)
    reference = {
        tta: predict(image, cpu_model, "cpu", tta=tta, precision="float32") for tta in (1, 8)
    }
    model = load_model(None, device=dev)
    results: dict[str, Any] = {"image": source, "shape": list(np.shape(image))}
    for precision in ("float32", "auto"):
        for tta, repeats in ((1, 5), (8, 3)):
            predict(image, model, dev, tta=tta, precision=precision)  # warm-up
            times = []
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            for _ in range(repeats):
                t0 = time.perf_counter()
                out = predict(image, model, dev, tta=tta, precision=precision)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                times.append(time.perf_counter() - t0)
            row: dict[str, Any] = {
                "precision": out.metadata["precision"],
                "median_s": round(statistics.median(times), 4),
                "max_abs_diff_from_cpu": {
                    name: float(np.abs(getattr(out, name) - getattr(reference[tta], name)).max())
                    for name in ("boundary", "foreground")
                },
            }
            if dev.type == "cuda":
                row["peak_gpu_allocated_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20)
                row["peak_gpu_reserved_mib"] = round(torch.cuda.max_memory_reserved(dev) / 2**20)
            results[f"{precision}_tta{tta}"] = row
            print(f"  precision {precision}, tta {tta}: {row}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/bbbc010", help="BBBC010 folder")
    parser.add_argument("--config", default=str(REPO / "configs/bbbc010_v10_contact.toml"))
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N (or cpu: a dry run)")
    parser.add_argument("--out", default=None, help="write the results here (JSON)")
    parser.add_argument("--work", default=None, help="run folders (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (0: all)")
    parser.add_argument(
        "--epoch-steps", type=int, default=0, help="steps of the timed epochs (0: the config's)"
    )
    parser.add_argument("--skip-tests", action="store_true", help="leave out tests/test_cuda.py")
    parser.add_argument("--skip-full", action="store_true", help="leave out the full training")
    parser.add_argument(
        "--order",
        default=",".join(STEPS),
        help="the steps, in the order to run them (comma-separated; default: %(default)s); "
        "on a lent GPU with little time: full,predict,tests",
    )
    parser.add_argument(
        "--full-time-limit",
        type=float,
        default=0.0,
        help="minutes after which the full training stops cleanly (0: none); the whole "
        "run's time is then estimated from the epochs done",
    )
    parser.add_argument(
        "--stop-after",
        type=float,
        default=0.0,
        help="seconds from the start after which no further step starts (0: no limit)",
    )
    parser.add_argument("--keep", default=None, help="copy the full run's weights and log here")
    args = parser.parse_args(argv)
    order = [step.strip() for step in args.order.split(",") if step.strip()]
    unknown = sorted(set(order) - set(STEPS))
    if unknown:
        parser.error(f"--order: unknown steps {unknown}; choose from {', '.join(STEPS)}")
    if args.skip_tests:
        order = [step for step in order if step != "tests"]
    if args.skip_full:
        order = [step for step in order if step != "full"]
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"command": " ".join(sys.argv), "work": str(work)}
    start = time.perf_counter()

    def save() -> None:  # after every step: a run cut short keeps what it measured
        results["elapsed_s"] = round(time.perf_counter() - start, 1)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))

    print("== environment")
    results["environment"] = environment(args.device)
    for key, value in results["environment"].items():
        print(f"  {key}: {value}")
    save()
    has_data = Path(args.data, "images").is_dir()
    for step in order:
        if args.stop_after and time.perf_counter() - start > args.stop_after:
            print(f"== {step}: left out (--stop-after {args.stop_after:g} s reached)")
            results.setdefault("left_out", []).append(step)
            save()
            continue
        if step == "tests":
            print("== tests/test_cuda.py")
            env = dict(os.environ)
            if not args.device.startswith("cuda"):
                env["NAPARI_INSTSEG_GPU_TEST_DEVICE"] = args.device
            tests = timed([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_cuda.py"], env)
            results["tests"] = tests
            print("  " + "\n  ".join(tests["stdout_tail"]))
        elif step in ("epochs", "full") and not has_data:
            print(f"== {step}: no BBBC010 data at {args.data}, training times left out")
        elif step == "epochs":
            print("== one training epoch of", args.config)
            results["training_epoch"] = train_epochs(args, work)
        elif step == "full":
            print("== full training run (the target: 10 minutes on one H100 or H200)")
            results["training_full"] = train_full(args, work)
            full = results["training_full"]
            print(f"  {full['wall_s']} s wall ({full['wall_s'] / 60:.1f} min), {full}")
        elif step == "predict":
            print("== prediction of one 520 x 696 image")
            results["prediction"] = prediction(args)
        save()
    if args.out:
        print(f"results written to {args.out}")
    runs = [r for r in results.get("training_epoch", {}).values() if isinstance(r, dict)]
    runs += [results.get("tests", {}), results.get("training_full", {})]
    failed = any(r.get("returncode") for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
