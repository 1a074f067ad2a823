"""Training: a tiny run end to end, resume, loss decrease, crops, configs, well names."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_instseg.core.model import InstSegNet, ModelConfig
from napari_instseg.core.synthetic import make_worms
from napari_instseg.core.train import (
    TrainConfig,
    image_draw_probabilities,
    load_samples,
    parse_names,
    prepare,
    random_crop,
    train,
    training_loss,
)
from napari_instseg.core.types import Sample
from napari_instseg.core.weights import load_model

TINY_MODEL = {"channels": [8, 16], "embedding_dim": 4, "head_channels": 8, "coord_scale": 32.0}


def _worms(seed: int) -> Sample:
    return make_worms(
        shape=(96, 96), n_worms=3, length=(30, 50), width=(5, 8), n_touching=0, seed=seed
    )


def write_bbbc010_layout(root: Path, wells: list[str]) -> Path:
    """A tiny folder in BBBC010's layout: images/..._<WELL>_w2_<GUID>.tif, one PNG per worm."""
    import imageio.v3 as iio
    import tifffile

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, well in enumerate(wells):
        sample = _worms(i)
        tifffile.imwrite(
            root / "images" / f"plate_{well}_w2_0A1B2C3D.tif", sample.image.astype(np.uint16)
        )
        for j, mask in enumerate(sample.masks):
            path = root / "masks" / f"{well}_{j + 1:02d}_ground_truth.png"
            iio.imwrite(path, mask.astype(np.uint8) * 255)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A training folder with images A01, A02 (train) and A03 (validation)."""
    from napari_instseg.core.training_folder import write_training_folder

    root = tmp_path_factory.mktemp("data") / "folder"
    samples = []
    for i, name in enumerate(["A01", "A02", "A03"]):
        sample = _worms(i)
        sample.name = name
        samples.append(sample)
    return write_training_folder(root, samples)


def tiny_config(data: Path, out: Path, **kw) -> TrainConfig:
    base = {
        "data": [str(data)],
        "train_wells": "A01-A02",
        "val_wells": "A03",
        "out": str(out),
        "model": dict(TINY_MODEL),
        "epochs": 2,
        "steps_per_epoch": 2,
        "batch_size": 2,
        "crop_size": 64,
        "n_embedding_samples": 8,
        "n_class_samples": 4,
        "lambda_start": 0.0,
        "lambda_end": 1.0,
        "val_every": 1,
        "device": "cpu",
        "crop_candidates": 2,
    }
    base.update(kw)
    return TrainConfig(**base)


def _log(out: Path) -> list[dict[str, str]]:
    with open(out / "log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_tiny_run_then_resume(data, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(data, out)
    rows_seen = []
    best = train(cfg, progress=False, callback=lambda row: rows_seen.append(row) and False)
    assert best == out / "best.safetensors" and best.is_file()
    assert TrainConfig.from_toml(out / "config.toml") == cfg
    rows = _log(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert len(rows_seen) == 2
    for column in ("loss_total", "loss_embedding", "loss_boundary", "loss_foreground"):
        values = [float(r[column]) for r in rows]
        assert all(np.isfinite(values)) and all(v > 0 for v in values), column
    assert float(rows[-1]["loss_classification"]) > 0  # lambda ramps from epoch 0 here
    assert 0.0 <= float(rows[-1]["val_grow_iou"]) <= 1.0

    model = load_model(best)
    assert model.config.channels == (8, 16) and model.config.embedding_dim == 4
    training = model.metadata["training"]
    assert training["train_wells"] == "A01-A02" and training["val_wells"] == "A03"
    assert training["epoch"] in (1, 2)
    assert training["hardware"] and training["commit"]
    assert "val_grow_iou" in model.metadata["metrics"]
    # the training worms' mean width, for predict(..., scale="auto"): these are drawn at most
    # 5-8 px wide, tapering to their ends
    assert 3.0 < model.metadata["object_width"] < 8.0

    # every file of the run is readable by others as the weights are (a colleague resumes)
    import os
    import stat

    umask = os.umask(0o022)
    os.umask(umask)
    if umask & 0o044 == 0:
        for path in out.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path.name

    # resume: raising the epochs continues at epoch 3, the log keeps its first rows
    first_rows = rows
    train(tiny_config(data, out, epochs=3), progress=False)
    rows = _log(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for i in range(2):
        assert rows[i]["loss_total"] == first_rows[i]["loss_total"]
    assert float(rows[2]["elapsed_s"]) >= float(rows[1]["elapsed_s"])

    # a callback returning True stops after the current epoch
    out2 = tmp_path / "stopped"
    train(tiny_config(data, out2, epochs=5, val_wells=""), progress=False, callback=lambda r: True)
    assert [int(r["epoch"]) for r in _log(out2)] == [1]
    assert (out2 / "best.safetensors").is_file()  # without validation: the last weights

    # should_stop, asked after every step, ends the epoch at that step (validated, kept)
    out3, asked = tmp_path / "stopped_at_a_step", []

    def after_two_steps() -> bool:
        asked.append(1)
        return len(asked) == 2

    cfg = tiny_config(data, out3, epochs=5, steps_per_epoch=4)
    train(cfg, progress=False, should_stop=after_two_steps)
    (row,) = _log(out3)
    assert len(asked) == 2 and int(row["epoch"]) == 1 and "val_ap" in row
    assert (out3 / "best.safetensors").is_file()


def test_labels_exported_at_a_scale_train_at_the_model_width(tmp_path):
    # worms twice as wide, exported from a prediction at scale 0.5: training resizes them
    # back, so the model records the width of the worms it saw (about the usual 5-8 px)
    from napari_instseg.core.scale import object_width
    from napari_instseg.core.training_folder import write_training_folder

    samples = []
    for i, name in enumerate(["A01", "A02", "A03"]):
        wide = make_worms(
            shape=(192, 192), n_worms=3, length=(60, 100), width=(10, 16), n_touching=0, seed=i
        )
        wide.name, wide.metadata = name, {"scale": 0.5}
        samples.append(wide)
    data = write_training_folder(tmp_path / "wide", samples)
    best = train(tiny_config(data, tmp_path / "run", epochs=1), progress=False)
    recorded = load_model(best).metadata["object_width"]
    drawn = np.median([object_width(s.masks) for s in samples[:2]])
    assert recorded == pytest.approx(drawn / 2, rel=0.15)


def test_cpu_amp_trains_in_bfloat16_with_float32_weights(data, tmp_path):
    out = tmp_path / "amp"
    cfg = tiny_config(data, out, cpu_amp=True, epochs=1, val_wells="")
    best = train(cfg, progress=False)
    rows = _log(out)
    assert np.isfinite(float(rows[0]["loss_total"])) and float(rows[0]["loss_total"]) > 0
    model = load_model(best)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x = torch.zeros(1, model.config.network_channels, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(x, (640, 600))
    assert outputs["boundary_logits"].dtype == torch.bfloat16  # the network ran in bf16
    assert outputs["embeddings"].dtype == torch.float32  # coordinates added in float32


def test_overlapping_train_and_val_wells(data, tmp_path):
    with pytest.raises(ValueError, match="overlap"):
        train(tiny_config(data, tmp_path / "x", val_wells="A02-A03"), progress=False)


def test_loss_goes_down_on_a_fixed_problem(data):
    torch.manual_seed(0)
    cfg = tiny_config(data, Path("unused"), n_embedding_samples=16)
    model = InstSegNet(ModelConfig.from_dict(TINY_MODEL))
    model.train()
    item = prepare(load_samples([data], ["A01"])[0], 1)
    rng = np.random.default_rng(0)
    crops = [random_crop(item, cfg, rng) for _ in range(2)]
    x = torch.stack([c[0] for c in crops])
    masks = [c[1] for c in crops]
    trusted = torch.stack([c[2] for c in crops])
    assert sum(len(m) for m in masks) > 0
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        generator = torch.Generator().manual_seed(0)  # same pixel samples every step
        terms = training_loss(model(x), masks, trusted, cfg, model.config.taus, 0.2, generator)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        losses.append(float(terms["total"].detach()))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses


def test_parse_names():
    assert parse_names("A01-A03") == ["A01", "A02", "A03"]
    assert parse_names("A24-B01") == ["A24", "B01"]
    assert parse_names("A01-B12") == [f"A{i:02d}" for i in range(1, 25)] + [
        f"B{i:02d}" for i in range(1, 13)
    ]
    assert len(parse_names("B13-C02")) == 14
    assert parse_names("A05, C01-C02,") == ["A05", "C01", "C02"]
    assert parse_names("a01-a02") == ["A01", "A02"]
    assert parse_names("") == []
    assert parse_names("A1-A3") == ["A01", "A02", "A03"]  # one-digit columns are fine
    assert parse_names("img7,A01") == ["img7", "A01"]  # plain names pass through
    for bad in ("A03-A01", "A01-Q01", "A00-A02", "A01-A25", "XY1-A02"):
        with pytest.raises(ValueError):
            parse_names(bad)


def test_oversampled_images_are_drawn_that_much_more_often():
    names = ["A01", "A02", "A13", "A14"]
    assert np.allclose(image_draw_probabilities(names, "", 3.0), 0.25)
    p = image_draw_probabilities(names, "A13-A24", 2.0)
    assert np.allclose(p, [1 / 6, 1 / 6, 2 / 6, 2 / 6])
    draws = np.random.default_rng(0).choice(4, size=60_000, p=p)
    share = np.isin(draws, [2, 3]).mean()
    assert abs(share - 2 / 3) < 0.01
    with pytest.raises(ValueError, match="positive"):
        image_draw_probabilities(names, "A13", 0.0)
    with pytest.raises(ValueError, match="none of the training images"):
        image_draw_probabilities(names, "B01-B03", 2.0)


def test_random_crop_and_prepare():
    sample = _worms(0)
    cfg = TrainConfig(crop_size=48, crop_candidates=4)
    item = prepare(sample)
    assert item.image.shape == (1, 96, 96) and item.image.dtype == torch.float32
    assert item.trusted.all() and item.masks.shape == (3, 96, 96)
    rng = np.random.default_rng(1)
    for _ in range(5):
        image, masks, trusted = random_crop(item, cfg, rng)
        assert image.shape == (1, 48, 48) and image.dtype == torch.float32
        assert masks.dtype == torch.bool and masks.shape[1:] == (48, 48)
        assert masks.shape[0] <= 3
        assert all(m.any() for m in masks)  # only instances still visible
        assert trusted.dtype == torch.bool and trusted.shape == (48, 48)
        assert torch.isfinite(image).all()
    # without augmentation the masks' pixel counts are kept (scale 1, no rotation)
    plain = TrainConfig(
        crop_size=96, rotation=0.0, scale_min=1.0, scale_max=1.0, flips=False, crop_candidates=1
    )
    centred = prepare(sample)
    _, masks, _ = random_crop(centred, plain, np.random.default_rng(0))
    assert masks.sum() <= sample.masks.sum()


def test_mask_boxes_and_crops_keep_instances_reaching_into_the_window():
    from napari_instseg.core.train import mask_boxes

    masks = torch.zeros((3, 20, 30), dtype=torch.bool)
    masks[0, 2:5, 7:9] = True
    masks[0, 11, 3] = True
    masks[2, 19, 29] = True
    assert mask_boxes(masks).tolist() == [[2, 12, 3, 9], [0, 0, 0, 0], [19, 20, 29, 30]]
    # the crop reads only the instances whose boxes reach into its window: the same crops as
    # reading every instance (whole-image boxes), on an image crowded with worms
    from napari_instseg.core.synthetic import make_worms

    crowded = make_worms(shape=(96, 96), n_worms=12, length=(15, 30), width=(3, 5), seed=4)
    item = prepare(crowded)
    every = prepare(crowded)
    every.boxes[:] = torch.tensor([0, 96, 0, 96])
    for config in (TrainConfig(crop_size=24), TrainConfig(crop_size=24, aligned_fraction=1.0)):
        rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
        for _ in range(40):
            image_a, masks_a, trusted_a = random_crop(item, config, rng_a)
            image_b, masks_b, trusted_b = random_crop(every, config, rng_b)
            assert torch.equal(image_a, image_b) and torch.equal(trusted_a, trusted_b)
            assert torch.equal(masks_a, masks_b)


def _dihedral(array: np.ndarray) -> list[np.ndarray]:
    """The eight flips and transposes of a square array."""
    out = []
    for a in (array, array.T):
        out += [a, a[::-1], a[:, ::-1], a[::-1, ::-1]]
    return out


def _find_window(crop: np.ndarray, padded: np.ndarray) -> tuple[int, int, int] | None:
    """(transform, row, col) where ``crop`` is an exact window of ``padded``, else None."""
    size = crop.shape[0]
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size))
    for k, candidate in enumerate(_dihedral(crop)):
        hits = np.argwhere((windows == candidate).all((2, 3)))
        if len(hits):
            return k, int(hits[0][0]), int(hits[0][1])
    return None


def test_aligned_crops_copy_pixels():
    sample = _worms(2)
    item = prepare(sample)
    size = 40
    union = np.pad(sample.masks.any(0), size)
    image = np.pad(item.image[0].numpy(), size, constant_values=np.nan)
    aligned = TrainConfig(crop_size=size, crop_candidates=4, aligned_fraction=1.0)
    rng = np.random.default_rng(3)
    transforms, checked = set(), 0
    for _ in range(16):
        crop, masks, _ = random_crop(item, aligned, rng)
        if masks.sum() < 50:  # too little worm to place the window unambiguously
            continue
        checked += 1
        found = _find_window(masks.any(0).numpy(), union)
        assert found is not None  # the masks are a window of the originals, not resampled
        k, r, c = found
        transforms.add(k)
        source = image[r : r + size, c : c + size]
        target = _dihedral(crop[0].numpy())[k]
        inside = np.isfinite(source)
        slope, offset = np.polyfit(source[inside], target[inside], 1)
        residual = target[inside] - (slope * source[inside] + offset)
        assert 0.8 <= slope <= 1.25 and residual.std() < 0.03  # jitter and noise only
    assert checked >= 8 and len(transforms) > 2  # flips and transposes still vary
    # the default augmentation resamples: its masks are generally no window of the originals
    default = TrainConfig(crop_size=size, crop_candidates=4)
    rng = np.random.default_rng(3)
    crops = [random_crop(item, default, rng)[1].any(0).numpy() for _ in range(8)]
    misses = [_find_window(m, union) is None for m in crops if m.sum() >= 50]
    assert len(misses) >= 4 and sum(misses) >= len(misses) - 1
    with pytest.raises(ValueError, match="aligned_fraction"):
        train(TrainConfig(aligned_fraction=1.5))


def test_unreviewed_instances_are_excluded():
    sample = _worms(1)
    sample.reviewed = np.array([True, False, True])
    item = prepare(sample)
    assert item.masks.shape[0] == 2
    assert torch.equal(item.masks, torch.from_numpy(sample.masks[[0, 2]]))
    unreviewed = torch.from_numpy(sample.masks[1])
    assert not item.trusted[unreviewed].any()
    assert item.trusted[~torch.from_numpy(sample.masks.any(0))].float().mean() > 0.8
    with pytest.raises(ValueError, match="channels"):
        prepare(sample, in_channels=2)


def test_load_samples_bbbc010_layout(tmp_path):
    root = write_bbbc010_layout(tmp_path / "bbbc", ["A01", "A02"])
    samples = load_samples([root], ["A02"])
    assert [s.name for s in samples] == ["A02"]
    assert samples[0].masks.shape == (3, 96, 96)
    with pytest.raises(ValueError, match="no images"):
        load_samples([root], ["B01"])


def test_train_config_toml(tmp_path):
    cfg = TrainConfig(epochs=3, model={"channels": [8, 16], "semi_conv": False}, data=["a", "b"])
    path = tmp_path / "c.toml"
    cfg.to_toml(path)
    assert TrainConfig.from_toml(path) == cfg
    text = path.read_text()
    path.write_text("epochz = 4\n" + text)
    with pytest.raises(ValueError, match="epochz"):
        TrainConfig.from_toml(path)
    path.write_text(text + "\nembeding_dim = 4\n")  # lands in [model]
    with pytest.raises(ValueError, match="embeding_dim"):
        TrainConfig.from_toml(path)
    shipped = Path(__file__).resolve().parents[1] / "configs" / "bbbc010.toml"
    if shipped.is_file():
        parsed = TrainConfig.from_toml(shipped)
        assert set(parse_names(parsed.train_wells)).isdisjoint(parse_names(parsed.val_wells))
        ModelConfig.from_dict(parsed.model)  # valid architecture keys


def test_cli_train(data, tmp_path, capsys):
    from napari_instseg.cli import main

    config = tmp_path / "tiny.toml"
    tiny_config(data, tmp_path / "ignored", epochs=5).to_toml(config)
    out = tmp_path / "cli-run"
    status = main(
        ["train", "--config", str(config), "--out", str(out), "--epochs", "1"]
        + ["--device", "cpu", "--no-progress", "--val-wells", "A03", "--train-wells", "A01"]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert str(out / "best.safetensors") in printed
    saved = TrainConfig.from_toml(out / "config.toml")
    assert saved.epochs == 1 and saved.out == str(out) and saved.train_wells == "A01"
    assert saved.crop_size == 64  # from the TOML
    assert len(_log(out)) == 1
    # bad input: a clear error and a non-zero status, no traceback
    status = main(["train", "--config", str(tmp_path / "missing.toml")])
    assert status == 1
    assert "missing.toml" in capsys.readouterr().err


def _two_sample_folder(path):
    """A training folder of two synthetic images, ``worms-a`` and ``worms-b``."""
    from napari_instseg.core.training_folder import write_training_folder

    samples = []
    for i, name in enumerate(["worms-a", "worms-b"]):
        sample = _worms(i)
        sample.name = name
        samples.append(sample)
    return write_training_folder(path, samples)


def test_cli_train_on_training_folders_takes_all_their_images(tmp_path, capsys):
    from napari_instseg.cli import main

    folder = _two_sample_folder(tmp_path / "corrected")
    out = tmp_path / "run"
    argv = ["train", "--data", str(folder), "--epochs", "1", "--out", str(out)]
    argv += ["--steps-per-epoch", "1", "--batch-size", "1", "--crop-size", "64"]
    assert main([*argv, "--device", "cpu", "--no-progress"]) == 0, capsys.readouterr().err
    saved = TrainConfig.from_toml(out / "config.toml")
    assert (saved.train_wells, saved.val_wells) == ("", "")  # every image, no validation
    # wells that name no image: the error says which flag picks them
    assert main([*argv, "--train-wells", "A01-A03", "--no-resume"]) == 1
    assert "--train-wells" in capsys.readouterr().err


def test_weights_record_the_commit_training_started_at(data, tmp_path, monkeypatch):
    """The commit is HEAD when training started; a resume under other code is recorded too."""
    import napari_instseg.core.train as train_module

    out = tmp_path / "commits"
    monkeypatch.setattr(train_module, "_git_commit", lambda: "aaaaaaa")
    train(tiny_config(data, out, epochs=1, val_wells=""), progress=False)
    assert load_model(out / "best.safetensors").metadata["training"]["commit"] == "aaaaaaa"
    monkeypatch.setattr(train_module, "_git_commit", lambda: "bbbbbbb")
    train(tiny_config(data, out, epochs=2, val_wells=""), progress=False)
    training = load_model(out / "best.safetensors").metadata["training"]
    assert training["epoch"] == 2
    assert training["commit"] == "aaaaaaa" and training["resumed_commit"] == "bbbbbbb"


def _plain_folder(root: Path, names: list[str]) -> Path:
    """images/<name>.tif and masks/<name>.tif label images, no manifest (stardist layout)."""
    import tifffile

    from napari_instseg.core.instances import Instances

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, name in enumerate(names):
        sample = _worms(i)
        tifffile.imwrite(root / "images" / f"{name}.tif", sample.image.astype(np.uint16))
        tifffile.imwrite(root / "masks" / f"{name}.tif", Instances(sample.masks).to_labels())
    return root


def test_load_samples_reads_every_documented_layout(data, tmp_path):
    plain = _plain_folder(tmp_path / "plain", ["A01", "worm-b"])
    samples = load_samples(plain, None)
    assert [s.name for s in samples] == ["A01", "worm-b"]
    assert samples[0].masks.shape == (3, 96, 96)
    assert [s.name for s in load_samples([plain], ["worm-b"])] == ["worm-b"]
    assert [s.name for s in load_samples(data, ["A02"])] == ["A02"]  # manifest
    bbbc = write_bbbc010_layout(tmp_path / "bbbc", ["A01"])
    assert [s.name for s in load_samples(bbbc, None)] == ["A01"]
    # what is missing is named
    (plain / "masks" / "worm-b.tif").unlink()
    with pytest.raises(FileNotFoundError, match="masks/worm-b.tif"):
        load_samples(plain, None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images/"):
        load_samples(tmp_path / "empty", None)
    with pytest.raises(FileNotFoundError, match="data folder .*nowhere does not exist"):
        load_samples(tmp_path / "nowhere", None)


def test_cli_train_on_a_folder_without_manifest(tmp_path, capsys):
    from napari_instseg.cli import main

    plain = _plain_folder(tmp_path / "tf", ["A01", "A02"])
    out = tmp_path / "run"
    argv = ["train", "--data", str(plain), "--epochs", "1", "--out", str(out)]
    argv += ["--steps-per-epoch", "1", "--batch-size", "1", "--crop-size", "64"]
    assert main([*argv, "--device", "cpu", "--no-progress"]) == 0, capsys.readouterr().err
    assert (out / "best.safetensors").is_file()
    # no validation images: the next step names the command with a folder of the user's
    printed = capsys.readouterr().out
    expected = f"napari-instseg evaluate --model {out / 'best.safetensors'} --gt LABELLED_FOLDER"
    assert expected in printed and "--tune --write" in printed


def test_cli_train_names_the_tuning_command_on_its_validation_wells():
    from napari_instseg.cli.train import tuning_hint
    from napari_instseg.core.train import TrainConfig

    config = TrainConfig(data=["bbbc"], val_wells="A11-A12,B13", train_wells="A01")
    hint = tuning_hint("runs/x/best.safetensors", config)
    command = (
        "napari-instseg evaluate --model runs/x/best.safetensors --gt bbbc --wells A11-A12,B13"
    )
    assert command in hint and hint.endswith("--tta 8 --tune --write")


def test_a_config_file_or_object_behaves_like_the_flags(data, tmp_path, monkeypatch, capsys):
    """One folder as a str, and BBBC010's default wells dropped for training folders."""
    from napari_instseg.cli import main

    folder = _two_sample_folder(tmp_path / "tfx")
    monkeypatch.chdir(tmp_path)
    small = 'epochs = 1\nsteps_per_epoch = 1\nbatch_size = 1\ncrop_size = 64\ndevice = "cpu"\n'
    (tmp_path / "c.toml").write_text(f'data = "tfx"\nout = "tr2"\n{small}')
    assert TrainConfig.from_toml(tmp_path / "c.toml").data == ["tfx"]
    assert main(["train", "--config", "c.toml", "--no-progress"]) == 0, capsys.readouterr().err
    saved = TrainConfig.from_toml(tmp_path / "tr2" / "config.toml")
    assert (saved.data, saved.train_wells, saved.val_wells) == (["tfx"], "", "")
    config = TrainConfig(
        data=[str(folder)], epochs=1, steps_per_epoch=1, batch_size=1, crop_size=64, out="tr3"
    )
    assert train(config, progress=False).is_file()
    assert TrainConfig.from_toml(tmp_path / "tr3" / "config.toml").train_wells == ""
    # BBBC010's wells stay for a BBBC010 folder, a Path is one folder too
    bbbc = write_bbbc010_layout(tmp_path / "bbbc", ["A01"])
    assert TrainConfig(data=bbbc).data == [str(bbbc)]
    with pytest.raises(TypeError, match="data must be a folder path"):
        TrainConfig(data=b"tfx")
    with pytest.raises(TypeError, match="replay must hold folder paths"):
        TrainConfig(replay=["a", 3])


def test_a_run_that_fails_before_training_leaves_no_run_folder(data, tmp_path):
    out = tmp_path / "tr3"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train(tiny_config(tmp_path / "nowhere", out), progress=False)
    with pytest.raises(ValueError, match="no images named"):
        train(tiny_config(data, out, train_wells="Z01"), progress=False)
    with pytest.raises(ValueError, match="aligned_fraction"):
        train(tiny_config(data, out, aligned_fraction=2.0), progress=False)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        train(tiny_config(data, out, steps_per_epoch=0), progress=False)
    assert not out.exists()


def test_max_steps_cuts_the_last_epoch_short(data, tmp_path, monkeypatch):
    import napari_instseg.core.train as train_module

    calls = []
    loss = train_module.training_loss
    monkeypatch.setattr(
        train_module, "training_loss", lambda *a, **k: calls.append(1) or loss(*a, **k)
    )
    out = tmp_path / "short"
    train(tiny_config(data, out, epochs=5, steps_per_epoch=2, max_steps=3), progress=False)
    assert len(calls) == 3
    rows = _log(out)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert "val_grow_iou" in rows[-1]  # the short last epoch validates
    assert float(rows[-1]["lr"]) == pytest.approx(0.0, abs=1e-9)  # the schedule ends there


def test_cli_train_says_where_a_relative_data_folder_was_looked_for(tmp_path, monkeypatch, capsys):
    """A config's relative ``data`` is read from the current folder: the error says which."""
    from napari_instseg.cli import main

    config = tmp_path / "configs" / "run.toml"
    config.parent.mkdir()
    config.write_text('data = ["../shared/data/bbbc010"]\nepochs = 1\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "data folder ../shared/data/bbbc010 does not exist" in err
    assert f"read from the current folder, {elsewhere}" in err
    absent = tmp_path / "absent"
    assert main(["train", "--data", str(absent), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert f"data folder {absent} does not exist" in err and "current folder" not in err
    assert not (tmp_path / "run").exists()


def test_training_loss_makes_every_tensor_on_the_outputs_device():
    """A batch with an empty crop, untrusted pixels and every optional loss term, run with
    the default device set to ``meta``: any tensor the loss made without ``device=`` would
    land there (on a GPU: a CPU tensor beside CUDA ones, as the empty-crop classification
    targets once were) and fail or come back on the wrong device."""
    torch.manual_seed(0)
    model = InstSegNet(ModelConfig.from_dict(TINY_MODEL))
    x, offset = torch.randn(3, 1, 32, 32), torch.zeros(3, 2)
    worms = torch.zeros(2, 32, 32, dtype=torch.bool)
    worms[0, 2:10, 2:20] = True
    worms[1, 8:20, 15:18] = True
    empty = torch.zeros(0, 32, 32, dtype=torch.bool)
    trusted = torch.ones(3, 32, 32, dtype=torch.bool)
    trusted[1, :5] = False
    trusted[2, :, :3] = False
    config = TrainConfig(
        attraction_weight=0.1,
        contrast_weight=0.1,
        boundary_contact_weight=3.0,
        foreground_edge_weight=1.0,
    )
    generator = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        outputs = model(x, offset)
        assert {v.device for v in outputs.values()} == {x.device}
        terms = training_loss(
            outputs, [worms, empty, worms], trusted, config, model.config.taus, 0.2, generator
        )
        assert {v.device for v in terms.values()} == {x.device}
        terms["total"].backward()
    assert torch.isfinite(terms["total"])
    assert all(p.grad is None or p.grad.device == x.device for p in model.parameters())


def test_finetune_takes_a_torch_device_and_checks_it_first(data, tmp_path, monkeypatch):
    import napari_instseg.core.finetune as finetune_module
    from napari_instseg.core.finetune import finetune
    from napari_instseg.core.weights import save_model

    parent = save_model(InstSegNet(ModelConfig.from_dict(TINY_MODEL)), tmp_path / "p.safetensors")
    seen = []

    def record(config, **kwargs):
        seen.append(config.device)
        raise RuntimeError("stop here")

    monkeypatch.setattr(finetune_module, "train", record)
    out = tmp_path / "version"
    with pytest.raises(RuntimeError, match="stop here"):
        finetune([data], parent, replay=None, out=out, device=torch.device("cpu"))
    assert seen == ["cpu"]  # kept as text: the run's config is written as TOML
    with pytest.raises(ValueError, match="Unknown device"):
        finetune([data], parent, replay=None, out=tmp_path / "other", device="gpu")
    assert not (tmp_path / "other").exists()


def test_cli_train_says_the_torch_threads_it_trains_with(data, tmp_path, capsys):
    """The first line names the threads of ``--threads`` (or the config's), as the weights do."""
    from napari_instseg.cli import main
    from napari_instseg.core.weights import read_metadata

    config = tmp_path / "tiny.toml"
    tiny_config(data, tmp_path / "run", epochs=1, val_wells="").to_toml(config)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        argv = ["train", "--config", str(config), "--no-progress", "--threads", "2"]
        assert main(argv) == 0
        first = capsys.readouterr().out.splitlines()[0]
    finally:
        torch.set_num_threads(before)
    assert "2 torch threads" in first, first
    recorded = read_metadata(tmp_path / "run" / "best.safetensors")["training"]["hardware"]
    assert "2 torch threads" in recorded


def test_cli_train_no_amp_and_the_device_it_runs_on(data, tmp_path, capsys):
    import argparse

    from napari_instseg.cli import main
    from napari_instseg.cli.train import build_config, configure

    parser = argparse.ArgumentParser()
    configure(parser)
    assert build_config(parser.parse_args([])).amp is True
    assert build_config(parser.parse_args(["--no-amp"])).amp is False
    config = tmp_path / "tiny.toml"
    tiny_config(data, tmp_path / "run", epochs=1, val_wells="").to_toml(config)
    assert main(["train", "--config", str(config), "--no-progress", "--no-amp"]) == 0
    printed = capsys.readouterr().out
    assert "device cpu: " in printed and "CPU" in printed  # the resolved device, named
    if not torch.cuda.is_available():  # asking for a GPU that is not there: one clear line
        assert main(["train", "--config", str(config), "--device", "cuda"]) == 1
        assert "no CUDA GPU" in capsys.readouterr().err


def test_cli_train_says_when_it_resumes_or_has_nothing_to_do(data, tmp_path, capsys):
    from napari_instseg.cli import main
    from napari_instseg.core.train import checkpoint_epoch

    config = tmp_path / "tiny.toml"
    out = tmp_path / "run"
    tiny_config(data, out, epochs=1, val_wells="").to_toml(config)
    argv = ["train", "--config", str(config), "--no-progress"]
    assert checkpoint_epoch(out) is None
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "resuming" not in printed and "already" not in printed
    assert checkpoint_epoch(out) == 1
    assert main(argv) == 0  # again: the run is complete
    assert "has finished its 1 epochs already: nothing to train" in capsys.readouterr().out
    assert main([*argv, "--epochs", "2"]) == 0
    assert "resuming after epoch 1 from its checkpoint" in capsys.readouterr().out
    assert checkpoint_epoch(out) == 2
    assert main([*argv, "--no-resume"]) == 0
    printed = capsys.readouterr().out
    assert "resuming" not in printed and "already" not in printed
    (out / "last.ckpt.safetensors").write_bytes(b"not a checkpoint")
    assert checkpoint_epoch(out) is None
