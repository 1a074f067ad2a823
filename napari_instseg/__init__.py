"""napari-instseg: instance segmentation of long, touching, overlapping objects.

The public API is importable from the top-level package; it never imports napari or Qt,
so it works in scripts, notebooks and on clusters::

    import napari_instseg as nis

    model = nis.load_model()                    # shipped BBBC010 bright-field weights
    prediction = nis.predict(image, model)      # embeddings, seediness, class scores, ...
    instances = nis.segment(prediction)         # the model's tuned method
    row, col = instances.seeds[0]               # a pixel on a worm: where a user clicks
    mask = nis.grow(prediction, seeds=[(row, col)], tau=0.5)
    mask = nis.grow_from_segments(prediction, seeds=[(row, col)])

Names are resolved lazily so that ``import napari_instseg`` (done by napari at start-up to
read the plugin manifest) stays cheap and does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_API: dict[str, str] = {
    "get_device": "napari_instseg.core.device",
    "Prediction": "napari_instseg.core.types",
    "Instances": "napari_instseg.core.types",
    "Sample": "napari_instseg.core.types",
    "load_model": "napari_instseg.core.weights",
    "save_model": "napari_instseg.core.weights",
    "predict": "napari_instseg.core.predict",
    "segment": "napari_instseg.core.instances",
    "grow": "napari_instseg.core.grow",
    "similarity": "napari_instseg.core.grow",
    "grow_instances": "napari_instseg.core.grow",
    "grow_from_segments": "napari_instseg.core.pick",
    "WormSeeds": "napari_instseg.core.grow",
    "BackgroundSeedWarning": "napari_instseg.core.grow",
    "measure": "napari_instseg.core.measure",
    "evaluate": "napari_instseg.core.evaluate",
    "train": "napari_instseg.core.train",
    "finetune": "napari_instseg.core.finetune",
    "list_model_versions": "napari_instseg.core.finetune",
    "run_batch": "napari_instseg.core.batch",
    "read_image": "napari_instseg.core.io",
    "read_bbbc010": "napari_instseg.core.io",
    "read_seed_table": "napari_instseg.core.io",
    "read_training_folder": "napari_instseg.core.training_folder",
    "write_training_folder": "napari_instseg.core.training_folder",
    "make_worms": "napari_instseg.core.synthetic",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    """Import public API names on first use."""
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'napari_instseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
