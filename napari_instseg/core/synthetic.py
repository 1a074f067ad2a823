"""Synthetic bright-field worms: the plugin's sample data and the tests' main fixture.

The images imitate the bright-field channel (w2) of BBBC010: a bright, unevenly lit
background, dark worms with tapered ends and a slightly darker outline, some worms lying
side by side (touching) and some crossing each other (their masks overlap), and noise.
Every mask is exact and every worm lies fully inside the image, so the data can check
segmentation, growing and export code without any download.

Examples
--------
>>> from napari_instseg.core.synthetic import make_worms
>>> sample = make_worms(shape=(128, 128), n_worms=3, length=(40, 70), seed=1)
>>> sample.image.shape, sample.masks.shape
((128, 128), (3, 128, 128))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .types import Sample

__all__ = ["make_worms", "sample_worms"]

_MAX_TRIES = 100  # placement attempts per worm before the layout starts again
_RESTARTS = 3  # layouts tried before giving up


class _NoRoom(Exception):
    """No place found for the next worm; ``placed`` worms were placed."""

    def __init__(self, placed: int) -> None:
        super().__init__(placed)
        self.placed = placed


# small offsets, nearest first, tried to bring a touching worm into contact
_NEAR = sorted(
    ((dr, dc) for dr in range(-2, 3) for dc in range(-2, 3)), key=lambda d: d[0] ** 2 + d[1] ** 2
)


@dataclass
class _Worm:
    """A rasterised worm in a local patch, placed at ``offset`` (row, col) in the image."""

    mask: np.ndarray  # (h, w) bool
    absorbance: np.ndarray  # (h, w) float32, 0 outside the worm
    points: np.ndarray  # (n, 2) float centre line, patch coordinates
    tangent: np.ndarray  # (n,) float heading angle of the centre line
    radius: np.ndarray  # (n,) float half-width along the centre line
    darkness: float  # peak absorbance
    offset: tuple[int, int] = (0, 0)

    def slices(self) -> tuple[slice, slice]:
        r, c = self.offset
        return slice(r, r + self.mask.shape[0]), slice(c, c + self.mask.shape[1])


def _centre_line(
    rng: np.random.Generator,
    length: float,
    heading: tuple[float, float] | None = None,
    max_turn: float = 3.3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A smooth random-walk centre line with points about 0.5 px apart.

    ``heading = (u, angle)`` turns the line so that its heading at arc position u is
    ``angle``; otherwise the direction is random. Returns points (n, 2) as (row, col),
    heading angles (n,) and arc position u in [0, 1].
    """
    n = max(int(round(length * 2)), 8)
    step = length / (n - 1)
    # curvature: smoothed white noise plus a constant bend, in rad per px
    amp = rng.uniform(0.0, 0.05)
    noise = ndi.gaussian_filter1d(rng.standard_normal(n), sigma=n / 6, mode="nearest")
    noise /= np.abs(noise).max() + 1e-9
    curvature = amp * noise + rng.uniform(-0.012, 0.012)
    theta = np.cumsum(curvature * step)
    span = theta.max() - theta.min()
    if span > max_turn:  # avoid coiled worms that would cross themselves
        theta *= max_turn / span
    if heading is None:
        theta += rng.uniform(0, 2 * np.pi)
    else:
        theta += heading[1] - theta[int(round(heading[0] * (n - 1)))]
    d = np.stack([np.sin(theta), np.cos(theta)], axis=1) * step
    points = np.concatenate([[[0.0, 0.0]], np.cumsum(d[:-1], axis=0)])
    return points, theta, np.linspace(0.0, 1.0, n)


def _radius_profile(rng: np.random.Generator, u: np.ndarray, width: float) -> np.ndarray:
    """Half-width along the body: tapered head and (sharper) tail, gentle variation."""
    head = np.clip(u / rng.uniform(0.1, 0.2), 0, 1) ** 0.5
    tail = np.clip((1 - u) / rng.uniform(0.2, 0.3), 0, 1) ** 0.8
    if rng.random() < 0.5:  # which end is the head
        head, tail = tail[::-1].copy(), head[::-1].copy()
    wobble = 1 + 0.08 * np.sin(2 * np.pi * (u * rng.uniform(1, 2.5) + rng.random()))
    return np.maximum(width / 2 * head * tail * wobble, 1.5)


def _rasterise(
    points: np.ndarray, theta: np.ndarray, radius: np.ndarray, darkness: float
) -> _Worm:
    """Mask and absorbance of a worm, in a patch just large enough to hold it."""
    margin = int(np.ceil(radius.max())) + 2
    origin = np.floor(points.min(axis=0)) - margin
    local = points - origin
    size = (np.ceil(local.max(axis=0)) + margin + 1).astype(int)
    idx = np.full(size, -1, np.int64)
    pix = np.round(local).astype(int)
    idx[pix[:, 0], pix[:, 1]] = np.arange(len(local))
    _, (ir, ic) = ndi.distance_transform_edt(idx < 0, return_indices=True)
    nearest = idx[ir, ic]
    rr, cc = np.indices(size, dtype=np.float32)
    dist = np.hypot(rr - local[nearest, 0], cc - local[nearest, 1])
    rad = radius[nearest]
    mask = dist <= rad
    # the nearest-pixel lookup can leave a stray pixel or two beside a thin tip: keep the body
    lab, n = ndi.label(mask)
    if n > 1:
        mask = lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1
    rel = np.where(mask, dist / rad, 1.0)
    # absorbance of a cylinder: the light's path through the body grows from the edge to the
    # centre line, so worms darken inwards (BBBC010's live worms, relative to the background:
    # 0.75 at the outermost pixel, 0.55 one pixel further in, about 0.4 on the centre line);
    # thin ends are a little lighter
    body = 0.3 + 0.7 * np.sqrt(np.clip(1.0 - rel**2, 0.0, 1.0))
    thickness = np.sqrt(np.clip(rad / radius.max(), 0.5, 1.0))
    absorbance = np.where(mask, darkness * body * thickness, 0.0).astype(np.float32)
    return _Worm(
        mask=mask,
        absorbance=absorbance,
        points=local,
        tangent=theta,
        radius=radius,
        darkness=darkness,
    )


def _well_region(shape: tuple[int, int]) -> np.ndarray:
    """A centred rounded square, like the lit well of a BBBC010 image."""
    h, w = shape
    side = 0.84 * min(h, w)
    half = side / 2
    corner = 0.22 * side
    rr, cc = np.indices(shape, dtype=np.float32)
    dy = np.maximum(np.abs(rr - (h - 1) / 2) - (half - corner), 0)
    dx = np.maximum(np.abs(cc - (w - 1) / 2) - (half - corner), 0)
    return np.hypot(dy, dx) <= corner


def _fits(worm: _Worm, region: np.ndarray) -> bool:
    """True if the worm's mask lies inside ``region`` (and inside the image)."""
    r, c = worm.offset
    h, w = worm.mask.shape
    if r < 0 or c < 0 or r + h > region.shape[0] or c + w > region.shape[1]:
        return False
    return bool(region[worm.slices()][worm.mask].all())


def _overlaps(worm: _Worm, occupied: np.ndarray) -> np.ndarray:
    """Labels (1-based worm index) under the worm's mask."""
    return np.unique(occupied[worm.slices()][worm.mask])


def _check_range(name: str, value: tuple[float, float], low: float) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (min, max) pair of numbers, got {value!r}") from None
    if not (low <= a <= b):
        raise ValueError(f"{name} must satisfy {low} <= min <= max, got {value!r}")
    return a, b


def make_worms(
    shape: tuple[int, int] = (256, 256),
    n_worms: int = 6,
    length: tuple[float, float] = (60, 140),
    width: tuple[float, float] = (7, 11),
    n_crossings: int = 1,
    n_touching: int = 1,
    noise: float = 0.03,
    illumination: float = 0.3,
    background: float = 2800.0,
    well: bool = False,
    seed: int | None = 0,
) -> Sample:
    """Make a synthetic bright-field image of worms with exact, overlapping masks.

    Parameters
    ----------
    shape : tuple of int
        (H, W) of the image, each at least 16.
    n_worms : int
        Number of worms (instances), >= 0.
    length : tuple of float
        (min, max) centre-line length in pixels; each worm draws one uniformly.
    width : tuple of float
        (min, max) largest body width in pixels; ends taper to about 3 px.
    n_crossings : int
        Number of worm pairs that cross: the two masks of each pair share pixels. No other
        pair of worms overlaps, so exactly ``n_crossings`` pairs overlap.
    n_touching : int
        Number of worms laid alongside an earlier worm, with no gap (8-connected contact)
        but without shared pixels.
    noise : float
        Relative noise level: Gaussian noise with standard deviation ``noise`` times the
        local intensity (so brighter pixels are noisier, as with shot noise), >= 0.
    illumination : float
        Fall-off of the illumination from the centre to the image corners, in [0, 1):
        0 is flat, 0.3 leaves the corners at 70 % of the centre.
    background : float
        Background intensity at the image centre (BBBC010 w2 is about 2800).
    well : bool
        Darken everything outside a rounded square, like the lit well of BBBC010, and keep
        all worms inside it.
    seed : int or None
        Seed of the ``numpy.random.Generator``; the same seed gives identical arrays.

    Returns
    -------
    Sample
        ``image`` (H, W) float32 with intensities roughly in 100..3000 (uint16-like),
        ``masks`` (n_worms, H, W) bool with overlaps kept, ``name`` ``"synthetic-<seed>"``
        (``"synthetic"`` without a seed),
        ``metadata`` holding the parameters, the crossing pairs (``"crossings"``) and the
        touching pairs (``"touching"``) as lists of index pairs.

    Raises
    ------
    ValueError
        For invalid parameters, or when the worms do not fit in the image.
    """
    try:
        h, w = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (H, W), got {shape!r}") from None
    if h < 16 or w < 16:
        raise ValueError(f"shape must be at least 16 x 16, got {shape!r}")
    if int(n_worms) != n_worms or n_worms < 0:
        raise ValueError(f"n_worms must be a non-negative integer, got {n_worms!r}")
    if int(n_crossings) != n_crossings or n_crossings < 0:
        raise ValueError(f"n_crossings must be a non-negative integer, got {n_crossings!r}")
    if int(n_touching) != n_touching or n_touching < 0:
        raise ValueError(f"n_touching must be a non-negative integer, got {n_touching!r}")
    n_worms, n_crossings, n_touching = int(n_worms), int(n_crossings), int(n_touching)
    if 2 * n_crossings + n_touching > n_worms:
        raise ValueError(
            f"{n_crossings} crossings need {2 * n_crossings} worms and {n_touching} touching "
            f"worms {n_touching} more, but n_worms={n_worms}"
        )
    if n_touching and n_worms - n_touching < 1:
        raise ValueError("touching worms need at least one other worm to touch")
    length = _check_range("length", length, 4.0)
    width = _check_range("width", width, 2.0)
    if length[1] + width[1] + 4 > max(h, w) * 1.4:
        raise ValueError(f"worms up to {length[1]} px long do not fit in a {h} x {w} image")
    if not 0 <= noise:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    if not 0 <= illumination < 1:
        raise ValueError(f"illumination must be in [0, 1), got {illumination!r}")
    if not background > 0:
        raise ValueError(f"background must be > 0, got {background!r}")

    rng = np.random.default_rng(seed)
    region = _well_region((h, w)) if well else np.ones((h, w), bool)
    region = ndi.binary_erosion(region, border_value=0)  # keep a 1 px frame free
    occupied = np.zeros((h, w), np.int32)  # 1-based index of a worm on each pixel
    worms: list[_Worm] = []
    crossings: list[list[int]] = []
    touching: list[list[int]] = []

    def new_worm(heading: tuple[float, float] | None = None) -> tuple[_Worm, int]:
        pts, theta, u = _centre_line(rng, rng.uniform(*length), heading)
        radius = _radius_profile(rng, u, rng.uniform(*width))
        worm = _rasterise(pts, theta, radius, darkness=rng.uniform(0.6, 1.1))
        return worm, 0 if heading is None else int(round(heading[0] * (len(pts) - 1)))

    def remove_last() -> None:
        worm = worms.pop()
        occupied[worm.slices()][worm.mask] = 0  # it overlapped nothing when it was placed

    def add(worm: _Worm) -> None:
        worms.append(worm)
        view = occupied[worm.slices()]
        view[worm.mask & (view == 0)] = len(worms)

    def place_free() -> None:
        for _ in range(_MAX_TRIES):
            worm, _ = new_worm()
            hh, ww = worm.mask.shape
            if hh >= h or ww >= w:
                continue
            worm.offset = (int(rng.integers(0, h - hh + 1)), int(rng.integers(0, w - ww + 1)))
            if _fits(worm, region) and not _hits(worm, occupied):
                add(worm)
                return
        raise _NoRoom(len(worms))

    def place_crossing(partner: int, tries: int) -> bool:
        other = worms[partner]
        for _ in range(tries):
            i = int(rng.integers(int(0.25 * len(other.points)), int(0.75 * len(other.points))))
            # the new worm's heading at its point j differs by 30..90 degrees from the other's
            angle = other.tangent[i] + rng.choice([-1, 1]) * rng.uniform(np.pi / 6, np.pi / 2)
            worm, j = new_worm((rng.uniform(0.3, 0.7), angle))
            target = np.asarray(other.offset) + other.points[i]
            worm.offset = tuple(int(v) for v in np.round(target - worm.points[j]))
            if not _fits(worm, region):
                continue
            under = _overlaps(worm, occupied)
            if set(under.tolist()) - {0, partner + 1} or partner + 1 not in under:
                continue
            add(worm)
            crossings.append([partner, len(worms) - 1])
            return True
        return False

    def place_crossing_pair() -> None:
        for _ in range(_MAX_TRIES // 10):
            place_free()
            if place_crossing(len(worms) - 1, tries=20):
                return
            remove_last()  # no room around this one: start the pair elsewhere
        raise _NoRoom(len(worms))

    def place_touching() -> None:
        for _ in range(_MAX_TRIES):
            # prefer worms that cross nothing: there is more free room beside them
            crossing = {k for pair in crossings for k in pair}
            free = [k for k in range(len(worms)) if k not in crossing] or list(range(len(worms)))
            partner = int(rng.choice(free))
            other = worms[partner]
            i = int(rng.integers(int(0.3 * len(other.points)), int(0.7 * len(other.points))))
            angle = other.tangent[i] + rng.choice([0, np.pi]) + rng.uniform(-0.3, 0.3)
            worm, j = new_worm((rng.uniform(0.3, 0.7), angle))
            first = rng.choice([-1, 1])
            contact = None
            for side in (first, -first):  # try both sides of the partner
                contact = _slide_to_contact(worm, other, i, j, side, partner + 1, occupied, region)
                if contact is not None:
                    break
            if contact is None:
                continue
            worm.offset = contact
            add(worm)
            touching.append([partner, len(worms) - 1])
            return
        raise _NoRoom(len(worms))

    most = 0
    for _ in range(_RESTARTS):  # a crowded layout can get stuck: start again from scratch
        occupied[:] = 0
        worms.clear()
        crossings.clear()
        touching.clear()
        try:
            for _ in range(n_crossings):
                place_crossing_pair()
            while len(worms) < n_worms - n_touching:
                place_free()
            for _ in range(n_touching):
                place_touching()
            break
        except _NoRoom as stuck:
            most = max(most, stuck.placed)
    else:
        raise ValueError(
            f"could only place {most} of {n_worms} worms in a {h} x {w} image without "
            "unwanted overlaps: use fewer or shorter worms, or a larger image"
        )

    masks = np.zeros((n_worms, h, w), bool)
    absorbance = np.zeros((h, w), np.float32)
    for k, worm in enumerate(worms):
        masks[k][worm.slices()] = worm.mask
        absorbance[worm.slices()] += worm.absorbance

    image = _render(rng, (h, w), absorbance, noise, illumination, background, well)
    params = {
        "shape": [h, w],
        "n_worms": n_worms,
        "length": list(length),
        "width": list(width),
        "n_crossings": n_crossings,
        "n_touching": n_touching,
        "noise": float(noise),
        "illumination": float(illumination),
        "background": float(background),
        "well": bool(well),
        "seed": seed,
    }
    return Sample(
        image=image,
        masks=masks,
        name="synthetic" if seed is None else f"synthetic-{seed}",
        metadata={
            "dataset": "synthetic",
            "params": params,
            "crossings": crossings,
            "touching": touching,
        },
    )


def _slide_to_contact(
    worm: _Worm,
    other: _Worm,
    i: int,
    j: int,
    side: int,
    label: int,
    occupied: np.ndarray,
    region: np.ndarray,
) -> tuple[int, int] | None:
    """Offset at which ``worm`` lies against ``other`` (label ``label``), or None.

    The worm's point ``j`` starts on the partner's point ``i`` and slides along the
    partner's normal on ``side`` until it overlaps nothing; small shifts then close any gap.
    """
    theta = other.tangent[i]
    normal = side * np.array([np.cos(theta), -np.sin(theta)])
    base = np.asarray(other.offset) + other.points[i] - worm.points[j]
    placed = None
    for t in np.arange(0.0, max(worm.mask.shape) + 2 * other.radius.max(), 0.5):
        worm.offset = tuple(int(v) for v in np.round(base + normal * t))
        if _fits(worm, region) and not _hits(worm, occupied):
            placed = worm.offset
            break
    if placed is None:
        return None
    for dr, dc in _NEAR:
        worm.offset = (placed[0] + dr, placed[1] + dc)
        if _fits(worm, region) and not _hits(worm, occupied) and _touches(worm, occupied, label):
            return worm.offset
    return None


def _hits(worm: _Worm, occupied: np.ndarray) -> bool:
    """True if the worm's mask covers any pixel of an earlier worm."""
    return bool(occupied[worm.slices()][worm.mask].any())


def _touches(worm: _Worm, occupied: np.ndarray, label: int) -> bool:
    """True if the worm's mask is 8-adjacent to the worm ``label``."""
    r, c = worm.offset
    h, w = worm.mask.shape
    r0, c0 = max(r - 1, 0), max(c - 1, 0)
    r1, c1 = min(r + h + 1, occupied.shape[0]), min(c + w + 1, occupied.shape[1])
    grown = np.zeros((r1 - r0, c1 - c0), bool)
    grown[r - r0 : r - r0 + h, c - c0 : c - c0 + w] = worm.mask
    grown = ndi.binary_dilation(grown, structure=np.ones((3, 3), bool))
    return bool((occupied[r0:r1, c0:c1][grown] == label).any())


def _render(
    rng: np.random.Generator,
    shape: tuple[int, int],
    absorbance: np.ndarray,
    noise: float,
    illumination: float,
    background: float,
    well: bool,
) -> np.ndarray:
    """Bright-field image: lit background, Beer-Lambert worms, blur, noise."""
    h, w = shape
    rr, cc = np.indices(shape, dtype=np.float32)
    cy = (h - 1) / 2 + rng.uniform(-0.05, 0.05) * h
    cx = (w - 1) / 2 + rng.uniform(-0.05, 0.05) * w
    r2 = ((rr - cy) / (h / 2)) ** 2 + ((cc - cx) / (w / 2)) ** 2
    light = background * (1 - illumination * np.clip(r2 / 2, 0, 1))
    if well:
        light = np.where(ndi.binary_dilation(_well_region(shape), iterations=1), light, 100.0)
        light = ndi.gaussian_filter(light, 2.0)
    image = light * np.exp(-absorbance)
    image = ndi.gaussian_filter(image, 0.7)
    if noise > 0:
        image = image + rng.standard_normal(shape).astype(np.float32) * (noise * image)
    return np.clip(image, 0, 65535).astype(np.float32)


def sample_worms(seed: int = 2) -> Sample:
    """The plugin's sample data: a 520 x 696 BBBC010-like image with 12 worms, 80-170 px long.

    Three pairs of worms cross and two worms touch a neighbour; the worms lie in a lit,
    rounded well on a dark surround, like BBBC010's bright-field channel.

    Parameters
    ----------
    seed : int
        Random seed; the default gives the image shown by napari's sample menu.

    Returns
    -------
    Sample
        See :func:`make_worms`; ``name`` is ``"sample-worms"``.
    """
    sample = make_worms(
        shape=(520, 696),
        n_worms=12,
        length=(80, 170),
        width=(7, 11),
        n_crossings=3,
        n_touching=2,
        well=True,
        seed=seed,
    )
    sample.name = "sample-worms"
    return sample
