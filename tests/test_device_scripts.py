"""The scripts that take the GPU measurements on a lent device machine.

``benchmarks/device_bundle.py`` makes ready what travels (data, wheels) and
``benchmarks/gpu_check.py`` measures; both run rarely and on someone else's machine, so
what can be checked here is checked here: the run-time estimate from a run stopped early,
the steps' order, what is copied and what travels.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, _BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return _load("gpu_check")


@pytest.fixture(scope="module")
def bundle():
    return _load("device_bundle")


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
