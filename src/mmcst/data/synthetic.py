"""A procedural localization benchmark written to disk in the PASCAL VOC 2012 layout.

The demo and the tests train and evaluate on this dataset through exactly the code path a VOC user
runs (``mmcst.data.voc.VOCDataset``). ``generate_synthetic`` writes::

    <out_dir>/VOCdevkit/VOC2012/
        JPEGImages/synth_000000.jpg            RGB, JPEG quality 90
        SegmentationClass/synth_000000.png     VOC-palette PNG: 0 background, 1..C classes, 255 boundary band
        Annotations/synth_000000.xml           VOC XML: size, one <object> per visible instance
        ImageSets/Segmentation/{train,val,trainval}.txt
        ImageSets/Main/{train,val,trainval}.txt and <class>_{train,val,trainval}.txt
        class_names.txt                        one class name per line
        mmcst_synthetic.json                   completion marker (parameters + counts), written last

The benchmark is built to be fair but not trivial. Classes are conjunctions of a silhouette, a texture
and a colour family with per-instance jitter, so no single cue names a class. Four pairs of classes
share a body and differ only in a small coloured part (about a tenth of the object) at one end: a
method that localizes only the most discriminative part of those objects scores visibly lower than
one that recovers the whole extent. Images hold 1-4 objects at 18%-55% of the image side (``SCENE``), occluding
each other and cut by the image border; the background is low-frequency colour noise with textured
non-class distractors behind the objects and thin distractors in front of them. Every mask shows
only what is visible.

Each image is rendered from its own random stream (``seed``, split, index), so the files are the same
bytes whatever the number of worker processes.
"""
from __future__ import annotations

import argparse
import colorsys
import contextlib
import functools
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmcst.data.base import DatasetError, register_dataset
from mmcst.io import atomic_write_bytes, atomic_write_json, atomic_write_text, save_label_png

# Bump whenever the rendered content changes, so cached datasets of an older version regenerate.
# Version 2: larger objects, fewer distractors and fewer look-alike pairs side by side (SCENE), so that
# methods trained from random weights for minutes learn their classes and can be told apart.
GENERATOR_VERSION = 2
MARKER_NAME = "mmcst_synthetic.json"
SPLITS = ("train", "val")
_IGNORE = 255
_JPEG_QUALITY = 90
_MIN_INTERIOR = 4  # pixels of an annotated object outside the boundary band, so its class shows in the mask
_MIN_RADIUS_PX = 9.0  # smaller objects would be all boundary band
_LAYOUT_ENTRIES = {"JPEGImages", "SegmentationClass", "Annotations", "ImageSets", "class_names.txt", MARKER_NAME}


@dataclass(frozen=True)
class SceneSpec:
    """How hard a scene is: object sizes, clutter, and how often look-alike classes appear side by side.

    Version 1 of the generator (objects of 10% of the image side, 3-8 background and 0-3 foreground
    distractors, the pair sibling beside its twin in 30% of multi-object images) was too hard to separate the
    methods in a CPU budget of minutes: every model trained from random weights stayed near chance in
    classification (CAM reached a validation mAP of 20 where chance is 12, the ViTs stayed at chance).
    """

    object_size: tuple[float, float] = (0.18, 0.55)  # object diameter as a fraction of the image side (log-uniform)
    object_size_crowded: float = 0.45  # upper bound of that range with 3-4 objects
    object_counts: tuple[int, ...] = (1, 2, 3, 4)
    object_count_p: tuple[float, ...] = (0.3, 0.3, 0.25, 0.15)
    sibling_p: float = 0.1  # probability that the second object is the first one's look-alike twin
    truncate_p: float = 0.15  # probability that an object may be cut by the image border
    back_distractors: tuple[int, int] = (1, 5)  # [low, high) count of textured shapes behind the objects
    front_distractors: tuple[int, int] = (0, 2)  # [low, high) count of thin shapes in front of them


SCENE = SceneSpec()


# --------------------------------------------------------------------------------------------------
# class definitions (data, not code paths)

@dataclass(frozen=True)
class PartSpec:
    """A small coloured part at the +u end of a body: the only cue separating the classes of a pair."""

    shape: str  # disc | square
    center: float  # position along the body's long axis, in object radii
    radius: float  # in object radii
    hue: float
    sat: float
    val: float


@dataclass(frozen=True)
class ClassSpec:
    name: str
    shape: str  # key of _SHAPES
    aspect: tuple[float, float]  # range of the minor/major axis ratio
    texture: str  # stripes | checker | dots | noise | gradient
    hue: float
    sat: float
    val: float
    secondary: str  # dark | light: the second colour of the texture
    part: PartSpec | None = None


def _pair(body: dict[str, Any], names: tuple[str, str], parts: tuple[PartSpec, PartSpec]) -> list[ClassSpec]:
    return [ClassSpec(name=name, part=part, **body) for name, part in zip(names, parts)]


_BATON = dict(shape="baton", aspect=(0.22, 0.30), texture="stripes", hue=0.0, sat=0.0, val=0.62, secondary="dark")
_BEAN = dict(shape="bean", aspect=(0.50, 0.62), texture="noise", hue=0.10, sat=0.35, val=0.88, secondary="dark")
_FLAG = dict(shape="flag", aspect=(0.50, 0.62), texture="stripes", hue=0.64, sat=0.75, val=0.42, secondary="light")
_WEDGE = dict(shape="wedge", aspect=(0.45, 0.60), texture="checker", hue=0.17, sat=0.60, val=0.50, secondary="light")

CLASS_SPECS: tuple[ClassSpec, ...] = (
    ClassSpec("red_striped_disc", "ellipse", (0.70, 1.00), "stripes", 0.00, 0.85, 0.85, "dark"),
    ClassSpec("blue_checkered_square", "box", (0.80, 1.00), "checker", 0.62, 0.80, 0.80, "light"),
    ClassSpec("green_dotted_triangle", "triangle", (0.80, 1.00), "dots", 0.33, 0.75, 0.70, "light"),
    ClassSpec("yellow_gradient_star", "star", (0.85, 1.00), "gradient", 0.15, 0.85, 0.95, "dark"),
    *_pair(_BATON, ("grey_baton_red_tip", "grey_baton_blue_tip"),
           (PartSpec("disc", 0.76, 0.20, 0.00, 0.90, 0.90), PartSpec("disc", 0.76, 0.20, 0.62, 0.90, 0.90))),
    ClassSpec("purple_speckled_ring", "ring", (0.75, 1.00), "noise", 0.77, 0.60, 0.70, "light"),
    ClassSpec("cyan_striped_cross", "cross", (0.85, 1.00), "stripes", 0.50, 0.80, 0.85, "dark"),
    *_pair(_BEAN, ("tan_bean_green_knob", "tan_bean_magenta_knob"),
           (PartSpec("disc", 0.72, 0.21, 0.33, 0.90, 0.75), PartSpec("disc", 0.72, 0.21, 0.85, 0.85, 0.85))),
    ClassSpec("orange_dotted_crescent", "crescent", (0.90, 1.00), "dots", 0.08, 0.85, 0.95, "dark"),
    ClassSpec("teal_checkered_hexagon", "hexagon", (0.80, 1.00), "checker", 0.45, 0.70, 0.60, "light"),
    *_pair(_FLAG, ("navy_flag_yellow_patch", "navy_flag_white_patch"),
           (PartSpec("square", 0.70, 0.19, 0.15, 0.90, 0.95), PartSpec("square", 0.70, 0.19, 0.00, 0.00, 0.97))),
    ClassSpec("pink_gradient_diamond", "diamond", (0.55, 0.80), "gradient", 0.93, 0.45, 0.95, "dark"),
    ClassSpec("brown_speckled_gear", "gear", (0.90, 1.00), "noise", 0.07, 0.65, 0.50, "light"),
    *_pair(_WEDGE, ("olive_wedge_orange_cap", "olive_wedge_cyan_cap"),
           (PartSpec("disc", 0.74, 0.19, 0.07, 0.90, 0.95), PartSpec("disc", 0.74, 0.19, 0.50, 0.85, 0.90))),
    ClassSpec("white_gradient_chevron", "chevron", (0.90, 1.00), "gradient", 0.60, 0.08, 0.96, "dark"),
    ClassSpec("magenta_checkered_semicircle", "semicircle", (0.90, 1.00), "checker", 0.85, 0.80, 0.80, "light"),
)
MAX_CLASSES = len(CLASS_SPECS)


def synthetic_class_names(num_classes: int = MAX_CLASSES) -> list[str]:
    """Names of the first ``num_classes`` synthetic classes (the order of ``class_names.txt``)."""
    _check_num_classes(num_classes)
    return [spec.name for spec in CLASS_SPECS[:num_classes]]


def _sibling(index: int, num_classes: int) -> int | None:
    """The other class of ``index``'s shared-body pair, when both are among the first ``num_classes``."""
    spec = CLASS_SPECS[index]
    if spec.part is None:
        return None
    for other in range(num_classes):
        cand = CLASS_SPECS[other]
        if other != index and cand.part is not None and cand.shape == spec.shape:
            return other
    return None


# --------------------------------------------------------------------------------------------------
# signed distance functions in object coordinates (u along the long axis, v across; unit = object radius).
# Every shape fits in the unit disc so the bounding box of an object of radius R is 2R x 2R at any rotation.
# Values are negative inside and approximate the Euclidean distance near the edge (used for anti-aliasing).

Array = np.ndarray


def _segment(u: Array, v: Array, a: tuple[float, float], b: tuple[float, float]) -> Array:
    """Distance to the segment a-b."""
    du, dv = b[0] - a[0], b[1] - a[1]
    h = np.clip(((u - a[0]) * du + (v - a[1]) * dv) / (du * du + dv * dv), 0.0, 1.0)
    return np.hypot(u - a[0] - h * du, v - a[1] - h * dv)


def _convex_polygon(u: Array, v: Array, vertices: list[tuple[float, float]]) -> Array:
    """Max of signed distances to the edge lines of a counter-clockwise convex polygon."""
    out = None
    count = len(vertices)
    for i in range(count):
        (x0, y0), (x1, y1) = vertices[i], vertices[(i + 1) % count]
        length = math.hypot(x1 - x0, y1 - y0)
        nx, ny = (y1 - y0) / length, (x0 - x1) / length  # outward normal of a CCW edge
        dist = (u - x0) * nx + (v - y0) * ny
        out = dist if out is None else np.maximum(out, dist)
    assert out is not None
    return out


def _regular_polygon(u: Array, v: Array, sides: int, radius: float, aspect: float, phase: float = 0.0) -> Array:
    verts = [(radius * math.cos(phase + 2 * math.pi * k / sides), aspect * radius * math.sin(phase + 2 * math.pi * k / sides))
             for k in range(sides)]
    return _convex_polygon(u, v, verts)


def _box(u: Array, v: Array, cu: float, half_u: float, half_v: float) -> Array:
    qu, qv = np.abs(u - cu) - half_u, np.abs(v) - half_v
    return np.hypot(np.maximum(qu, 0.0), np.maximum(qv, 0.0)) + np.minimum(np.maximum(qu, qv), 0.0)


def _ellipse(u: Array, v: Array, cu: float, a: float, b: float) -> Array:
    return (np.hypot((u - cu) / a, v / b) - 1.0) * b


def _shape_ellipse(u: Array, v: Array, aspect: float) -> Array:
    return _ellipse(u, v, 0.0, 0.95, 0.95 * aspect)


def _shape_box(u: Array, v: Array, aspect: float) -> Array:
    half_u = 0.95 / math.hypot(1.0, aspect)
    return _box(u, v, 0.0, half_u, half_u * aspect)


def _shape_triangle(u: Array, v: Array, aspect: float) -> Array:
    return _regular_polygon(u, v, 3, 0.97, aspect)


def _shape_hexagon(u: Array, v: Array, aspect: float) -> Array:
    return _regular_polygon(u, v, 6, 0.96, aspect)


def _shape_diamond(u: Array, v: Array, aspect: float) -> Array:
    return _regular_polygon(u, v, 4, 0.96, aspect)


def _shape_star(u: Array, v: Array, aspect: float, points: int = 5, inner: float = 0.42) -> Array:
    # Fold every point into the wedge between a spike (angle 0) and a valley (angle pi/points), then take
    # the signed distance to the straight edge joining them.
    r = np.hypot(u, v / aspect)
    theta = np.mod(np.arctan2(v / aspect, u), 2 * math.pi / points)
    theta = np.minimum(theta, 2 * math.pi / points - theta)
    pu, pv = r * np.cos(theta), r * np.sin(theta)
    ax, ay = 0.97, 0.0
    bx, by = 0.97 * inner * math.cos(math.pi / points), 0.97 * inner * math.sin(math.pi / points)
    length = math.hypot(bx - ax, by - ay)
    nx, ny = (by - ay) / length, (ax - bx) / length
    return (pu - ax) * nx + (pv - ay) * ny


def _shape_ring(u: Array, v: Array, aspect: float) -> Array:
    return np.abs(np.hypot(u, v / aspect) - 0.71) - 0.23


def _shape_cross(u: Array, v: Array, aspect: float) -> Array:
    return np.minimum(_box(u, v, 0.0, 0.90, 0.26 * aspect), _box(u, v, 0.0, 0.26, 0.90 * aspect))


def _shape_crescent(u: Array, v: Array, aspect: float) -> Array:
    return np.maximum(np.hypot(u, v) - 0.95, 0.78 - np.hypot(u - 0.42, v / aspect))


def _shape_gear(u: Array, v: Array, aspect: float, teeth: int = 8) -> Array:
    r = np.hypot(u, v / aspect)
    theta = np.arctan2(v / aspect, u)
    return r - (0.80 + 0.15 * np.clip(2.5 * np.cos(teeth * theta), -1.0, 1.0))


def _shape_chevron(u: Array, v: Array, aspect: float) -> Array:
    tip, width = (0.74, 0.0), 0.20
    return np.minimum(_segment(u, v, (-0.52, 0.58 * aspect), tip), _segment(u, v, (-0.52, -0.58 * aspect), tip)) - width


def _shape_semicircle(u: Array, v: Array, aspect: float) -> Array:
    return np.maximum(_ellipse(u, v, -0.30, 0.90, 0.90 * aspect), -(u + 0.30))


# Shared bodies of the class pairs: they span u in [-0.95, ~0.75], leaving the +u end to the part.
def _shape_baton(u: Array, v: Array, aspect: float) -> Array:
    width = 0.95 * aspect
    return _segment(u, v, (-0.95 + width, 0.0), (0.72 - width, 0.0)) - width


def _shape_bean(u: Array, v: Array, aspect: float) -> Array:
    return _ellipse(u, v, -0.12, 0.83, 0.83 * aspect)


def _shape_flag(u: Array, v: Array, aspect: float) -> Array:
    return _box(u, v, -0.10, 0.75, 0.75 * aspect)


def _shape_wedge(u: Array, v: Array, aspect: float) -> Array:
    return _convex_polygon(u, v, [(0.93, 0.0), (-0.80, 0.55 * aspect / 0.6), (-0.80, -0.55 * aspect / 0.6)])


# Non-class silhouettes of the distractors.
def _shape_blob(u: Array, v: Array, aspect: float, harmonics: tuple[tuple[float, float], ...] = ()) -> Array:
    """An irregular blob: a radius modulated by (amplitude, phase) harmonics of order 2, 3, ..."""
    r = np.hypot(u, v / aspect)
    theta = np.arctan2(v / aspect, u)
    radius = np.full_like(r, 1.0)
    for k, (amp, phase) in enumerate(harmonics, start=2):
        radius = radius + amp * np.cos(k * theta + phase)
    scale = 0.95 / (1.0 + sum(amp for amp, _ in harmonics))
    return r - scale * radius


def _shape_line(u: Array, v: Array, aspect: float) -> Array:
    """A straight band across the window; for the thin distractors ``aspect`` is the half-thickness."""
    return _segment(u, v, (-0.98, 0.0), (0.98, 0.0)) - aspect


def _shape_arc(u: Array, v: Array, aspect: float, span: float = 1.5) -> Array:
    """A circular arc of half-angle ``span`` (radians) and half-thickness ``aspect``."""
    r = np.hypot(u, v)
    band = np.abs(r - 0.8) - aspect
    return np.maximum(band, (np.abs(np.arctan2(v, u)) - span) * r)


def _shape_squiggle(u: Array, v: Array, aspect: float, waves: float = 2.0) -> Array:
    """A sine-shaped band of half-thickness ``aspect``."""
    return np.maximum(np.abs(v - 0.3 * np.sin(math.pi * waves * u)) - aspect, np.abs(u) - 0.9)


_SHAPES: dict[str, Callable[..., Array]] = {
    "ellipse": _shape_ellipse, "box": _shape_box, "triangle": _shape_triangle, "hexagon": _shape_hexagon,
    "diamond": _shape_diamond, "star": _shape_star, "ring": _shape_ring, "cross": _shape_cross,
    "crescent": _shape_crescent, "gear": _shape_gear, "chevron": _shape_chevron, "semicircle": _shape_semicircle,
    "baton": _shape_baton, "bean": _shape_bean, "flag": _shape_flag, "wedge": _shape_wedge,
    "blob": _shape_blob, "line": _shape_line, "arc": _shape_arc, "squiggle": _shape_squiggle,
}


def _part_sdf(u: Array, v: Array, part: PartSpec) -> Array:
    if part.shape == "disc":
        return np.hypot(u - part.center, v) - part.radius
    if part.shape == "square":
        return _box(u, v, part.center, part.radius, part.radius)
    raise ValueError(f"unknown part shape {part.shape!r}; expected 'disc' or 'square'")


# --------------------------------------------------------------------------------------------------
# textures: a mixing weight t in [0, 1] between the primary and the secondary colour

def _soft_square_wave(phase: Array, sharpness: float = 3.0) -> Array:
    """A square wave with soft (anti-aliased) edges from a phase in cycles."""
    return np.clip(0.5 + sharpness * np.sin(2 * math.pi * phase), 0.0, 1.0)


def _texture(kind: str, up: Array, vp: Array, u: Array, noise: Array, params: dict[str, float]) -> Array:
    """``up``/``vp``: object coordinates in pixels; ``u``: in object radii; ``noise``: a noise crop."""
    period = params.get("period", 8.0)
    if kind == "stripes":
        angle = params["angle"]
        return _soft_square_wave((up * math.cos(angle) + vp * math.sin(angle)) / period)
    if kind == "checker":
        return _soft_square_wave(up / period) * _soft_square_wave(vp / period) + (
            1 - _soft_square_wave(up / period)) * (1 - _soft_square_wave(vp / period))
    if kind == "dots":
        fu = up / period - np.round(up / period)
        fv = vp / period - np.round(vp / period)
        return np.clip((0.30 - np.hypot(fu, fv)) * period + 0.5, 0.0, 1.0)
    if kind == "noise":
        return np.clip((noise - 0.5) * 5.0 + 0.5, 0.0, 1.0)
    if kind == "gradient":
        return np.clip(0.5 - 0.55 * u, 0.0, 1.0)
    # Distractor textures: the same families with patterns no class uses.
    if kind == "wavy":
        return _soft_square_wave((up + 0.35 * period * np.sin(vp / period * 1.7)) / period)
    if kind == "hatch":
        return np.maximum(_soft_square_wave(up / period, 1.0), _soft_square_wave(vp / period, 1.0)) ** 4
    if kind == "target":
        return _soft_square_wave(np.hypot(up, vp) / period)
    if kind == "fine_noise":
        return noise
    if kind == "plain":
        return np.zeros_like(up)
    raise ValueError(f"unknown texture {kind!r}")


_DISTRACTOR_TEXTURES = ("wavy", "hatch", "target", "fine_noise", "plain")


def _hsv(hue: float, sat: float, val: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, min(max(sat, 0.0), 1.0), min(max(val, 0.0), 1.0)), np.float32) * 255.0


def _secondary(hue: float, sat: float, val: float, kind: str) -> np.ndarray:
    if kind == "dark":
        return _hsv(hue, sat, val * 0.35)
    return _hsv(hue, sat * 0.4, 0.45 + 0.45 * val)


# --------------------------------------------------------------------------------------------------
# rendering

@dataclass
class _Layer:
    """One rasterised shape: a window of the image with coverage and colour."""

    y0: int
    y1: int
    x0: int
    x1: int
    alpha: Array  # h x w coverage in [0, 1]
    color: Array  # h x w x 3, 0..255
    full_area: int  # pixels of the whole shape, including any part outside the image

    @property
    def hard(self) -> Array:
        return self.alpha > 0.5

    @property
    def truncated(self) -> bool:
        return int(self.hard.sum()) < self.full_area


@dataclass
class _Placement:
    cx: float
    cy: float
    radius: float  # pixels
    theta: float


def _object_frame(p: _Placement, size: int) -> tuple[tuple[int, int, int, int], tuple[slice, slice], Array, Array]:
    """Pixel window of a shape (unclipped bounds, the in-image slice) and object coordinates over it."""
    pad = p.radius + 1.5
    ux0, ux1 = int(math.floor(p.cx - pad)), int(math.ceil(p.cx + pad))
    uy0, uy1 = int(math.floor(p.cy - pad)), int(math.ceil(p.cy + pad))
    xs = np.arange(ux0, ux1, dtype=np.float32) + 0.5 - p.cx
    ys = np.arange(uy0, uy1, dtype=np.float32) + 0.5 - p.cy
    cos, sin = math.cos(p.theta), math.sin(p.theta)
    u = (xs[None, :] * cos + ys[:, None] * sin) / p.radius
    v = (-xs[None, :] * sin + ys[:, None] * cos) / p.radius
    inner = (slice(max(0, -uy0), max(0, min(uy1, size) - uy0)), slice(max(0, -ux0), max(0, min(ux1, size) - ux0)))
    return (uy0, uy1, ux0, ux1), inner, u.astype(np.float32), v.astype(np.float32)


def _rasterise(p: _Placement, size: int, sdf: Callable[[Array, Array], Array],
               paint: Callable[[Array, Array, tuple[int, int]], Array]) -> _Layer | None:
    """Evaluate ``sdf`` over the shape's window and ``paint`` (u, v, window origin) -> colour where it lands."""
    (uy0, uy1, ux0, ux1), inner, u, v = _object_frame(p, size)
    dist = sdf(u, v)
    alpha_full = np.clip(0.5 - dist * p.radius, 0.0, 1.0).astype(np.float32)
    full_area = int((alpha_full > 0.5).sum())
    if full_area == 0:
        return None
    u, v, alpha = u[inner], v[inner], alpha_full[inner]
    if alpha.size == 0 or not alpha.any():
        return None
    y0, x0 = uy0 + inner[0].start, ux0 + inner[1].start
    color = paint(u, v, (y0, x0))
    return _Layer(y0, y0 + alpha.shape[0], x0, x0 + alpha.shape[1], alpha, color, full_area)


class _Renderer:
    """Renders one image and its instance map from a random stream."""

    def __init__(self, rng: np.random.Generator, size: int, num_classes: int, noise: Array) -> None:
        self.rng = rng
        self.size = size
        self.num_classes = num_classes
        self.noise = noise

    # -- colour helpers --------------------------------------------------------------------------
    def _noise_crop(self, y0: int, x0: int, shape: tuple[int, int], offset: tuple[int, int]) -> Array:
        oy, ox = offset
        return self.noise[oy + y0: oy + y0 + shape[0], ox + x0: ox + x0 + shape[1]]

    def _noise_offset(self) -> tuple[int, int]:
        span = self.noise.shape[0] - self.size
        return int(self.rng.integers(0, span)), int(self.rng.integers(0, span))

    def _shading(self, u: Array, v: Array) -> Array:
        strength = self.rng.uniform(0.0, 0.22)
        phi = self.rng.uniform(0, 2 * math.pi)
        return (1.0 + strength * (u * math.cos(phi) + v * math.sin(phi)))[..., None]

    # -- scene parts -----------------------------------------------------------------------------
    def background(self) -> Array:
        rng, size = self.rng, self.size
        grid = int(rng.integers(3, 7))
        base_hue = rng.uniform()
        hues = base_hue + rng.normal(0.0, 0.12, (grid, grid))
        sats = rng.uniform(0.05, 0.55, (grid, grid))
        vals = rng.uniform(0.30, 0.90, (grid, grid))
        small = np.stack([np.stack([_hsv(h, s, v) for h, s, v in zip(hr, sr, vr)]) for hr, sr, vr in zip(hues, sats, vals)])
        channels = [np.asarray(Image.fromarray(small[..., c].astype(np.float32), mode="F").resize((size, size), Image.Resampling.BICUBIC))
                    for c in range(3)]
        field = np.stack(channels, axis=-1)
        offset = self._noise_offset()
        texture = self._noise_crop(0, 0, (size, size), offset)
        field = field * (1.0 + rng.uniform(0.1, 0.35) * (texture[..., None] - 0.5))
        return np.clip(field, 0.0, 255.0).astype(np.float32)

    def place_objects(self, primary: int) -> list[tuple[int, _Placement, float]]:
        """Classes, placements and aspects of 1-4 objects (back to front); the first is of class ``primary``."""
        rng, size = self.rng, self.size
        count = int(rng.choice(list(SCENE.object_counts), p=list(SCENE.object_count_p)))
        classes = [primary] + [int(rng.integers(self.num_classes)) for _ in range(count - 1)]
        sibling = _sibling(classes[0], self.num_classes)
        if count > 1 and sibling is not None and rng.uniform() < SCENE.sibling_p:
            # Pair members side by side: only the small parts tell them apart.
            classes[1] = sibling
        low, top = SCENE.object_size[0], SCENE.object_size[1] if count <= 2 else SCENE.object_size_crowded
        placed: list[tuple[int, _Placement, float]] = []
        for cls in classes:
            spec = CLASS_SPECS[cls]
            radius = max(_MIN_RADIUS_PX, 0.5 * size * math.exp(rng.uniform(math.log(low), math.log(top))))
            truncate = rng.uniform() < SCENE.truncate_p
            for _ in range(20):
                margin = 0.0 if truncate else 0.85 * radius
                lo, hi = margin, size - margin
                cx = rng.uniform(lo, hi) if hi > lo else size / 2
                cy = rng.uniform(lo, hi) if hi > lo else size / 2
                # Overlaps are allowed (occlusion), but not a centre inside another object's core.
                if all(math.hypot(cx - q.cx, cy - q.cy) > 0.6 * (radius + q.radius) for _, q, _ in placed):
                    break
            aspect = rng.uniform(*spec.aspect)
            placed.append((cls, _Placement(cx, cy, radius, rng.uniform(0, 2 * math.pi)), aspect))
        return placed

    def object_layer(self, cls: int, p: _Placement, aspect: float) -> _Layer | None:
        rng, spec = self.rng, CLASS_SPECS[cls]
        shape = _SHAPES[spec.shape]
        hue = spec.hue + rng.normal(0.0, 0.02)
        sat = spec.sat * rng.uniform(0.85, 1.15)
        val = spec.val * rng.uniform(0.85, 1.08)
        primary, secondary = _hsv(hue, sat, val), _secondary(hue, sat, val, spec.secondary)
        rel_period = {"stripes": (0.24, 0.34), "checker": (0.30, 0.40), "dots": (0.30, 0.40)}.get(spec.texture, (0.3, 0.3))
        params = {"period": max(3.5, p.radius * rng.uniform(*rel_period)), "angle": rng.uniform(0, math.pi)}
        offset = self._noise_offset()
        part = spec.part
        part_color = None if part is None else _hsv(part.hue + rng.normal(0.0, 0.015), part.sat, part.val * rng.uniform(0.9, 1.05))

        def sdf(u: Array, v: Array) -> Array:
            body = shape(u, v, aspect)
            return body if part is None else np.minimum(body, _part_sdf(u, v, part))

        def paint(u: Array, v: Array, origin: tuple[int, int]) -> Array:
            up, vp = u * p.radius, v * p.radius
            noise = self._noise_crop(origin[0], origin[1], u.shape, offset)
            t = _texture(spec.texture, up, vp, u, noise, params)[..., None]
            color = primary + t * (secondary - primary)
            if part is not None and part_color is not None:
                cover = np.clip(0.5 - _part_sdf(u, v, part) * p.radius, 0.0, 1.0)[..., None]
                color = color + cover * (part_color - color)
            return color * self._shading(u, v)

        return _rasterise(p, self.size, sdf, paint)

    def distractor_layer(self, front: bool) -> _Layer | None:
        rng, size = self.rng, self.size
        if front:
            # Thin lines and small blobs in front of the objects occlude parts of them.
            kind = str(rng.choice(["line", "squiggle", "blob"], p=[0.5, 0.25, 0.25]))
            radius = size * (rng.uniform(0.25, 0.6) if kind != "blob" else rng.uniform(0.03, 0.07))
        else:
            kind = str(rng.choice(["blob", "line", "arc", "squiggle"], p=[0.45, 0.2, 0.2, 0.15]))
            radius = size * rng.uniform(0.06, 0.3)
        p = _Placement(rng.uniform(0, size), rng.uniform(0, size), radius, rng.uniform(0, 2 * math.pi))
        if kind == "blob":
            harmonics = tuple((float(rng.uniform(0.0, 0.18)), float(rng.uniform(0, 2 * math.pi))) for _ in range(3))
            aspect = rng.uniform(0.5, 1.0)
            shape: Callable[[Array, Array], Array] = functools.partial(_shape_blob, aspect=aspect, harmonics=harmonics)
        else:
            thickness = rng.uniform(0.8, 2.5 if front else 5.0) / radius  # in object radii
            if kind == "arc":
                thickness = min(thickness, 0.15)
            shape = functools.partial(_SHAPES[kind], aspect=thickness)
        texture = str(rng.choice(_DISTRACTOR_TEXTURES))
        c1 = _hsv(rng.uniform(), rng.uniform(0.1, 0.9), rng.uniform(0.25, 0.95))
        c2 = _hsv(rng.uniform(), rng.uniform(0.1, 0.9), rng.uniform(0.25, 0.95))
        params = {"period": rng.uniform(3.0, 9.0)}
        offset = self._noise_offset()

        def paint(u: Array, v: Array, origin: tuple[int, int]) -> Array:
            noise = self._noise_crop(origin[0], origin[1], u.shape, offset)
            t = _texture(texture, u * p.radius, v * p.radius, u, noise, params)[..., None]
            return (c1 + t * (c2 - c1)) * self._shading(u, v)

        return _rasterise(p, size, shape, paint)


@dataclass
class SyntheticSample:
    """One rendered image: RGB uint8 HxWx3, label uint8 HxW (with the boundary band), objects."""

    image: Array
    label: Array
    objects: list[dict[str, Any]]  # class index (0-based), bbox (1-based inclusive xmin, ymin, xmax, ymax), truncated


def _boundary_band(instances: Array) -> Array:
    """Pixels whose 3x3 neighbourhood holds another instance id (a 2 px band on every edge, as VOC)."""
    padded = np.pad(instances, 1, mode="edge")
    h, w = instances.shape
    band = np.zeros(instances.shape, bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if dy == 1 and dx == 1:
                continue
            band |= padded[dy:dy + h, dx:dx + w] != instances
    return band


def render_sample(seed: int, split: str, index: int, size: int = 224, num_classes: int = MAX_CLASSES,
                  min_visible: float = 0.3) -> SyntheticSample:
    """Render image ``index`` of ``split``; a pure function of its arguments.

    Objects left with less than ``min_visible`` of their area visible (occlusion and image border
    together), or with almost nothing outside the boundary band, are dropped before painting, so every
    annotated object is recognisable and its class appears in the mask.
    """
    _check_num_classes(num_classes)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    renderer = _Renderer(rng, size, num_classes, _noise_tile(seed, size))
    canvas = renderer.background()
    back = [renderer.distractor_layer(front=False) for _ in range(int(rng.integers(*SCENE.back_distractors)))]
    # Cycling the first object's class keeps every class frequent in every split, even a small one.
    placed = renderer.place_objects(primary=(index + 7 * SPLITS.index(split)) % num_classes)
    rng.shuffle(placed)  # random depth order
    objects = [(cls, renderer.object_layer(cls, p, aspect)) for cls, p, aspect in placed]
    front = [renderer.distractor_layer(front=True) for _ in range(int(rng.integers(*SCENE.front_distractors)))]
    objs = [(cls, layer) for cls, layer in objects if layer is not None]
    fronts = [layer for layer in front if layer is not None]

    instances = np.zeros((size, size), np.int32)
    while True:
        instances[:] = 0
        for k, (_, layer) in enumerate(objs, start=1):
            instances[layer.y0:layer.y1, layer.x0:layer.x1][layer.hard] = k
        for layer in fronts:
            instances[layer.y0:layer.y1, layer.x0:layer.x1][layer.hard] = 0
        band = _boundary_band(instances)
        visible = np.bincount(instances.ravel(), minlength=len(objs) + 1)[1:]
        interior = np.bincount(instances[~band], minlength=len(objs) + 1)[1:]
        fractions = np.array([visible[k] / layer.full_area for k, (_, layer) in enumerate(objs)])
        failing = (fractions < min_visible) | (interior < _MIN_INTERIOR)
        if not failing.any():
            break
        if len(objs) > 1:
            # Drop the least visible failing object: removing it can only uncover the others.
            objs.pop(int(np.argmin(np.where(failing, fractions, np.inf))))
        elif fronts:
            fronts = []  # a lone object must stay recognisable: lift the distractors off it
        else:
            break

    for layer in [*(b for b in back if b is not None), *(layer for _, layer in objs), *fronts]:
        window = canvas[layer.y0:layer.y1, layer.x0:layer.x1]
        window += layer.alpha[..., None] * (layer.color - window)
    # Sensor noise (no flat colour areas), cropped from a shared tile: drawing it per image costs more than the rest.
    grain = _grain_tile(seed, size)
    gy, gx = (int(o) for o in rng.integers(0, grain.shape[0] - size, 2))
    canvas += grain[gy:gy + size, gx:gx + size]
    image = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)

    class_of_instance = np.array([0] + [cls + 1 for cls, _ in objs], np.uint8)
    label = class_of_instance[instances]
    label[band] = _IGNORE

    annotations = []
    for k, (cls, layer) in enumerate(objs, start=1):
        ys, xs = np.nonzero(instances == k)
        if ys.size == 0:
            continue
        annotations.append({"class_index": cls, "bbox": (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1),
                            "truncated": layer.truncated})
    return SyntheticSample(image, label, annotations)


@functools.lru_cache(maxsize=4)
def _noise_tile(seed: int, size: int) -> Array:
    """A multi-octave value-noise tile in [0, 1] shared by all images of a dataset (depends on seed only)."""
    rng = np.random.default_rng([seed, 1_000_003])
    tile = max(512, 2 * size)
    total = np.zeros((tile, tile), np.float32)
    weight = 0.0
    for cells, amp in ((tile // 64, 1.0), (tile // 24, 0.6), (tile // 8, 0.35), (tile // 3, 0.2)):
        grid = rng.random((cells, cells), dtype=np.float32)
        total += amp * np.asarray(Image.fromarray(grid, mode="F").resize((tile, tile), Image.Resampling.BICUBIC))
        weight += amp
    total /= weight
    lo, hi = np.percentile(total, [1, 99])
    return np.clip((total - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _grain_tile(seed: int, size: int) -> Array:
    """Gaussian pixel noise (std 3 grey levels) for crops of ``size``; depends on seed only."""
    rng = np.random.default_rng([seed, 1_000_033])
    return 3.0 * rng.standard_normal((2 * size, 2 * size, 3), dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# files

def _annotation_xml(image_id: str, size: int, objects: list[dict[str, Any]], class_names: list[str]) -> str:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2012"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "mmcst synthetic"
    ET.SubElement(source, "annotation").text = "mmcst synthetic"
    ET.SubElement(source, "image").text = "procedural"
    size_el = ET.SubElement(root, "size")
    ET.SubElement(size_el, "width").text = str(size)
    ET.SubElement(size_el, "height").text = str(size)
    ET.SubElement(size_el, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "1"
    for obj in objects:
        el = ET.SubElement(root, "object")
        ET.SubElement(el, "name").text = class_names[obj["class_index"]]
        ET.SubElement(el, "pose").text = "Unspecified"
        ET.SubElement(el, "truncated").text = "1" if obj["truncated"] else "0"
        ET.SubElement(el, "difficult").text = "0"
        box = ET.SubElement(el, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), obj["bbox"]):
            ET.SubElement(box, key).text = str(value)
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="unicode") + "\n"


def _image_id(split: str, index: int, n_train: int) -> str:
    return f"synth_{index + (n_train if split == 'val' else 0):06d}"


def _write_sample(task: tuple[str, str, int, str, int, int, int]) -> tuple[str, int, list[int]]:
    """Render and write one image (run in worker processes); returns (split, index, object classes)."""
    voc_root, split, index, image_id, size, seed, num_classes = task
    root = Path(voc_root)
    sample = render_sample(seed, split, index, size, num_classes)
    buffer = BytesIO()
    Image.fromarray(sample.image, mode="RGB").save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    atomic_write_bytes(root / "JPEGImages" / f"{image_id}.jpg", buffer.getvalue())
    save_label_png(root / "SegmentationClass" / f"{image_id}.png", sample.label)
    names = synthetic_class_names(num_classes)
    atomic_write_text(root / "Annotations" / f"{image_id}.xml", _annotation_xml(image_id, size, sample.objects, names))
    return split, index, [obj["class_index"] for obj in sample.objects]


def _check_num_classes(num_classes: int) -> None:
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")


def _check_clearable(voc_root: Path) -> None:
    """Refuse to delete a folder that holds anything the generator did not write."""
    for entry in voc_root.iterdir():
        if entry.name not in _LAYOUT_ENTRIES:
            raise DatasetError(f"{voc_root}: holds {entry.name!r}, which the synthetic generator did not write; "
                               "refusing to regenerate there (use another out_dir)", entry)
    for sub in ("JPEGImages", "SegmentationClass", "Annotations"):
        folder = voc_root / sub
        if folder.is_dir():
            for entry in folder.iterdir():
                if not (entry.name.startswith("synth_") or entry.name.endswith(".tmp")):
                    raise DatasetError(f"{folder}: holds {entry.name!r}, which is not a synthetic image; "
                                       "refusing to regenerate there (use another out_dir)", entry)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Serialise generators sharing an out_dir (e.g. distributed ranks), where the OS supports it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: callers must not generate the same folder concurrently
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def generate_synthetic(out_dir: str | os.PathLike, n_train: int = 2000, n_val: int = 300, size: int = 224,
                       seed: int = 0, num_classes: int = MAX_CLASSES, workers: int = 2,
                       progress: bool = True) -> Path:
    """Write the synthetic dataset under ``out_dir`` (if not already complete) and return its VOC2012 root.

    A complete dataset is recognised by its marker file, which records the parameters and is written
    last. With the same parameters the call returns at once; otherwise (different parameters, or an
    interrupted earlier run) the folder is cleared and written again. ``workers`` only changes speed.
    """
    _check_num_classes(num_classes)
    if n_train < 1 or n_val < 1:
        raise ValueError(f"n_train and n_val must be >= 1, got {n_train} and {n_val}")
    if not 32 <= size <= 2048:
        raise ValueError(f"size must be in 32..2048 pixels, got {size}")
    voc_root = Path(out_dir) / "VOCdevkit" / "VOC2012"
    params = {"generator_version": GENERATOR_VERSION, "n_train": n_train, "n_val": n_val, "size": size,
              "seed": seed, "num_classes": num_classes}
    with _exclusive(Path(out_dir) / ".mmcst_synthetic.lock"):
        marker = _read_marker(voc_root / MARKER_NAME)
        if marker is not None and marker.get("params") == params:
            return voc_root
        if voc_root.exists():
            _check_clearable(voc_root)
            shutil.rmtree(voc_root)
        start = time.perf_counter()
        counts = _generate(voc_root, params, workers, progress)
        names = synthetic_class_names(num_classes)
        ids = {split: [_image_id(split, i, n_train) for i in range(n)] for split, n in (("train", n_train), ("val", n_val))}
        ids["trainval"] = ids["train"] + ids["val"]
        for split, split_ids in ids.items():
            text = "".join(f"{i}\n" for i in split_ids)
            atomic_write_text(voc_root / "ImageSets" / "Segmentation" / f"{split}.txt", text)
            atomic_write_text(voc_root / "ImageSets" / "Main" / f"{split}.txt", text)
        for c, name in enumerate(names):
            for split, split_ids in ids.items():
                present = counts["present"][split] if split != "trainval" else {**counts["present"]["train"], **counts["present"]["val"]}
                lines = "".join(f"{i} {' 1' if c in present[i] else '-1'}\n" for i in split_ids)
                atomic_write_text(voc_root / "ImageSets" / "Main" / f"{name}_{split}.txt", lines)
        atomic_write_text(voc_root / "class_names.txt", "".join(f"{name}\n" for name in names))
        summary = {
            "params": params,
            "class_names": names,
            "counts": {split: {"images": len(ids[split]),
                               "class_images": dict(zip(names, counts["images"][split])),
                               "class_instances": dict(zip(names, counts["instances"][split]))}
                       for split in SPLITS},
            "generation_seconds": round(time.perf_counter() - start, 2),
        }
        atomic_write_json(voc_root / MARKER_NAME, summary)
    return voc_root


def _generate(voc_root: Path, params: dict[str, Any], workers: int, progress: bool) -> dict[str, Any]:
    n_train, num_classes = params["n_train"], params["num_classes"]
    tasks = [(str(voc_root), split, i, _image_id(split, i, n_train), params["size"], params["seed"], num_classes)
             for split, n in (("train", n_train), ("val", params["n_val"])) for i in range(n)]
    for sub in ("JPEGImages", "SegmentationClass", "Annotations"):
        (voc_root / sub).mkdir(parents=True, exist_ok=True)
    present: dict[str, dict[str, set[int]]] = {split: {} for split in SPLITS}
    images = {split: [0] * num_classes for split in SPLITS}
    instances = {split: [0] * num_classes for split in SPLITS}

    def results() -> Iterator[tuple[str, int, list[int]]]:
        if workers <= 1:
            yield from map(_write_sample, tasks)
            return
        # fork is cheap and safe here (workers touch only numpy and Pillow); elsewhere use the default.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        with multiprocessing.get_context(method).Pool(workers) as pool:
            yield from pool.imap_unordered(_write_sample, tasks, chunksize=8)

    from tqdm import tqdm

    for split, index, classes in tqdm(results(), total=len(tasks), disable=not progress, desc="synthetic", unit="img"):
        image_id = _image_id(split, index, n_train)
        present[split][image_id] = set(classes)
        for c in set(classes):
            images[split][c] += 1
        for c in classes:
            instances[split][c] += 1
    return {"present": present, "images": images, "instances": instances}


# --------------------------------------------------------------------------------------------------
# registry entry and script

@register_dataset("synthetic")
def synthetic_dataset(root: str | os.PathLike, split: str, n_train: int | None = None, n_val: int | None = None,
                      size: int | None = None, seed: int | None = None, num_classes: int | None = None,
                      workers: int = 2, progress: bool = False, **kwargs: Any) -> Any:
    """The synthetic dataset as a ``VOCDataset``; ``root`` is a cache folder, generated on first use.

    Parameters left as None take the values of the complete dataset already in ``root`` (so
    ``mmcst eval --dataset synthetic --root demo_out/data`` reads what the demo generated), else the
    defaults (2,000 train / 300 val images of 224 px, seed 0, 20 classes).
    Splits: ``train``, ``val``, ``trainval``. Extra keyword arguments go to ``VOCDataset``.
    """
    from mmcst.data.voc import VOCDataset

    given = {"n_train": n_train, "n_val": n_val, "size": size, "seed": seed, "num_classes": num_classes}
    marker = _read_marker(Path(root) / "VOCdevkit" / "VOC2012" / MARKER_NAME) or {}
    existing = marker.get("params") or {}
    defaults = {"n_train": 2000, "n_val": 300, "size": 224, "seed": 0, "num_classes": MAX_CLASSES}
    params = {k: v if v is not None else existing.get(k, defaults[k]) for k, v in given.items()}
    voc_root = generate_synthetic(root, workers=workers, progress=progress, **params)
    return VOCDataset(voc_root, split, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmcst.data.synthetic",
                                     description="Generate the synthetic VOC-layout dataset and print its statistics.")
    parser.add_argument("out_dir", help="folder that will hold VOCdevkit/VOC2012")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-val", type=int, default=300)
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-classes", type=int, default=MAX_CLASSES)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--force", action="store_true", help="regenerate even if a complete dataset is present")
    args = parser.parse_args(argv)
    voc_root = Path(args.out_dir) / "VOCdevkit" / "VOC2012"
    if args.force and (voc_root / MARKER_NAME).exists():
        (voc_root / MARKER_NAME).unlink()
    start = time.perf_counter()
    voc_root = generate_synthetic(args.out_dir, args.n_train, args.n_val, args.size, args.seed, args.num_classes,
                                  args.workers, progress=sys.stderr.isatty())
    elapsed = time.perf_counter() - start
    summary = json.loads((voc_root / MARKER_NAME).read_text())
    print(f"{voc_root}: {args.n_train} train + {args.n_val} val images at {args.size} px, "
          f"{elapsed:.1f} s this call ({summary['generation_seconds']} s generation, {args.workers} workers)")
    counts = summary["counts"]
    print(f"{'class':32s} {'train img':>9s} {'train obj':>9s} {'val img':>8s} {'val obj':>8s}")
    for name in summary["class_names"]:
        print(f"{name:32s} {counts['train']['class_images'][name]:9d} {counts['train']['class_instances'][name]:9d} "
              f"{counts['val']['class_images'][name]:8d} {counts['val']['class_instances'][name]:8d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
