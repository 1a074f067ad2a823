"""Novotny et al.'s synthetic check: identical dots, plain vs semi-convolutional embeddings.

A grid of identical discs, each its own instance. A translation-equivariant network gives
every disc the same embedding, so a mask grown from one disc's centre takes in all of
them; adding the global pixel coordinates to the embedding (semi-convolutional, Novotny
et al. 2018) lets the same network tell them apart. Both variants of the same small
:class:`~napari_instseg.core.model.InstSegNet` are trained with Fathi et al.'s pairwise
embedding loss on the same image, for the same steps, from the same seed.

Measured per variant:

- ``grow_iou``: mean IoU of the mask grown at tau = 0.5 (sigma >= 0.5) from each disc's
  centre pixel with that disc;
- ``pairs_separated``: fraction of disc pairs whose centre embeddings have sigma < 0.5;
- ``final_loss``: the embedding loss after training (eval mode, 64 pixels per disc).

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/semiconv_dots.py [--steps 150] [--seeds 0 1 2]

``tests/test_semiconv_dots.py`` runs the same check with fewer steps.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch

from napari_instseg.core.losses import embedding_pair_loss, pair_similarity
from napari_instseg.core.model import InstSegNet, ModelConfig
from napari_instseg.core.train import hardware_description


def make_dots(
    size: int = 64, grid: int = 3, radius: float = 4.0
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """A (1, 1, size, size) image of identical discs on a grid, one mask per disc.

    Centres are at ``size * (i + 1) / (grid + 1)``: away from the border, so that a small
    network cannot tell discs apart by the zero padding either.
    """
    centres = [
        (round(size * (i + 1) / (grid + 1)), round(size * (j + 1) / (grid + 1)))
        for i in range(grid)
        for j in range(grid)
    ]
    rr, cc = np.mgrid[:size, :size]
    masks = np.stack([(rr - r) ** 2 + (cc - c) ** 2 <= radius**2 for r, c in centres])
    image = masks.any(0).astype(np.float32)
    return torch.from_numpy(image)[None, None], torch.from_numpy(masks), centres


def dots_model(semi_conv: bool, coord_scale: float = 8.0, seed: int = 0) -> InstSegNet:
    """The small network used by the check (two U-Net levels, 4-D embeddings)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        channels=(8, 16),
        embedding_dim=4,
        head_channels=16,
        semi_conv=semi_conv,
        coord_scale=coord_scale,
    )
    return InstSegNet(cfg)


def separation(
    embeddings: torch.Tensor, masks: torch.Tensor, centres: list[tuple[int, int]]
) -> dict[str, float]:
    """Instance separation of (D, H, W) embeddings: ``grow_iou`` and ``pairs_separated``."""
    d = embeddings.shape[0]
    flat = embeddings.reshape(d, -1).T
    w = embeddings.shape[-1]
    seeds = flat[[r * w + c for r, c in centres]]
    sim = pair_similarity(seeds, flat)  # (N, H*W)
    grown = sim >= 0.5
    m = masks.reshape(len(centres), -1)
    inter = (grown & m).sum(1).float()
    union = (grown | m).sum(1).float()
    pair_sim = pair_similarity(seeds, seeds)
    off = ~torch.eye(len(centres), dtype=torch.bool)
    return {
        "grow_iou": float((inter / union).mean()),
        "pairs_separated": float((pair_sim[off] < 0.5).float().mean()),
    }


def run_dots(
    semi_conv: bool,
    steps: int = 150,
    seed: int = 0,
    coord_scale: float = 8.0,
    size: int = 64,
    grid: int = 3,
    lr: float = 5e-3,
    n_per_instance: int = 16,
) -> dict[str, float]:
    """Train one variant on the dots image and measure its separation."""
    image, masks, centres = make_dots(size, grid)
    model = dots_model(semi_conv, coord_scale, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        emb = model(image)["embeddings"][0]
        loss = embedding_pair_loss(emb, masks, n_per_instance, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        emb = model(image)["embeddings"][0]
        loss = embedding_pair_loss(emb, masks, 64, torch.Generator().manual_seed(12345))
    out = separation(emb, masks, centres)
    out["final_loss"] = float(loss)
    out["train_s"] = seconds
    return out


def main(argv: list[str] | None = None) -> int:
    """Print a table of both variants over several seeds."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--coord-scale", type=float, default=8.0)
    parser.add_argument("--grid", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"command: {' '.join([sys.executable.split('/')[-1], *sys.argv])}")
    print(
        f"machine: {hardware_description(torch.device('cpu'))}; "
        f"{args.grid}x{args.grid} discs of radius 4 px, 16 px apart, 64x64 image"
    )
    print(f"{args.steps} steps, coord_scale {args.coord_scale} px, seeds {args.seeds}")
    print()
    print("| variant | grow IoU (tau 0.5) | pairs separated | final loss | train s |")
    print("|---|---|---|---|---|")
    variants = [
        ("plain convolutional", False, args.steps, args.coord_scale),
        (f"semi-conv, {args.coord_scale:g} px/unit", True, args.steps, args.coord_scale),
        (f"semi-conv, {args.coord_scale:g} px/unit, untrained", True, 0, args.coord_scale),
        ("semi-conv, 64 px/unit", True, args.steps, 64.0),
    ]
    for name, semi, steps, scale in variants:
        rows = [run_dots(semi, steps, s, scale, grid=args.grid) for s in args.seeds]

        def stat(key: str, rows: list[dict[str, float]] = rows) -> str:
            values = np.asarray([r[key] for r in rows])
            return f"{values.mean():.3f} ± {values.std():.3f}"

        seconds = np.median([r["train_s"] for r in rows])
        print(
            f"| {name} | {stat('grow_iou')} | {stat('pairs_separated')} "
            f"| {stat('final_loss')} | {seconds:.1f} |"
        )
    print()
    print(f"chance level of grow IoU when all discs merge: {1 / args.grid**2:.3f}")
    print(
        f"sigma between neighbouring disc centres from coordinates alone: "
        f"{2 / (1 + math.exp((16 / args.coord_scale) ** 2)):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
