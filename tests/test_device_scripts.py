"""The scripts that take the GPU measurements on a lent device machine.

``benchmarks/device_bundle.py`` makes ready what travels (data, wheels) and
``benchmarks/gpu_check.py`` measures, ``benchmarks/device_seeds.py`` trains several runs
side by side; they run rarely and on someone else's machine, so what can be checked here
is checked here: the run-time estimate from a run stopped early, the steps' order, what is
copied and what travels, the side-by-side plan and what comes back.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import tifffile


@pytest.fixture(scope="module")
def gpu_check(load_benchmark):
    return load_benchmark("gpu_check")


@pytest.fixture(scope="module")
def bundle(load_benchmark):
    return load_benchmark("device_bundle")


def _write_log(path, rows):
    lines = ["epoch,elapsed_s,loss_total"]
    lines += [f"{epoch},{elapsed},0.5" for epoch, elapsed in rows]
    path.write_text("\n".join(lines) + "\n")


def test_a_run_stopped_early_is_estimated_from_its_costlier_epochs(tmp_path, gpu_check):
    config = tmp_path / "c.toml"
    config.write_text("epochs = 20\nlambda_start = 2.0\n")
    log = tmp_path / "log.csv"
    # epochs 1-2 without the classification loss (1 s each), from epoch 3 on 3 s each
    _write_log(log, [(1, 1.0), (2, 2.0), (3, 5.0), (4, 8.0), (5, 11.0)])
    found = gpu_check.full_run_estimate(log, config)
    assert found["stopped_early"] is True
    assert found["epochs_done"] == 5 and found["epochs_configured"] == 20
    assert found["seconds_per_epoch_last"] == pytest.approx(3.0)
    assert found["full_run_estimate_s"] == 11 + 15 * 3


def test_a_finished_run_is_not_estimated(tmp_path, gpu_check):
    config = tmp_path / "c.toml"
    config.write_text("epochs = 3\n")
    log = tmp_path / "log.csv"
    _write_log(log, [(1, 1.0), (2, 2.0), (3, 3.5)])
    found = gpu_check.full_run_estimate(log, config)
    assert found == {"epochs_done": 3, "epochs_configured": 3}
    assert gpu_check.full_run_estimate(tmp_path / "missing.csv", config) == {}


def test_unknown_steps_are_refused(gpu_check, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--order", "full,train", "--device", "cpu"])
    assert "unknown steps ['train']" in capsys.readouterr().err


def test_left_out_steps_are_recorded(tmp_path, gpu_check):
    """A step that would start past ``--stop-after`` is left out, and the JSON says so."""
    import json

    out = tmp_path / "r.json"
    code = gpu_check.main(
        ["--device", "cpu", "--order", "tests,predict", "--stop-after", "1e-9", "--out", str(out)]
    )
    assert code == 0
    results = json.loads(out.read_text())
    assert results["left_out"] == ["tests", "predict"]
    assert results["environment"]["device"] == "cpu"


def _fake_bbbc010(root):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    image = np.zeros((8, 8), np.uint16)
    for well in ("A01", "A02"):
        for channel in ("w1", "w2"):
            tifffile.imwrite(root / "images" / f"plate_{well}_{channel}_X.tif", image)
        (root / "masks" / f"{well}_01_ground_truth.png").write_bytes(b"png")
    (root / "README.md").write_text("readme")


def test_bundle_copies_the_bright_field_and_masks_only(tmp_path, bundle):
    source, dest = tmp_path / "bbbc010", tmp_path / "copy"
    _fake_bbbc010(source)
    (dest / "stale").mkdir(parents=True)  # an earlier copy is replaced
    copied = bundle.copy_data(source, dest)
    names = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert names == [
        "README.md",
        "images/plate_A01_w2_X.tif",
        "images/plate_A02_w2_X.tif",
        "masks/A01_01_ground_truth.png",
        "masks/A02_01_ground_truth.png",
    ]
    assert copied == sum((dest / n).stat().st_size for n in names)
    with pytest.raises(FileNotFoundError, match="no BBBC010 bright-field"):
        bundle.copy_data(tmp_path / "empty", tmp_path / "copy2")


def test_what_travels_counts_tracked_untracked_and_carried_not_ignored(tmp_path, bundle):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / ".gitignore").write_text("/.device/\nbig.bin\n")
    (repo / "a.txt").write_bytes(b"x" * 100)
    (repo / "big.bin").write_bytes(b"x" * 10_000)  # ignored, not carried: stays
    (repo / ".device" / "data").mkdir(parents=True)
    (repo / ".device" / "data" / "d.bin").write_bytes(b"x" * 1000)
    assert bundle.is_ignored(repo, repo / ".device")
    assert not bundle.is_ignored(repo, repo / "a.txt")
    gitignore = (repo / ".gitignore").stat().st_size
    assert bundle.travelling_bytes(repo, []) == 100 + gitignore
    assert bundle.travelling_bytes(repo, [repo / ".device"]) == 100 + gitignore + 1000


@pytest.fixture(scope="module")
def seeds(load_benchmark):
    return load_benchmark("device_seeds")


def test_a_run_spec_splits_train_and_model_fields(seeds):
    name, fields = seeds.parse_run("wide:channels=[32,64], seed=1,lr=0.001,out=runs/x")
    assert name == "wide"
    assert fields == {"seed": 1, "lr": 0.001, "out": "runs/x", "model": {"channels": [32, 64]}}
    assert seeds.parse_run("plain") == ("plain", {})
    with pytest.raises(ValueError, match="field=value"):
        seeds.parse_run("bad:seed")
    with pytest.raises(ValueError, match="no name"):
        seeds.parse_run(":seed=1")


def test_step_time_is_linear_between_one_run_and_the_probe(seeds):
    # session 33 on one H200: one run alone 0.066 s a step, six together 0.24
    assert seeds.step_seconds(1, 6, 0.24, 0.066) == pytest.approx(0.066)
    assert seeds.step_seconds(6, 6, 0.24, 0.066) == pytest.approx(0.24)
    assert seeds.step_seconds(2, 6, 0.24, 0.066) == pytest.approx(0.066 + 0.174 / 5)
    # a probe faster than the floor never plans below one run alone
    assert seeds.step_seconds(3, 3, 0.01, 0.066) == pytest.approx(0.066)


def test_the_plan_takes_the_most_runs_that_train_long_enough(seeds):
    names = [f"r{i}" for i in range(6)]
    # two runs at 0.1008 s a step do 4484 steps in 452 s (>= 0.8 x 5500); three do 3333
    chosen, steps = seeds.plan_runs(names, 0.24, 0.066, 452.0, 5500, 0.8)
    assert chosen == ["r0", "r1"]
    assert steps == int(452.0 / (0.066 + 0.174 / 5))
    # time for all six: each gets the configured steps, not more
    chosen, steps = seeds.plan_runs(names, 0.24, 0.066, 5000.0, 5500, 0.8)
    assert chosen == names and steps == 5500
    # too little time even for one: one run anyway, with the steps that fit
    chosen, steps = seeds.plan_runs(names, 0.24, 0.066, 66.0, 5500, 0.8)
    assert chosen == ["r0"] and steps == 1000


def test_more_runs_than_files_come_back_are_refused(seeds, tmp_path, capsys):
    runs = [f"r{i}:seed={i}" for i in range(seeds.MAX_RUNS + 1)]
    with pytest.raises(SystemExit):
        seeds.main(["--out", str(tmp_path / "out"), "--runs", *runs])
    assert "at most 6 runs" in capsys.readouterr().err
    assert not (tmp_path / "out" / "device_seeds.json").exists()


def _tiny_training(tmp_path):
    """A 3-image training folder and a tiny config on it (2 epochs of 2 steps)."""
    from napari_instseg.core.synthetic import make_worms
    from napari_instseg.core.training_folder import write_training_folder

    samples = []
    for i, name in enumerate(["A01", "A02", "A03"]):
        sample = make_worms(shape=(96, 96), n_worms=3, length=(30, 50), width=(5, 8), seed=i)
        sample.name = name
        samples.append(sample)
    data = write_training_folder(tmp_path / "data", samples)
    config = tmp_path / "tiny.toml"
    config.write_text(
        'train_wells = "A01-A02"\nval_wells = "A03"\nepochs = 2\nsteps_per_epoch = 2\n'
        "batch_size = 2\ncrop_size = 64\nn_embedding_samples = 8\nn_class_samples = 4\n"
        'val_every = 1\ncrop_candidates = 2\nselect_metric = "val_ap"\n'
        "[model]\nchannels = [8, 16]\nembedding_dim = 4\nhead_channels = 8\n"
    )
    return data, config


def test_runs_train_side_by_side_and_come_back_as_few_files(seeds, tmp_path):
    import tarfile

    from napari_instseg.core.weights import load_model, read_metadata

    data, config = _tiny_training(tmp_path)
    out = tmp_path / "out"
    args = ["--data", str(data), "--config", str(config), "--device", "cpu"]
    args += ["--out", str(out), "--work", str(tmp_path / "work"), "--threads", "1"]
    args += ["--runs", "a:seed=0", "b:seed=1,channels=[8,8,16]"]
    args += ["--probe-epochs", "2", "--probe-steps", "1", "--budget-s", "400"]
    args += ["--single-step-s", "0.01", "--reserve-s", "30"]
    assert seeds.main(args) == 0
    # two weights, the report and the logs' archive: within the 8 files the tool returns
    assert sorted(p.name for p in out.iterdir()) == [
        "a_best.safetensors",
        "b_best.safetensors",
        "device_seeds.json",
        "device_seeds_logs.tar.gz",
    ]
    report = json.loads((out / "device_seeds.json").read_text())
    assert report["plan"]["runs"] == ["a", "b"]
    assert report["plan"]["max_steps"] == report["plan"]["configured_steps"] == 4
    for name in ("a", "b"):
        result = report["train"]["results"][name]
        assert result["exit_code"] == 0 and result["epochs_done"] == 2
        assert result["best_val_ap"] is not None
    model = load_model(out / "b_best.safetensors")
    assert tuple(model.config.channels) == (8, 8, 16)
    meta = read_metadata(out / "b_best.safetensors")
    assert meta["training"]["config"]["max_steps"] == 4
    with tarfile.open(out / "device_seeds_logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"a_log.csv", "b_best.json", "a_train.out", "probe_b.out"} <= names


def test_resume_finishes_the_runs_a_call_left_behind(seeds, tmp_path):
    from napari_instseg.core.train import TrainConfig, train

    data, config = _tiny_training(tmp_path)
    work, out = tmp_path / "work", tmp_path / "out"
    args = ["--resume", "--work", str(work), "--out", str(out), "--device", "cpu"]
    args += ["--threads", "1", "--budget-s", "300", "--reserve-s", "30"]
    work.mkdir()
    assert seeds.main(args) == 1  # nothing there to resume
    assert json.loads((out / "device_seeds.json").read_text())["resumed"] == []
    # a run stopped after its first epoch of two, as a call's limit would leave it
    run = TrainConfig.from_toml(config)
    run.data, run.out, run.device = [str(data)], str(work / "a"), "cpu"
    train(run, resume=False, progress=False, callback=lambda row: True)
    assert len(seeds.read_log(work / "a" / "log.csv")) == 1
    assert seeds.main(args) == 0
    rows = seeds.read_log(work / "a" / "log.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]  # the second epoch only, from the checkpoint
    report = json.loads((out / "device_seeds.json").read_text())
    assert report["resumed"] == ["a"]
    assert report["train"]["results"]["a"]["epochs_done"] == 2
    assert (out / "a_best.safetensors").is_file()
    assert (out / "device_seeds_logs.tar.gz").is_file()
