"""Time a training step on BBBC010, split by part: crop making, the network, the loss.

Prepares the training images of a config exactly as ``train()`` does (its wells, the
model config's input normalisation, ``data_on_device``), draws crops from the same
random stream and prints milliseconds per crop and per step::

    OMP_NUM_THREADS=1 python benchmarks/train_step.py --steps 20
    python benchmarks/train_step.py --device cuda --steps 50
    python benchmarks/train_step.py --crops-only --reference   # the old random_crop

Parts of a crop: ``centre`` (the candidate windows' worm counts), ``image`` (bilinear
``grid_sample``), ``masks`` (nearest sampling of the masks and the trusted map),
``jitter`` (intensity gain, offset and numpy noise) and ``other`` (draws, coordinates).
Parts of a step: ``crops``, ``to device``, ``forward``, ``loss``, ``backward`` and
``optimizer``; parts of the loss, per crop: the embedding pairs, the classification
targets (masks grown from sampled pixels) and loss, the boundary target, the contact zone,
the boundary and foreground losses. On a GPU the parts are timed with
``torch.cuda.synchronize()`` between them, which slows the whole step a little.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from napari_instseg.core import losses as L  # noqa: E402
from napari_instseg.core import train as T  # noqa: E402
from napari_instseg.core.device import (  # noqa: E402
    autocast,
    get_device,
    memory_format,
    training_autocast_dtype,
)
from napari_instseg.core.model import InstSegNet, ModelConfig  # noqa: E402
from napari_instseg.core.scale import at_recorded_scale  # noqa: E402

TIMES: dict[str, list[float]] = defaultdict(list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(name: str, func: Callable, device: torch.device) -> Callable:
    """``func`` adding its wall time (ms) to ``TIMES[name]``."""

    def wrapper(*args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        result = func(*args, **kwargs)
        _sync(device)
        TIMES[name].append(1e3 * (time.perf_counter() - start))
        return result

    return wrapper


def reference_crop() -> Callable:
    """``random_crop`` before it was sped up (tests/test_train_crops.py)."""
    spec = importlib.util.spec_from_file_location(
        "test_train_crops", REPO / "tests" / "test_train_crops.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_random_crop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs/bbbc010_v10_contact.toml"))
    parser.add_argument("--data", default="/work/shared/data/bbbc010")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after 2 warm-up)")
    parser.add_argument("--epoch", type=int, default=10, help="sets the classification weight")
    parser.add_argument("--crops-only", action="store_true", help="no network, loss or step")
    parser.add_argument("--reference", action="store_true", help="the old random_crop")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: config's)")
    parser.add_argument("--data-on-device", choices=["auto", "yes", "no"], default="auto")
    args = parser.parse_args(argv)

    config = T.TrainConfig.from_toml(args.config)
    config.data = [args.data]
    config.device = args.device
    config.data_on_device = {"auto": "auto", "yes": True, "no": False}[args.data_on_device]
    config = T.default_wells(config)
    if args.threads or config.num_threads:
        torch.set_num_threads(args.threads or config.num_threads)
    device = get_device(config.device)
    on = T.data_device(config, device)
    names = T.parse_names(config.train_wells) if config.train_wells else None
    val = set(T.parse_names(config.val_wells)) if config.val_wells else set()
    samples = [s for s in T.load_samples(config.data, names) if s.name not in val]
    model_config = ModelConfig.from_dict(config.model) if config.model else ModelConfig()
    start = time.perf_counter()
    items = [T.prepare(at_recorded_scale(s), model_config=model_config) for s in samples]
    prepare_s = time.perf_counter() - start
    items = [item.to(on) for item in items]
    draw_p = T.image_draw_probabilities(
        [s.name for s in samples], config.oversample_wells, config.oversample_factor
    )
    n_masks = [item.masks.shape[0] for item in items]
    print(
        f"{len(items)} images {tuple(items[0].image.shape[1:])}, {sum(n_masks)} masks; "
        f"prepare {1e3 * prepare_s / len(items):.0f} ms per image; device {device}, data on {on}; "
        f"{torch.get_num_threads()} torch threads; crops of {config.crop_size} px, "
        f"batch {config.batch_size}"
    )

    crop = reference_crop() if args.reference else T.random_crop
    if not args.reference:  # the parts (module functions random_crop calls)
        for name, attr in [
            ("centre", "window_count"),
            ("image", "_sample_image"),
            ("masks", "_sample_masks"),
            ("jitter", "_jitter"),
        ]:
            setattr(T, attr, timed(f"crop {name}", getattr(T, attr), device))
    crop = timed("crop", crop, device)
    # the loss's parts, per crop (training_loss calls them once per crop of the batch)
    for name, module, attr in [
        ("embedding", T, "_embedding_term"),
        ("class targets", L, "grown_mask_targets"),
        ("classification", L, "classification_loss"),
        ("boundary target", L, "boundary_target"),
        ("contact zone", L, "contact_zone"),
        ("boundary", L, "balanced_boundary_loss"),
        ("foreground", L, "foreground_loss"),
    ]:
        setattr(module, attr, timed(f"loss {name}", getattr(module, attr), device))

    model = InstSegNet(model_config).to(device).train()
    layout = memory_format(device)
    model.to(memory_format=layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    amp_dtype = training_autocast_dtype(device, config.amp, config.cpu_amp)
    cls_weight = L.lambda_ramp(
        args.epoch, config.lambda_start, config.lambda_end, config.lambda_max
    )
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    def step() -> None:
        def draw():
            out = []
            for _ in range(config.batch_size):
                if config.oversample_wells:
                    index = rng.choice(len(items), p=draw_p)
                else:
                    index = rng.integers(len(items))
                out.append(crop(items[index], config, rng))
            return out

        crops = timed("step crops", draw, device)()
        if args.crops_only:
            return

        def move():
            x = torch.stack([c[0] for c in crops]).to(device).contiguous(memory_format=layout)
            masks = [c[1].to(device) for c in crops]
            trusted = torch.stack([c[2] for c in crops]).to(device)
            offset = torch.from_numpy(rng.uniform(0, 1024, (len(crops), 2)).astype(np.float32))
            return x, masks, trusted, offset.to(device)

        x, masks, trusted, offset = timed("step to device", move, device)()

        def forward():
            with autocast(device, amp_dtype):
                return model(x, offset)

        outputs = timed("step forward", forward, device)()
        terms = timed("step loss", T.training_loss, device)(
            outputs, masks, trusted, config, model.config.taus, cls_weight, generator
        )
        timed("step backward", lambda: terms["total"].backward(), device)()

        def update():
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        timed("step optimizer", update, device)()

    for _ in range(2):  # warm-up
        step()
    TIMES.clear()
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    per_step = 1e3 * (time.perf_counter() - start) / args.steps

    def line(name: str, values: list[float]) -> str:
        return (
            f"  {name:18s} {statistics.mean(values):8.2f} ms mean "
            f"{statistics.median(values):8.2f} median  (n={len(values)})"
        )

    print(f"per crop ({'reference' if args.reference else 'current'} random_crop):")
    for name in sorted(k for k in TIMES if k.startswith("crop")):
        print(line(name[len("crop ") :] if name != "crop" else "total", TIMES[name]))
    crop_total = sum(TIMES["crop"])
    parts = sum(sum(v) for k, v in TIMES.items() if k.startswith("crop "))
    if parts:
        print(f"  {'other':18s} {(crop_total - parts) / len(TIMES['crop']):8.2f} ms mean")
    if any(k.startswith("loss ") for k in TIMES):
        print("loss parts, per crop (forward only; their backward is in backward):")
        for name in sorted(k for k in TIMES if k.startswith("loss ")):
            print(line(name[len("loss ") :], TIMES[name]))
    print("per step:")
    for name in sorted(k for k in TIMES if k.startswith("step")):
        print(line(name[len("step ") :], TIMES[name]))
    print(f"  {'whole step':18s} {per_step:8.2f} ms")
    total = config.epochs * config.steps_per_epoch
    if config.max_steps:
        total = min(total, config.max_steps)
    crop_share = statistics.mean(TIMES["step crops"]) * total / 60e3
    print(
        f"{total} steps: crops {crop_share:.1f} min"
        + ("" if args.crops_only else f", whole steps {per_step * total / 60e3:.1f} min")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
