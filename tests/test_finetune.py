"""Fine-tuning from exported training folders and the model versions it leaves."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_instseg.core.finetune import (
    finetune,
    list_model_versions,
    remove_model_version,
    split_holdout,
)
from napari_instseg.core.model import InstSegNet, ModelConfig
from napari_instseg.core.synthetic import make_worms
from napari_instseg.core.train import freeze_parameters, parse_names
from napari_instseg.core.training_folder import write_training_folder
from napari_instseg.core.weights import load_model, read_metadata, save_model


@pytest.fixture()
def export(tmp_path):
    samples = []
    for i in range(3):
        s = make_worms((96, 96), n_worms=3, length=(40, 60), n_crossings=0, seed=i)
        reviewed = np.ones(len(s.masks), bool)
        reviewed[0] = i != 0  # image-0's first worm is not reviewed
        samples.append(dataclasses.replace(s, name=f"corrected-{i}", reviewed=reviewed))
    return write_training_folder(tmp_path / "export", samples, model="parent")


@pytest.fixture()
def parent(tmp_path):
    torch.manual_seed(0)
    model = InstSegNet(ModelConfig(channels=(8, 8, 8), embedding_dim=4, head_channels=8))
    meta = {
        "name": "tiny",
        "recommended_method": "boundary",
        "recommended_tta": 8,
        "segment_params": {"boundary": {"boundary_threshold": 0.8, "marker_threshold": 0.5}},
    }
    return save_model(model, tmp_path / "tiny.safetensors", meta)


def test_split_holdout_sizes_and_errors():
    assert split_holdout(["a"], 0.2) == (["a"], [])
    train, val = split_holdout(["a", "b", "c", "d", "e"], 0.2, seed=3)
    assert len(val) == 1 and sorted(train + val) == ["a", "b", "c", "d", "e"]
    assert split_holdout(list("abcde"), 0.2, seed=3) == (train, val)  # reproducible
    assert len(split_holdout(list("abcdefghij"), 0.3)[1]) == 3
    assert split_holdout(list("ab"), 0.9)[0]  # never everything held out
    with pytest.raises(ValueError, match="unique"):
        split_holdout(["a", "a"])
    with pytest.raises(ValueError, match="val_fraction"):
        split_holdout(["a", "b"], 1.0)


def test_parse_names_keeps_dashed_image_names():
    assert parse_names("corrected-1,A01-A03") == ["corrected-1", "A01", "A02", "A03"]


def test_freeze_parameters():
    model = InstSegNet(ModelConfig(channels=(8, 8, 8), embedding_dim=4))
    heads_only = freeze_parameters(model, "backbone")
    assert heads_only and all(p.requires_grad for p in heads_only)
    assert not any(p.requires_grad for p in model.encoders.parameters())
    assert not any(p.requires_grad for p in model.decoders.parameters())
    enc = freeze_parameters(model, "encoder")
    assert any(p.requires_grad for p in model.decoders.parameters())
    assert len(enc) > len(heads_only)
    assert len(freeze_parameters(model, "")) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="freeze"):
        freeze_parameters(model, "all")


def test_finetune_makes_a_version_beside_the_data(export, parent):
    rows = []
    version = finetune(
        [export],
        parent,
        steps=4,
        steps_per_epoch=2,
        batch_size=2,
        crop_size=64,
        freeze="encoder",
        num_threads=1,
        device="cpu",
        callback=rows.append,
    )
    assert version.path == export / "models" / "tiny-ft1" / "model.safetensors"
    assert len(rows) == 2 and all("val_ap" in r and "loss_total" in r for r in rows)
    meta = read_metadata(version.path)
    assert meta["parent"]["name"] == "tiny"
    assert sorted(meta["data"]["train"] + meta["data"]["val"]) == [
        "corrected-0",
        "corrected-1",
        "corrected-2",
    ]
    assert len(meta["data"]["val"]) == 1
    assert meta["recommended_method"] == "boundary" and meta["recommended_tta"] == 8
    assert meta["segment_params"]["boundary"]["marker_threshold"] == 0.5
    assert (version.path.parent / "log.csv").is_file()
    assert not (version.path.parent / "last.ckpt.safetensors").exists()
    # the frozen encoder did not move, the rest did
    before, after = load_model(parent).state_dict(), load_model(version.path).state_dict()
    enc = [k for k in before if k.startswith("encoders.") and k.endswith("weight")]
    heads = [k for k in before if k.startswith("embedding_head.") and k.endswith("weight")]
    assert all(torch.equal(before[k], after[k]) for k in enc)
    assert any(not torch.equal(before[k], after[k]) for k in heads)
    # a second run gets the next name; both are listed newest first
    second = finetune(
        [export],
        parent,
        steps=2,
        steps_per_epoch=2,
        batch_size=1,
        crop_size=64,
        num_threads=1,
        device="cpu",
        val_names=["corrected-2"],
    )
    assert second.name == "tiny-ft2"
    assert [v.name for v in list_model_versions(export)][:2] == ["tiny-ft2", "tiny-ft1"]
    assert version.label.startswith("tiny-ft1 (3 images")
    remove_model_version(second)
    assert [v.name for v in list_model_versions(export)] == ["tiny-ft1"]


def test_finetune_errors(export, parent, tmp_path):
    with pytest.raises(FileNotFoundError, match="data folder"):
        finetune([tmp_path / "nowhere"], parent)
    with pytest.raises(FileNotFoundError, match="parent"):
        finetune([export], tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not in the data"):
        finetune([export], parent, val_names=["nope"])
    with pytest.raises(ValueError, match="freeze"):
        finetune([export], parent, freeze="everything")


def test_failed_finetune_leaves_no_empty_version(export, parent, monkeypatch):
    import napari_instseg.core.finetune as finetune_module

    with pytest.raises(ValueError, match="replay_fraction"):
        finetune([export], parent, replay=None, replay_fraction=2)
    assert not (export / "models").exists()  # checked before the version folder is made

    def failing_train(config, **kwargs):  # fails after writing the run's config
        from pathlib import Path

        Path(config.out).mkdir(parents=True, exist_ok=True)  # (claimed by finetune)
        config.to_toml(Path(config.out) / "config.toml")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(finetune_module, "train", failing_train)
    with pytest.raises(RuntimeError, match="out of memory"):
        finetune([export], parent, replay=None, device="cpu")
    assert not (export / "models" / "tiny-ft1").exists()
    monkeypatch.undo()
    version = finetune(
        [export], parent, steps=1, batch_size=1, crop_size=64, num_threads=1, device="cpu"
    )
    assert version.name == "tiny-ft1"  # the failed runs took no number


def test_two_finetunes_at_once_take_two_version_names(export, parent, monkeypatch):
    import napari_instseg.core.finetune as finetune_module
    from napari_instseg.core.finetune import _claim_next_name

    folder = export / "models"
    assert [_claim_next_name(folder, "tiny") for _ in range(2)] == ["tiny-ft1", "tiny-ft2"]
    assert (folder / "tiny-ft1").is_dir() and (folder / "tiny-ft2").is_dir()
    for claimed in ("tiny-ft1", "tiny-ft2"):
        (folder / claimed).rmdir()

    # a run that starts while another one's folder is claimed (no weights yet) takes the
    # next name; and one that fails before training gives its claim back
    (folder / "tiny-ft1").mkdir()
    names = []

    def record(config, **kwargs):
        names.append(Path(config.out).name)
        raise RuntimeError("stop here")

    monkeypatch.setattr(finetune_module, "train", record)
    with pytest.raises(RuntimeError, match="stop here"):
        finetune([export], parent, replay=None, device="cpu")
    assert names == ["tiny-ft2"] and not (folder / "tiny-ft2").exists()
    monkeypatch.setattr(finetune_module, "TrainConfig", None)  # fails before train()
    with pytest.raises(TypeError):
        finetune([export], parent, replay=None, device="cpu")
    assert sorted(p.name for p in folder.iterdir()) == ["tiny-ft1"]


def test_version_label_says_image_or_images(tmp_path):
    from napari_instseg.core.finetune import ModelVersion

    def label(n):
        return ModelVersion("v", tmp_path, "p", "", {}, [f"i{k}" for k in range(n)]).label

    assert label(1) == "v (1 image)" and label(3) == "v (3 images)"


def test_finetune_takes_a_single_folder_as_a_str(export, parent, monkeypatch):
    monkeypatch.chdir(export.parent)
    version = finetune(
        export.name, parent, steps=1, batch_size=1, crop_size=64, num_threads=1, device="cpu"
    )
    assert version.path.resolve() == export / "models" / "tiny-ft1" / "model.safetensors"
    assert read_metadata(version.path)["data"]["folders"] == [export.name]


def test_finetune_cli(export, parent, capsys):
    from napari_instseg.cli import main

    code = main(
        [
            "finetune",
            str(export),
            "--model",
            str(parent),
            "--steps",
            "2",
            "--threads",
            "1",
            "--device",
            "cpu",
            "--name",
            "cli-version",
        ]
    )
    assert code == 0
    assert (export / "models" / "cli-version" / "model.safetensors").is_file()
    assert main(["finetune", str(export), "--list"]) == 0
    assert "cli-version" in capsys.readouterr().out
    assert main(["finetune", str(export), "--model", str(export / "nope.safetensors")]) == 1


@pytest.fixture()
def replay_folder(tmp_path):
    """Earlier training images, 80 x 80 so that crops taken from them can be told apart."""
    samples = [
        dataclasses.replace(make_worms((80, 80), n_worms=3, length=(30, 50), seed=10 + i), name=n)
        for i, n in enumerate(["old-0", "old-1"])
    ]
    return write_training_folder(tmp_path / "old", samples, model="none")


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_finetune_replay_mixes_the_parents_images(export, parent, replay_folder, fraction):
    import napari_instseg.core.train as train_module

    shapes = []
    real_crop = train_module.random_crop

    def recording_crop(item, config, rng):
        shapes.append(tuple(item.image.shape[1:]))
        return real_crop(item, config, rng)

    # the parent records where it was trained (relative to the folder above the weights)
    meta = read_metadata(parent)
    meta["training"] = {"data": [replay_folder.name], "train_wells": "old-0,old-1"}
    save_model(load_model(parent), parent, meta)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "random_crop", recording_crop)
        version = finetune(
            [export],
            parent,
            steps=8,
            steps_per_epoch=8,
            batch_size=4,
            crop_size=48,
            num_threads=1,
            device="cpu",
            replay="parent",
            replay_fraction=fraction,
        )
    replayed = sum(s == (80, 80) for s in shapes)
    assert len(shapes) == 32
    if fraction == 0.0:
        assert replayed == 0
    elif fraction == 1.0:
        assert replayed == 32
    else:
        assert 4 <= replayed <= 28
    recorded = read_metadata(version.path)["finetune"]["replay"]
    assert recorded["fraction"] == fraction and recorded["names"] == "old-0,old-1"


def test_parent_training_data_found_or_not(export, parent, replay_folder, tmp_path):
    from napari_instseg.core.finetune import parent_training_data

    assert parent_training_data(parent) is None  # nothing recorded
    meta = read_metadata(parent)
    meta["training"] = {"data": [str(replay_folder)], "train_wells": "old-0"}
    save_model(load_model(parent), parent, meta)
    folders, names = parent_training_data(parent)
    assert folders == [replay_folder.resolve()] and names == "old-0"
    meta["training"] = {"data": [str(tmp_path / "gone")], "train_wells": ""}
    save_model(load_model(parent), parent, meta)
    assert parent_training_data(parent) is None
    with pytest.raises(FileNotFoundError, match="not on this computer"):
        finetune([tmp_path], parent, replay="parent")
    # the default ("auto") goes on without replay when the parent's images are gone
    version = finetune(
        [export], parent, steps=2, steps_per_epoch=2, batch_size=1, crop_size=48, device="cpu"
    )
    assert read_metadata(version.path)["finetune"]["replay"] is None


def test_finetune_reads_a_folder_without_manifest(export, parent, tmp_path):
    import shutil

    plain = tmp_path / "tf"
    for sub in ("images", "masks"):
        shutil.copytree(export / sub, plain / sub)
    version = finetune(
        plain, parent, steps=1, batch_size=1, crop_size=64, num_threads=1, device="cpu"
    )
    assert version.path == plain / "models" / "tiny-ft1" / "model.safetensors"
    assert len(version.images) == 3


@pytest.mark.parametrize("name", ["../../evil", "a/b", "a\\b", "..", ".", "", " ", ".hidden"])
def test_finetune_refuses_version_names_that_are_not_a_folder_name(export, parent, name):
    with pytest.raises(ValueError, match="name"):
        finetune(export, parent, name=name, steps=1, device="cpu")
    assert not (export / "models").exists()
    assert not (export.parent / "evil").exists()


def test_finetune_cli_refuses_a_name_with_a_path(export, parent, capsys):
    from napari_instseg.cli import main

    argv = ["finetune", str(export), "--model", str(parent), "--steps", "1"]
    assert main([*argv, "--name", "../../evil"]) == 1
    assert "name '../../evil'" in capsys.readouterr().err
    assert not (export / "models").exists()


def test_finetune_wrong_types_name_the_argument(export, parent):
    with pytest.raises(TypeError, match="data must be a folder path"):
        finetune(b"export", parent)
    with pytest.raises(TypeError, match="data must hold folder paths"):
        finetune([export, 3], parent)
    with pytest.raises(TypeError, match="steps must be an int"):
        finetune(export, parent, steps="10")
    with pytest.raises(TypeError, match="lr must be a number"):
        finetune(export, parent, lr="0.1")
    with pytest.raises(TypeError, match="init must be a path"):
        finetune(export, b"tiny.safetensors")
    with pytest.raises(TypeError, match="name must be a str"):
        finetune(export, parent, name=3)
    with pytest.raises(TypeError, match="replay must be a folder path"):
        finetune(export, parent, replay=b"x")
    with pytest.raises(ValueError, match=r"not in the data: \['nope'\]"):  # one name
        finetune(export, parent, val_names="nope")
    assert not (export / "models").exists()


def _count_steps(monkeypatch, interrupt_at: int | None = None) -> list[int]:
    """Count the training steps; raise KeyboardInterrupt (Ctrl-C) at step ``interrupt_at``."""
    import napari_instseg.core.train as train_module

    calls: list[int] = []
    loss = train_module.training_loss

    def counting(*args, **kwargs):
        calls.append(1)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "training_loss", counting)
    return calls


def test_finetune_trains_exactly_the_steps_asked(export, parent, monkeypatch):
    calls = _count_steps(monkeypatch)
    rows = []
    version = finetune(
        export,
        parent,
        steps=5,
        steps_per_epoch=2,
        batch_size=1,
        crop_size=64,
        num_threads=1,
        device="cpu",
        callback=rows.append,
    )
    assert len(calls) == 5
    assert len(rows) == 3 and "val_ap" in rows[-1]
    assert read_metadata(version.path)["finetune"]["steps"] == 5


def test_ctrl_c_keeps_the_best_weights_so_far(export, parent, monkeypatch, capsys):
    from napari_instseg.cli import main
    from napari_instseg.core.finetune import FinetuneInterrupted

    kw = {"steps": 6, "steps_per_epoch": 2, "batch_size": 1, "crop_size": 64, "device": "cpu"}
    _count_steps(monkeypatch, interrupt_at=3)  # in the second epoch
    with pytest.raises(FinetuneInterrupted) as caught:
        finetune(export, parent, num_threads=1, **kw)
    version = caught.value.version
    assert isinstance(caught.value, KeyboardInterrupt)
    assert version.path == export / "models" / "tiny-ft1" / "model.safetensors"
    assert read_metadata(version.path)["finetune"]["interrupted"] is True
    assert not (version.path.parent / "last.ckpt.safetensors").exists()
    assert [v.name for v in list_model_versions(export)] == ["tiny-ft1"]

    # the command line: one line, status 130, the version registered
    _count_steps(monkeypatch, interrupt_at=21)  # the command line's epochs are 20 steps
    argv = ["finetune", str(export), "--model", str(parent), "--steps", "40", "--device", "cpu"]
    assert main([*argv, "--threads", "1"]) == 130
    out = capsys.readouterr().out
    assert "interrupted: kept model version tiny-ft2" in out
    assert (export / "models" / "tiny-ft2" / "model.safetensors").is_file()
    # before any weights were kept: no version, no empty folder
    _count_steps(monkeypatch, interrupt_at=1)
    assert main([*argv, "--threads", "1"]) == 130
    assert "no model version" in capsys.readouterr().out
    assert not (export / "models" / "tiny-ft3").exists()
    _count_steps(monkeypatch, interrupt_at=1)
    with pytest.raises(KeyboardInterrupt):
        finetune(export, parent, num_threads=1, **kw)
    assert not (export / "models" / "tiny-ft3").exists()


def test_finetune_cli_says_what_it_replayed(export, parent, replay_folder, capsys):
    """The default replay goes on silently without the parent's images: the CLI says which."""
    from napari_instseg.cli import main

    argv = ["finetune", str(export), "--model", str(parent), "--steps", "2"]
    argv += ["--threads", "1", "--device", "cpu"]
    assert main(argv) == 0  # the parent records no training images
    out = capsys.readouterr().out
    assert "replay: none (the parent's training images were not found on this computer" in out
    assert main([*argv, "--no-replay"]) == 0
    assert "replay: none (--no-replay)" in capsys.readouterr().out
    meta = read_metadata(parent)
    meta["training"] = {"data": [str(replay_folder)], "train_wells": "old-0,old-1"}
    save_model(load_model(parent), parent, meta)
    assert main([*argv, "--replay-fraction", "0.3"]) == 0
    out = capsys.readouterr().out
    assert f"replay: {replay_folder.resolve()} (old-0,old-1), 30% of the crops" in out


def test_finetune_refuses_folders_with_no_reviewed_worm(tmp_path, parent, capsys):
    """No worm reviewed: the loss would see background only. Said, as the widget says it."""
    from napari_instseg.cli import main

    samples = [
        dataclasses.replace(
            make_worms((96, 96), n_worms=2, length=(40, 60), n_crossings=0, seed=i),
            name=f"unchecked-{i}",
            reviewed=np.zeros(2, bool),
        )
        for i in range(2)
    ]
    folder = write_training_folder(tmp_path / "unchecked", samples, model="parent")
    with pytest.raises(
        ValueError, match="none of the 4 worms in these folders is marked reviewed"
    ):
        finetune(folder, parent, steps=1, device="cpu")
    assert not (folder / "models").exists()  # no version made
    argv = ["finetune", str(folder), "--model", str(parent), "--steps", "1", "--device", "cpu"]
    assert main(argv) == 1
    assert "nothing to learn from" in capsys.readouterr().err
    # one reviewed worm is enough to learn from
    samples[1].reviewed[0] = True
    write_training_folder(folder, samples[1:], model="parent", overwrite=True)
    version = finetune(folder, parent, steps=1, batch_size=1, crop_size=48, device="cpu")
    assert version.path.is_file()


def test_a_second_round_replays_what_the_first_replayed(export, parent, replay_folder, tmp_path):
    """Round 2 from a fine-tuned parent replays round 1's replay images, not the corrections.

    A fine-tuned model's ``training.data`` is the user's own export, which round 2 trains on
    again; replaying it would leave the images the chain started from out.
    """
    from napari_instseg.core.finetune import parent_training_data

    meta = read_metadata(parent)
    meta["training"] = {"data": [str(replay_folder)], "train_wells": "old-0,old-1"}
    save_model(load_model(parent), parent, meta)
    common = {"steps": 1, "batch_size": 1, "crop_size": 48, "device": "cpu"}
    first = finetune(export, parent, **common)
    recorded = read_metadata(first.path)["finetune"]["replay"]
    assert recorded["folders"] == [str(replay_folder.resolve())]
    # the version's own training data is the export
    assert read_metadata(first.path)["training"]["data"] == [str(export)]
    assert parent_training_data(first.path) == ([replay_folder.resolve()], "old-0,old-1")
    second = finetune(export, first.path, **common)
    again = read_metadata(second.path)["finetune"]["replay"]
    assert again["folders"] == [str(replay_folder.resolve())]
    assert again["names"] == "old-0,old-1"
    # a round whose parent did not replay looks further up the chain
    third = finetune(export, second.path, replay=None, **common)
    assert read_metadata(third.path)["finetune"]["replay"] is None
    assert parent_training_data(third.path) == ([replay_folder.resolve()], "old-0,old-1")
    # the images trained on now are never replayed as well
    meta["training"] = {"data": [str(export)], "train_wells": ""}
    save_model(load_model(parent), parent, meta)
    fourth = finetune(export, parent, **common)
    assert read_metadata(fourth.path)["finetune"]["replay"] is None


def test_auto_replay_is_left_out_where_the_parent_fails_on_the_corrections(
    export, parent, replay_folder, monkeypatch, capsys
):
    """Images unlike the parent's own (it scores little on them): replay held fine-tuning
    back in the benchmark, so ``replay="auto"`` leaves it out, records why and says so."""
    import napari_instseg.core.finetune as finetune_module
    from napari_instseg.cli import main

    meta = read_metadata(parent)
    meta["training"] = {"data": [str(replay_folder)], "train_wells": "old-0,old-1"}
    meta["metrics"] = {"val_ap": 0.9}  # what it scores on its own validation images
    save_model(load_model(parent), parent, meta)
    common = {"steps": 1, "batch_size": 1, "crop_size": 48, "device": "cpu"}
    # the untrained parent finds nothing on the held-out correction: AP 0 < 0.5 * 0.9
    version = finetune(export, parent, **common)
    tuned = read_metadata(version.path)["finetune"]
    assert tuned["replay"] is None and tuned["parent_val_ap"] < 0.45
    assert "less than 50% of its own 0.90" in tuned["replay_skipped"]
    # asked for explicitly, the parent's images are replayed all the same
    version = finetune(export, parent, replay="parent", **common)
    assert read_metadata(version.path)["finetune"]["replay"]["folders"]
    # a parent that does about as well on the corrections as on its own images: replayed
    monkeypatch.setattr(finetune_module, "score_on", lambda *a, **k: 0.6)
    version = finetune(export, parent, **common)
    tuned = read_metadata(version.path)["finetune"]
    assert tuned["replay"]["folders"] == [str(replay_folder.resolve())]
    assert tuned["parent_val_ap"] == 0.6 and "replay_skipped" not in tuned
    monkeypatch.setattr(finetune_module, "score_on", lambda *a, **k: 0.1)
    argv = ["finetune", str(export), "--model", str(parent), "--steps", "1", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "replay: none (the parent scores AP 0.10 on the held-out corrections" in out
    assert "--replay parent replays them anyway" in out
