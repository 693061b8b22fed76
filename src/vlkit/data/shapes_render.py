"""Scenes of the synthetic shapes dataset: sampling, captions and anti-aliased rendering (numpy + PIL, no torch).

A scene is drawn from a per-sample random generator, so any sample can be re-created from ``(seed, split, index)``
alone, independently of shard sizes or of the order in which samples are written.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

# Saturated shape colours. Backgrounds are muted (saturation <= 0.2, value 0.3-0.75), so none of these names
# could describe a background pixel and the caption's colour is always the object's.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 35),
    "purple": (135, 55, 185),
    "orange": (245, 135, 25),
    "pink": (240, 120, 185),
    "cyan": (30, 195, 205),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "diamond", "hexagon")
SIZES = ("small", "medium", "large")
POSITIONS = (
    "center",
    "left",
    "right",
    "top",
    "bottom",
    "top left",
    "top right",
    "bottom left",
    "bottom right",
)
BACKGROUNDS = ("plain", "striped", "dotted", "checkered", "gradient", "noisy")

# The five most distinct shapes and colours at 32 px: 25 classes a tiny model separates within a CPU-minute budget.
DEFAULT_SHAPES = ("circle", "square", "triangle", "star", "cross")
DEFAULT_COLORS = ("red", "green", "blue", "yellow", "purple")

# Diameter of the main object as a fraction of the image side. The second object is always smaller than the
# smallest main object that can appear next to it, so "the main object" is never ambiguous.
SIZE_DIAMETER = {"small": 0.32, "medium": 0.44, "large": 0.58}
SECOND_DIAMETER = 0.24
COLOR_JITTER = 12  # per channel, in 0-255 units: keeps every colour nearest its own name (tested)
MAX_ROTATION = 15.0  # degrees: a square never turns into a diamond

# Position anchors as (x, y) directions: -1 = towards the left/top edge, 0 = centred, 1 = towards the right/bottom.
_ANCHOR = {
    "center": (0, 0),
    "left": (-1, 0),
    "right": (1, 0),
    "top": (0, -1),
    "bottom": (0, 1),
    "top left": (-1, -1),
    "top right": (1, -1),
    "bottom left": (-1, 1),
    "bottom right": (1, 1),
}
_MARGIN = 0.02  # fraction of the image kept clear between an object and the border


@dataclass
class Shape:
    """One object: geometry in image fractions (x, y, radius) so a scene renders at any pixel size."""

    shape: str
    color: str
    rgb: tuple[int, int, int]
    size: str
    position: str
    x: float
    y: float
    radius: float
    rotation: float


@dataclass
class Scene:
    """Everything needed to render one sample and to describe it."""

    main: Shape
    background: str
    bg_colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    bg_scale: float  # texture period as a fraction of the image side
    bg_angle: float  # degrees, for stripes and gradients
    bg_seed: int  # drives per-pixel noise
    second: Shape | None = None
    heldout_combo: bool = False


# ---------------------------------------------------------------------------------------------------------- geometry


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _regular(n: int, phase: float) -> np.ndarray:
    angles = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _cross(t: float = 0.34) -> np.ndarray:
    return np.array(
        [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)],
        dtype=float,
    )


def _heart(n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], axis=1)  # the curve's box is off-centre vertically; recentre it
    return pts / np.abs(pts).max()


# Outlines in a [-1, 1] box (y down), sized so that the shapes look about equally big at the same radius; the
# circle is the unit circle.
_OUTLINES: dict[str, np.ndarray] = {
    "square": np.array([(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)]),
    "triangle": _regular(3, -math.pi / 2) * 1.08 + np.array([0.0, 0.2]),
    "star": _star() * 1.05,
    "cross": _cross(),
    "heart": _heart(),
    "diamond": np.array([(0.0, -1.0), (0.75, 0.0), (0.0, 1.0), (-0.75, 0.0)]),
    "hexagon": _regular(6, 0.0) * 0.95,
}
# Radius of the circle around each outline (the circle's is 1): used to keep objects inside the image and apart.
_EXTENT = {name: float(np.hypot(*pts.T).max()) for name, pts in _OUTLINES.items()} | {"circle": 1.0}


def _outline(shape: str, x: float, y: float, radius: float, rotation: float, px: float) -> list[tuple[float, float]]:
    theta = math.radians(rotation)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    pts = _OUTLINES[shape] @ rot.T * radius + np.array([x, y])
    return [(float(a), float(b)) for a, b in pts * px]


def bounding_box(obj: Shape, size: int) -> tuple[int, int, int, int]:
    """Pixel box ``(x0, y0, x1, y1)`` (exclusive end) that contains ``obj`` in a ``size``-pixel image."""
    r = obj.radius * _EXTENT[obj.shape]
    x0, y0 = math.floor((obj.x - r) * size), math.floor((obj.y - r) * size)
    x1, y1 = math.ceil((obj.x + r) * size), math.ceil((obj.y + r) * size)
    return max(0, x0), max(0, y0), min(size, x1), min(size, y1)


# ---------------------------------------------------------------------------------------------------------- sampling


def heldout_combos(backgrounds: tuple[str, ...] = BACKGROUNDS) -> list[tuple[str, str]]:
    """(background, position) pairs never shown in the train split; the val split draws from all pairs.

    One position per background, spread over positions, so every background and every position still appears in
    training, only some pairings are new at evaluation time.
    """
    return [(bg, POSITIONS[(2 * i + 1) % len(POSITIONS)]) for i, bg in enumerate(backgrounds)]


def _pick(rng: np.random.Generator, options: Sequence):
    # Indexing by one integer draw: Generator.choice converts the options to an array each call, 20x slower.
    return options[int(rng.integers(len(options)))]


def _muted_pair(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    h, s, v = rng.uniform(0, 1), rng.uniform(0.0, 0.2), rng.uniform(0.3, 0.75)
    dv = rng.uniform(0.08, 0.16) * (1 if v < 0.52 else -1)
    s2 = min(max(s + rng.uniform(-0.05, 0.05), 0.0), 0.2)
    pair = []
    for sat, val in ((s, v), (s2, v + dv)):
        r, g, b = colorsys.hsv_to_rgb(h, sat, val)
        pair.append((round(r * 255), round(g * 255), round(b * 255)))
    return pair[0], pair[1]


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    j = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3).tolist()
    return tuple(min(max(c + d, 0), 255) for c, d in zip(rgb, j))


def _place(position: str, radius: float, rng: np.random.Generator) -> tuple[float, float]:
    # The anchor is as far towards its edge as the object allows; a little jitter keeps positions from repeating.
    reach = 0.5 - radius - _MARGIN
    ax, ay = _ANCHOR[position]
    x = 0.5 + ax * reach + rng.uniform(-0.03, 0.03)
    y = 0.5 + ay * reach + rng.uniform(-0.03, 0.03)
    lo, hi = radius + _MARGIN, 1 - radius - _MARGIN
    return min(max(x, lo), hi), min(max(y, lo), hi)


def _nearest_position(x: float, y: float) -> str:
    col = 0 if x < 1 / 3 else (2 if x > 2 / 3 else 1)
    row = 0 if y < 1 / 3 else (2 if y > 2 / 3 else 1)
    vertical, horizontal = ("top", "", "bottom")[row], ("left", "", "right")[col]
    return " ".join(p for p in (vertical, horizontal) if p) or "center"


def _place_second(main: Shape, radius: float, rng: np.random.Generator) -> tuple[float, float] | None:
    lo, hi = radius + _MARGIN, 1 - radius - _MARGIN
    min_dist = main.radius * _EXTENT[main.shape] + radius + 0.04
    for _ in range(24):
        x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
        if math.hypot(x - main.x, y - main.y) >= min_dist:
            return float(x), float(y)
    return None


def sample_scene(
    rng: np.random.Generator,
    label: int,
    shapes: tuple[str, ...],
    colors: tuple[str, ...],
    *,
    second_prob: float = 0.2,
    exclude: frozenset[tuple[str, str]] = frozenset(),
) -> Scene:
    """Draw one scene whose main object is class ``label`` (index into the sorted ``color shape`` names).

    Args:
        rng: the sample's own generator.
        label: class index; classes are ``class_names(shapes, colors)``.
        shapes: shape names (from ``SHAPES``).
        colors: colour names (from ``PALETTE``).
        second_prob: probability of a second, smaller object of another shape and colour.
        exclude: (background, position) pairs not to draw (the held-out pairs, for the train split).
    """
    color, shape = class_names(shapes, colors)[label].split(" ")
    # When a second object will join, the main one is at least medium so that it stays clearly the larger one.
    has_second = len(shapes) > 1 and len(colors) > 1 and rng.uniform() < second_prob
    size = _pick(rng, SIZES[1:] if has_second else SIZES)
    while True:
        background, position = _pick(rng, BACKGROUNDS), _pick(rng, POSITIONS)
        if (background, position) not in exclude:
            break
    radius = (SIZE_DIAMETER[size] + rng.uniform(-0.03, 0.03)) / 2
    # Anchoring uses the outline's true extent so that the corners of squares and crosses stay inside the image.
    x, y = _place(position, radius * _EXTENT[shape], rng)
    rotation = float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    main = Shape(shape, color, _jitter(PALETTE[color], rng), size, position, x, y, radius, rotation)

    bg_colors = _muted_pair(rng)
    scene = Scene(
        main=main,
        background=background,
        bg_colors=bg_colors,
        bg_scale=float(rng.uniform(0.09, 0.16)),
        bg_angle=_pick(rng, (0.0, 45.0, 90.0, 135.0)),
        bg_seed=int(rng.integers(0, 2**31)),
    )
    if has_second:
        s_shape = _pick(rng, [s for s in shapes if s != shape])
        s_color = _pick(rng, [c for c in colors if c != color])
        s_radius = (SECOND_DIAMETER + rng.uniform(-0.02, 0.02)) / 2
        spot = _place_second(main, s_radius * _EXTENT[s_shape], rng)
        if spot is not None:
            sx, sy = spot
            scene.second = Shape(
                s_shape,
                s_color,
                _jitter(PALETTE[s_color], rng),
                "small",
                _nearest_position(sx, sy),
                sx,
                sy,
                s_radius,
                float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)),
            )
    return scene


def class_names(shapes: tuple[str, ...], colors: tuple[str, ...]) -> list[str]:
    """Class names ``"<colour> <shape>"``, sorted so that ImageFolder's sorted folders give the same indices."""
    return sorted(f"{c} {s}" for c in colors for s in shapes)


# ---------------------------------------------------------------------------------------------------------- captions

SIZE_WORDS = {"small": ("small", "little", "tiny"), "medium": ("medium-sized", "medium"), "large": ("large", "big")}
POSITION_PHRASES = {
    "center": ("in the center", "in the middle", "at the center of the image"),
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "top": ("at the top", "near the top", "at the top of the image"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom of the image"),
    "top left": ("in the top left", "in the top left corner", "at the upper left"),
    "top right": ("in the top right", "in the top right corner", "at the upper right"),
    "bottom left": ("in the bottom left", "in the bottom left corner", "at the lower left"),
    "bottom right": ("in the bottom right", "in the bottom right corner", "at the lower right"),
}
BACKGROUND_WORDS = {
    "plain": ("plain", "solid", "uniform"),
    "striped": ("striped",),
    "dotted": ("dotted", "polka-dot"),
    "checkered": ("checkered", "checkerboard"),
    "gradient": ("gradient",),
    "noisy": ("noisy", "grainy"),
}
_BACKGROUND_PHRASES = (
    "on a {} background",
    "against a {} background",
    "over a {} background",
    "with a {} background",
    "in front of a {} background",
)
_SECOND_PHRASES = ("next to {}", "and {}", "with {} nearby", "beside {}", "alongside {}", "near {}")
# How a caption opens; "{a}" is the main object with its article, "{d}" without.
_HEADS = (
    "a photo of {a}",
    "a picture of {a}",
    "an image of {a}",
    "a drawing of {a}",
    "a rendering of {a}",
    "a synthetic image of {a}",
    "a simple image showing {a}",
    "there is {a}",
    "this is {a}",
    "{a}",
    "{d}",
)
# Zero-shot prompts: the caption openings with the class name alone, so they are sentences the text tower has seen.
TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "a rendering of a {}.",
    "a synthetic image of a {}.",
    "there is a {}.",
    "this is a {}.",
    "a {}.",
    "{}.",
)


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def caption(scene: Scene, rng: np.random.Generator) -> tuple[str, list[str]]:
    """A templated caption and the attributes it mentions (a subset of size, position, background, second).

    The main object's colour and shape always appear, adjacent, in that order: that pair is the class.
    """
    main = scene.main
    mentions: list[str] = []
    desc = f"{main.color} {main.shape}"
    if rng.uniform() < 0.5:
        desc = f"{_pick(rng, SIZE_WORDS[main.size])} {desc}"
        mentions.append("size")
    head = _pick(rng, _HEADS).format(a=_article(desc), d=desc)

    tails: list[tuple[str, str]] = []
    if rng.uniform() < 0.4:
        tails.append(("position", _pick(rng, POSITION_PHRASES[main.position])))
    if rng.uniform() < 0.4:
        word = _pick(rng, BACKGROUND_WORDS[scene.background])
        tails.append(("background", _pick(rng, _BACKGROUND_PHRASES).format(word)))
    if scene.second is not None and rng.uniform() < 0.7:
        s = scene.second
        other = _article(f"{_pick(rng, SIZE_WORDS['small'])} {s.color} {s.shape}")
        tails.append(("second", _pick(rng, _SECOND_PHRASES).format(other)))
    # The second object's phrase goes last, so that a position phrase never follows it and seems to describe it.
    parts = sorted((tails[i] for i in rng.permutation(len(tails))), key=lambda t: t[0] == "second")
    text = " ".join([head, *(p for _, p in parts)])
    mentions += [name for name, _ in parts]
    if rng.uniform() < 0.5:
        text += "."
    return text, mentions


# ---------------------------------------------------------------------------------------------------------- drawing


def supersample_factor(size: int) -> int:
    """Edges are computed at 2-4x and box-averaged: smooth at a cost that stays flat across sizes."""
    return max(2, min(4, math.ceil(256 / size)))


@lru_cache(maxsize=8)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    # Pixel-centre coordinates of an n x n grid, in units of the image side.
    c = (np.arange(n, dtype=np.float32) + 0.5) / n
    return np.meshgrid(c, c, indexing="xy")


def _box_mean(mask: np.ndarray, factor: int) -> np.ndarray:
    n = mask.shape[0] // factor
    return mask.reshape(n, factor, n, factor).mean(axis=(1, 3), dtype=np.float32)


def render_background(scene: Scene, size: int) -> np.ndarray:
    """The background alone as a float ``[size, size, 3]`` array of 0-255 values."""
    kind, p = scene.background, scene.bg_scale
    theta = math.radians(scene.bg_angle)
    factor = supersample_factor(size)
    if kind in ("striped", "checkered", "dotted"):
        # Hard-edged patterns: evaluated on the fine grid and box-averaged, which anti-aliases their edges.
        xx, yy = _grid(size * factor)
        if kind == "striped":
            fine = (xx * math.cos(theta) + yy * math.sin(theta)) / p % 1.0 < 0.5
        elif kind == "checkered":
            fine = (np.floor(xx / p) + np.floor(yy / p)) % 2 == 1
        else:
            spacing = p * 1.3
            dx, dy = (xx / spacing) % 1.0 - 0.5, (yy / spacing) % 1.0 - 0.5
            fine = dx * dx + dy * dy < 0.28**2
        mask = _box_mean(fine.astype(np.float32), factor)
    elif kind == "gradient":
        xx, yy = _grid(size)
        along = xx * math.cos(theta) + yy * math.sin(theta)
        lo, hi = along.min(), along.max()
        mask = (along - lo) / (hi - lo)
    elif kind == "noisy":
        # Per output pixel: noise drawn on the fine grid would average away.
        noise = np.random.default_rng(scene.bg_seed).normal(0.5, 0.5, size=(size, size)).astype(np.float32)
        mask = np.clip(noise, 0.0, 1.0)
    elif kind == "plain":
        mask = np.zeros((size, size), np.float32)
    else:
        raise ValueError(f"unknown background {kind!r}")
    c1, c2 = (np.array(c, dtype=np.float32) for c in scene.bg_colors)
    return c1 + mask[..., None] * (c2 - c1)


def coverage(obj: Shape, size: int) -> np.ndarray:
    """Fraction of each output pixel that ``obj`` covers, as a float ``[size, size]`` array in [0, 1]."""
    factor = supersample_factor(size)
    px = size * factor
    canvas = Image.new("L", (px, px), 0)
    draw = ImageDraw.Draw(canvas)
    if obj.shape == "circle":
        r, cx, cy = obj.radius * px, obj.x * px, obj.y * px
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(_outline(obj.shape, obj.x, obj.y, obj.radius, obj.rotation, px), fill=255)
    return np.asarray(canvas.reduce(factor), dtype=np.float32) / 255.0


def render(scene: Scene, size: int, *, objects: bool = True, second: bool = True) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size`` pixels.

    Args:
        scene: what to draw.
        size: output side in pixels.
        objects: draw the objects (``False`` gives the bare background: outside the objects it is the same pixels).
        second: draw the second object, if the scene has one.
    """
    img = render_background(scene, size)
    if objects:
        for obj in (scene.main, scene.second if second else None):
            if obj is not None:
                alpha = coverage(obj, size)[..., None]
                img += alpha * (np.array(obj.rgb, dtype=np.float32) - img)
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")


def metadata(scene: Scene, size: int) -> dict:
    """JSON-ready description of a scene (what ``KEY.json`` holds besides key, split, label and caption)."""

    def obj(o: Shape) -> dict:
        return {
            "shape": o.shape,
            "color": o.color,
            "size": o.size,
            "position": o.position,
            "rgb": list(o.rgb),
            "bbox": list(bounding_box(o, size)),
        }

    main = obj(scene.main)
    return {
        "shape": main.pop("shape"),
        "color": main.pop("color"),
        "size": main.pop("size"),
        "position": main.pop("position"),
        "rgb": main.pop("rgb"),
        "bbox": main.pop("bbox"),
        "background": scene.background,
        "second": obj(scene.second) if scene.second is not None else None,
        "heldout_combo": scene.heldout_combo,
    }
