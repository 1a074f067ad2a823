"""Saving and loading weights: safetensors + JSON metadata, never pickle."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from napari_instseg.core.model import InstSegNet, ModelConfig
from napari_instseg.core.weights import (
    load_model,
    model_signature,
    read_metadata,
    save_model,
    shipped_weights_path,
    state_signature,
)

TINY = ModelConfig(channels=(8, 16), embedding_dim=4, head_channels=8)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = InstSegNet(TINY).eval()
    # make BatchNorm statistics non-trivial so a partial load would show
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = save_model(model, tmp_path / "tiny.safetensors", {"name": "tiny", "metrics": {"x": 1}})
    return model, path


def test_round_trip_identical_outputs(saved):
    model, path = saved
    assert path.is_file() and path.with_suffix(".json").is_file()
    loaded = load_model(path)
    assert not loaded.training
    x = torch.randn(1, 1, 16, 24)
    with torch.no_grad():
        a, b = model(x, (4, 8)), loaded(x, (4, 8))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert loaded.source == str(path)
    assert model_signature(loaded) == model_signature(model)


def test_metadata_fields(saved):
    model, path = saved
    meta = read_metadata(path)
    assert meta["architecture"] == TINY.to_dict()
    assert meta["normalization"]["method"] == "percentile"
    assert meta["normalization"]["low"] < meta["normalization"]["high"]
    assert meta["sha256"] == state_signature(model.state_dict())
    assert len(meta["sha256"]) == 64
    assert meta["name"] == "tiny" and meta["metrics"] == {"x": 1}
    assert meta["format"].startswith("napari-instseg-weights")
    assert load_model(path).metadata == meta


def test_save_adds_suffix(tmp_path):
    path = save_model(InstSegNet(TINY), tmp_path / "sub" / "model")
    assert path.name == "model.safetensors" and path.is_file()


def test_signature_changes_with_weights(saved):
    model, _ = saved
    before = model_signature(model)
    with torch.no_grad():
        next(model.parameters())[0].add_(1.0)
    assert model_signature(model) != before


def test_lone_safetensors_loads_from_header(saved):
    model, path = saved
    path.with_suffix(".json").unlink()
    meta = read_metadata(path)
    assert meta["architecture"]["embedding_dim"] == 4
    loaded = load_model(path)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x)["embeddings"], loaded(x)["embeddings"])


def test_json_left_beside_other_weights_is_not_used(saved, tmp_path):
    """Copying new weights over old ones must not keep the old ones' metadata."""
    _, path = saved
    torch.manual_seed(1)
    other = save_model(InstSegNet(TINY), tmp_path / "new" / "w.safetensors", {"name": "new"})
    shutil.copyfile(other, path)  # the old tiny.json stays beside it
    with pytest.warns(UserWarning, match="describes other weights"):
        meta = read_metadata(path)
    assert (
        meta["name"] == "new"
        and meta["sha256"] != json.loads(path.with_suffix(".json").read_text())["sha256"]
    )
    edited = json.loads(other.with_suffix(".json").read_text())
    edited["name"] = "edited by hand"  # an edited JSON of the same weights is used
    other.with_suffix(".json").write_text(json.dumps(edited))
    assert read_metadata(other)["name"] == "edited by hand"


def test_folder_with_one_file_loads(saved, tmp_path):
    _, path = saved
    assert load_model(tmp_path).source == str(path)
    save_model(InstSegNet(TINY), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="2 .safetensors"):
        load_model(tmp_path)


def test_architecture_mismatch_is_a_clear_error(saved):
    _, path = saved
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text())
    meta["architecture"]["embedding_dim"] = 6
    side.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not fit the architecture"):
        load_model(path)
    meta["architecture"]["embeding_dim"] = 6  # misspelt key
    side.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="Unknown model config keys"):
        load_model(path)


def test_missing_metadata(tmp_path, saved):
    model, _ = saved
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bare))
    with pytest.raises(ValueError, match="no napari-instseg metadata"):
        load_model(bare)
    no_arch = tmp_path / "noarch.safetensors"
    save_file({"a": torch.zeros(2)}, str(no_arch), metadata={"napari_instseg": "{}"})
    with pytest.raises(ValueError, match="architecture"):
        load_model(no_arch)


def test_garbage_file(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"this is not a safetensors file at all" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_model(bad)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope.safetensors")


def test_pickle_is_never_loaded(tmp_path, saved, monkeypatch):
    model, path = saved
    evil = tmp_path / "evil.safetensors"
    torch.save(model.state_dict(), evil)  # a pickle under a safetensors name
    # with the real metadata beside it, the tensors still have to be safetensors
    evil.with_suffix(".json").write_text(path.with_suffix(".json").read_text())

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load (pickle) must never be called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_model(evil)
    evil.with_suffix(".json").unlink()
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_model(evil)


def test_shipped_weights():
    path = shipped_weights_path()
    if not path.is_file():
        pytest.skip("shipped weights napari_instseg/weights/bbbc010.safetensors not added yet")
    model = load_model()
    assert model.source == str(path)
    training = model.metadata["training"]
    wells = training.get("train_wells")
    assert wells, "shipped weights must name their training wells"
    from napari_instseg.core.train import parse_names

    test_wells = set(parse_names("C03-E04"))
    assert not set(parse_names(wells)) & test_wells, "trained on test wells"
    x = torch.zeros(1, model.config.network_channels, 32, 32)
    with torch.no_grad():
        out = model(x)
    assert out["embeddings"].shape[1] == model.config.embedding_dim


def test_an_unknown_device_is_a_clear_error(saved):
    _, path = saved
    with pytest.raises(ValueError, match="Unknown device 'gpu'; choose one of auto"):
        load_model(path, device="gpu")
    assert next(load_model(path, device="auto").parameters()).device.type in ("cpu", "cuda", "mps")
