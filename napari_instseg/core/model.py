"""The network: a small U-Net with embedding, classification, boundary and foreground heads.

Heads (all at full resolution):

- ``embeddings`` (D channels). With ``semi_conv=True`` (Novotny et al. 2018) the scaled
  global pixel coordinates ``(row, col) / coord_scale`` are added to the first two
  channels. Coordinates are global image coordinates (``offset`` gives a tile's position),
  so tiled prediction yields the same embeddings as whole-image prediction.
- ``class_logits`` (T x (C + 1) channels): per threshold tau, logits that the mask grown from
  the pixel at tau is an instance of class c (c = 0 background), Fathi et al. 2017.
- ``boundary_logits`` (1): instance-aware boundary (BAISeg).
- ``foreground_logits`` (1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .normalize import INPUT_NORMS
from .types import DEFAULT_TAUS


@dataclass
class ModelConfig:
    """Architecture of :class:`InstSegNet` (saved with every weights file).

    Attributes
    ----------
    in_channels : int
        Number of input channels.
    embedding_dim : int
        D, the number of embedding channels.
    n_classes : int
        C, the number of foreground classes (1 = "worm").
    taus : tuple of float
        Thresholds of the classification head.
    channels : tuple of int
        Feature channels per U-Net level, full resolution first.
    semi_conv : bool
        Add scaled global coordinates to the first two embedding channels.
    coord_scale : float
        Pixels per embedding unit for the semi-convolutional coordinates.
    head_channels : int
        Width of the hidden 3x3 layer of each head.
    input_norm : str
        ``"percentile"``: each channel scaled by its 1 / 99.8 percentiles. ``"flatfield"``:
        also a flat-field corrected copy of each channel (divided by its Gaussian blur of
        ``flatfield_sigma``), which makes worms in the dark rim of a well visible; the
        network then sees ``2 * in_channels`` channels. See
        :func:`napari_instseg.core.normalize.model_input`.
    flatfield_sigma : float
        Blur of the flat-field estimate, pixels.
    """

    in_channels: int = 1
    embedding_dim: int = 16
    n_classes: int = 1
    taus: tuple[float, ...] = DEFAULT_TAUS
    channels: tuple[int, ...] = (16, 32, 64, 128, 128)
    semi_conv: bool = True
    coord_scale: float = 256.0
    head_channels: int = 32
    input_norm: str = "percentile"
    flatfield_sigma: float = 16.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        out = asdict(self)
        out["taus"] = list(self.taus)
        out["channels"] = list(self.channels)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown model config keys: {sorted(unknown)}")
        data = dict(data)
        if "taus" in data:
            data["taus"] = tuple(float(t) for t in data["taus"])
        if "channels" in data:
            data["channels"] = tuple(int(c) for c in data["channels"])
        return cls(**data)

    def __post_init__(self) -> None:
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, not {self.input_norm!r}")

    @property
    def network_channels(self) -> int:
        """Channels the first convolution sees (after :func:`model_input`)."""
        return self.in_channels * (2 if self.input_norm == "flatfield" else 1)

    @property
    def divisor(self) -> int:
        """Input height and width must be multiples of this (padding handles the rest)."""
        return 2 ** (len(self.channels) - 1)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def _head(c_in: int, hidden: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, hidden, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, c_out, 1),
    )


def _channels_last(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous(memory_format=torch.channels_last)


def coordinate_channels(
    height: int,
    width: int,
    offset: tuple[int, int] = (0, 0),
    scale: float = 256.0,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Global (row, col) coordinates divided by ``scale``, shape (2, H, W).

    Parameters
    ----------
    height, width : int
        Size of the (tile of the) image.
    offset : tuple of int
        Global (row, col) of the tile's top-left pixel.
    scale : float
        Pixels per unit.
    device, dtype
        Of the result.

    Returns
    -------
    torch.Tensor
        (2, H, W).
    """
    rows = (torch.arange(height, device=device, dtype=dtype) + offset[0]) / scale
    cols = (torch.arange(width, device=device, dtype=dtype) + offset[1]) / scale
    return torch.stack(
        [rows[:, None].expand(height, width), cols[None, :].expand(height, width)], dim=0
    )


class InstSegNet(nn.Module):
    """U-Net with embedding, per-tau classification, boundary and foreground heads.

    Parameters
    ----------
    config : ModelConfig
        The architecture.
    """

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config = config or ModelConfig()
        chans = config.channels
        self.encoders = nn.ModuleList()
        c_prev = config.network_channels
        for c in chans:
            self.encoders.append(_block(c_prev, c))
            c_prev = c
        self.decoders = nn.ModuleList()
        for level in range(len(chans) - 2, -1, -1):
            self.decoders.append(_block(chans[level + 1] + chans[level], chans[level]))
        c0, hidden = chans[0], config.head_channels
        n_cls = len(config.taus) * (config.n_classes + 1)
        self.embedding_head = _head(c0, hidden, config.embedding_dim)
        self.class_head = _head(c0, hidden, n_cls)
        self.boundary_head = _head(c0, hidden, 2)  # boundary, foreground

    def forward(
        self, x: torch.Tensor, offset: tuple[int, int] | torch.Tensor = (0, 0)
    ) -> dict[str, torch.Tensor]:
        """Run the network.

        Parameters
        ----------
        x : torch.Tensor
            (B, C_in, H, W) normalised images, H and W multiples of ``config.divisor``.
        offset : tuple of int or torch.Tensor
            Global (row, col) of the input's top-left pixel: one pair for the batch, or a
            (B, 2) tensor. Used by the semi-convolutional coordinates.

        Returns
        -------
        dict of str to torch.Tensor
            ``embeddings`` (B, D, H, W), ``class_logits`` (B, T, C+1, H, W),
            ``boundary_logits`` (B, H, W), ``foreground_logits`` (B, H, W).
        """
        cfg = self.config
        b, _, h, w = x.shape
        if h % cfg.divisor or w % cfg.divisor:
            raise ValueError(f"input {h}x{w} must be a multiple of {cfg.divisor} (pad it)")
        skips = []
        for i, encoder in enumerate(self.encoders):
            if i:
                x = F.max_pool2d(x, 2)
            x = encoder(x)
            skips.append(x)
        x = skips.pop()
        for decoder in self.decoders:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            if x.requires_grad and x.is_contiguous(memory_format=torch.channels_last):
                # the concatenation hands back a channel slice of its gradient, and the
                # upsampling's backward is 3x slower on a strided gradient (CPU, oneDNN)
                x.register_hook(_channels_last)
            x = decoder(torch.cat([x, skip], dim=1))
        emb = self.embedding_head(x)
        if cfg.semi_conv:
            emb = add_coordinates(emb, offset, cfg.coord_scale)
        logits = self.class_head(x).view(b, len(cfg.taus), cfg.n_classes + 1, h, w)
        bf = self.boundary_head(x)
        return {
            "embeddings": emb,
            "class_logits": logits,
            "boundary_logits": bf[:, 0],
            "foreground_logits": bf[:, 1],
        }


def add_coordinates(
    embeddings: torch.Tensor, offset: tuple[int, int] | torch.Tensor, scale: float
) -> torch.Tensor:
    """Add global coordinates to the first two embedding channels (semi-convolutional).

    Parameters
    ----------
    embeddings : torch.Tensor
        (B, D, H, W), D >= 2.
    offset : tuple of int or torch.Tensor
        Global (row, col) of the top-left pixel, for the batch or (B, 2) per item.
    scale : float
        Pixels per unit.

    Returns
    -------
    torch.Tensor
        Same shape.
    """
    if embeddings.dtype in (torch.float16, torch.bfloat16):
        # under autocast: coordinates up to a few units need more than bf16's 8-bit mantissa
        embeddings = embeddings.float()
    b, _, h, w = embeddings.shape
    offsets = torch.as_tensor(offset, dtype=embeddings.dtype, device=embeddings.device)
    if offsets.ndim == 1:
        offsets = offsets[None].expand(b, 2)
    base = coordinate_channels(h, w, (0, 0), scale, embeddings.device, embeddings.dtype)
    coords = base[None] + (offsets / scale)[:, :, None, None]
    return torch.cat([embeddings[:, :2] + coords, embeddings[:, 2:]], dim=1)
