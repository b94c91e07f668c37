"""Draws one view of a generated product with PIL.

Shapes are laid out on a unit canvas (x right, y down, garment centred at x = 0.5) and pushed
through a per-view jitter (scale, shift, small rotation) before drawing, then noise is added, so
two renders of the same product never match pixel for pixel.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .attributes import COLOURS

Point = tuple[float, float]
SKIN = (224, 186, 160)
DARK = (30, 30, 35)


def wearer_x(side: str, view: str, offset: float) -> float:
    """Image x of a point ``offset`` from the centre line on the wearer's ``side``.

    Facing the camera (front) the wearer's left is on the image's right; from the back it is on
    the image's left. Getting this wrong makes "pocket on the left" contradict the pixels.
    """
    sign = 1.0 if side == "left" else -1.0
    if view == "back":
        sign = -sign
    return 0.5 + sign * offset


@dataclass
class Jitter:
    scale: float
    dx: float
    dy: float
    angle: float

    @classmethod
    def sample(cls, rng: random.Random) -> Jitter:
        return cls(rng.uniform(0.88, 1.06), rng.uniform(-0.05, 0.05), rng.uniform(-0.04, 0.04),
                   rng.uniform(-4.0, 4.0))


class Canvas:
    """Unit-square drawing surface with jitter applied to every point."""

    def __init__(self, size: int, background: tuple[int, int, int], jitter: Jitter) -> None:
        self.size = size
        self.image = Image.new("RGB", (size, size), background)
        self.draw = ImageDraw.Draw(self.image)
        self.jitter = jitter
        a = math.radians(jitter.angle)
        self._cos, self._sin = math.cos(a), math.sin(a)

    def px(self, p: Point) -> Point:
        x, y = p[0] - 0.5, p[1] - 0.5
        x, y = x * self._cos - y * self._sin, x * self._sin + y * self._cos
        s = self.jitter.scale
        return ((0.5 + s * x + self.jitter.dx) * self.size, (0.5 + s * y + self.jitter.dy) * self.size)

    def polygon(self, pts: list[Point], fill: tuple[int, int, int] | None = None,
                outline: tuple[int, int, int] | None = None, width: int = 1) -> None:
        self.draw.polygon([self.px(p) for p in pts], fill=fill, outline=outline, width=width)

    def line(self, pts: list[Point], fill: tuple[int, int, int], width: float) -> None:
        self.draw.line([self.px(p) for p in pts], fill=fill, width=max(1, round(width * self.size)))

    def circle(self, c: Point, r: float, fill: tuple[int, int, int]) -> None:
        pts = [(c[0] + r * math.cos(t), c[1] + r * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 12)[:-1]]
        self.polygon(pts, fill=fill)

    def rect(self, x0: float, y0: float, x1: float, y1: float, **kw: object) -> None:
        self.polygon([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], **kw)  # type: ignore[arg-type]


def _shade(c: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    if sum(c) > 600:  # white: lighten cannot show, darken instead
        f = -abs(f)
    return tuple(int(min(255, max(0, v + f * 255))) for v in c)  # type: ignore[return-value]


def _contrast(c: tuple[int, int, int]) -> tuple[int, int, int]:
    return DARK if sum(c) > 380 else (240, 240, 235)


# --- silhouettes -------------------------------------------------------------------------------

_HEM_Y = {
    "dress": {"short": 0.62, "knee-length": 0.76, "long": 0.92},
    "shirt": {"short": 0.52, "knee-length": 0.62, "long": 0.72},
    "top": {"short": 0.48, "knee-length": 0.58, "long": 0.68},
    "skirt": {"short": 0.56, "knee-length": 0.72, "long": 0.9},
    "pants": {"short": 0.52, "knee-length": 0.7, "long": 0.92},
}


def _body(attrs: dict[str, str], width: float) -> list[list[Point]]:
    """Garment polygons; ``width`` < 1 narrows them for side views."""
    cat, hem = attrs["category"], _HEM_Y[attrs["category"]][attrs["hem"]]

    def xs(off: float) -> tuple[float, float]:
        return 0.5 - off * width, 0.5 + off * width

    if cat == "skirt":
        (a, b), (c, d) = xs(0.13), xs(0.25 if attrs["hem"] != "short" else 0.2)
        return [[(a, 0.34), (b, 0.34), (d, hem), (c, hem)]]
    if cat == "pants":
        (a, b), (c, d) = xs(0.14), xs(0.17)
        gap = 0.015 * width
        return [[(a, 0.3), (0.5 + gap, 0.3), (0.5 + gap, 0.42), (0.5 - gap, hem), (c, hem)],
                [(0.5 - gap, 0.3), (b, 0.3), (d, hem), (0.5 + gap, hem), (0.5 - gap, 0.42)]]
    flare = {"dress": 0.25, "shirt": 0.17, "top": 0.15}[cat]
    (s0, s1), (w0, w1), (h0, h1) = xs(0.16), xs(0.13), xs(flare)
    return [[(s0, 0.18), (s1, 0.18), (w1, 0.42), (h1, hem), (h0, hem), (w0, 0.42)]]


def _sleeves(attrs: dict[str, str], width: float) -> list[list[Point]]:
    if attrs.get("sleeve", "sleeveless") == "sleeveless":
        return []
    end_y = 0.34 if attrs["sleeve"] == "short" else 0.6
    out = []
    for sign in (-1.0, 1.0):
        sx = 0.5 + sign * 0.16 * width
        reach = (0.12 if attrs["sleeve"] == "short" else 0.1) * max(width, 0.35)
        out.append([(sx, 0.18), (sx + sign * reach, end_y - 0.02), (sx + sign * (reach - 0.06), end_y),
                    (sx, 0.3)])
    return out


def _pattern(size: int, attrs: dict[str, str], rng: random.Random) -> Image.Image:
    base = COLOURS[attrs["colour"]]
    img = Image.new("RGB", (size, size), base)
    d = ImageDraw.Draw(img)
    alt = _shade(base, 0.32)
    kind = attrs["pattern"]
    step = max(4, size // 12)
    if kind == "stripes":
        for y in range(0, size, step):
            d.rectangle([0, y, size, y + step // 2], fill=alt)
    elif kind == "checks":
        for y in range(0, size, step):
            for x in range(0, size, step):
                if (x // step + y // step) % 2:
                    d.rectangle([x, y, x + step - 1, y + step - 1], fill=alt)
    elif kind == "dots":
        r = max(1, step // 4)
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                d.ellipse([x - r, y - r, x + r, y + r], fill=alt)
    elif kind == "print":
        ink = _contrast(base)
        for _ in range(size):
            x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(step / 4, step / 2)
            d.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=ink if rng.random() < 0.5 else alt)
    return img


# --- views ---------------------------------------------------------------------------------------


def _garment(canvas: Canvas, attrs: dict[str, str], width: float, rng: random.Random) -> None:
    """Fill the silhouette with the pattern through a mask, so patterns follow the garment outline."""
    mask_canvas = Canvas(canvas.size, (0, 0, 0), canvas.jitter)
    for poly in _body(attrs, width) + _sleeves(attrs, width):
        mask_canvas.polygon(poly, fill=(255, 255, 255))
    canvas.image.paste(_pattern(canvas.size, attrs, rng), (0, 0), mask_canvas.image.convert("L"))
    edge = _shade(COLOURS[attrs["colour"]], -0.25)
    for poly in _body(attrs, width):
        canvas.polygon(poly, outline=edge)


def _upper(attrs: dict[str, str]) -> bool:
    return "neckline" in attrs


def _front(canvas: Canvas, attrs: dict[str, str], rng: random.Random, view: str = "front") -> None:
    _garment(canvas, attrs, 1.0, rng)
    base = COLOURS[attrs["colour"]]
    if _upper(attrs) and view == "front":
        neck = attrs["neckline"]
        if neck == "crew":
            canvas.polygon([(0.45, 0.18), (0.55, 0.18), (0.53, 0.22), (0.47, 0.22)], fill=SKIN)
        elif neck == "v-neck":
            canvas.polygon([(0.44, 0.18), (0.56, 0.18), (0.5, 0.3)], fill=SKIN)
        elif neck == "square":
            canvas.rect(0.44, 0.18, 0.56, 0.25, fill=SKIN)
        elif neck == "turtleneck":
            canvas.rect(0.45, 0.12, 0.55, 0.19, fill=_shade(base, -0.12))
        if attrs["category"] == "shirt":
            canvas.line([(0.5, 0.24), (0.5, 0.5)], fill=_shade(base, -0.35), width=0.01)
    detail = attrs.get("front_detail", "none")
    if detail == "none":
        return
    side, kind = detail.split()
    top = 0.26 if _upper(attrs) else 0.38
    ink = _contrast(base)
    if view == "front":
        x = wearer_x(side, "front", 0.075)
        if kind == "pocket":
            canvas.rect(x - 0.035, top, x + 0.035, top + 0.06, outline=ink, width=max(1, canvas.size // 48))
        else:
            canvas.circle((x, top + 0.03), 0.03, fill=ink)
    elif view == "back" and kind == "logo":
        x = wearer_x(side, "back", 0.1)
        canvas.rect(x - 0.018, top - 0.04, x + 0.018, top - 0.005, fill=ink)


def _back(canvas: Canvas, attrs: dict[str, str], rng: random.Random) -> None:
    _front(canvas, attrs, rng, view="back")
    if not _upper(attrs):
        return
    base = COLOURS[attrs["colour"]]
    design = attrs["back"]
    if design == "open back":
        canvas.polygon([(0.43, 0.21), (0.57, 0.21), (0.55, 0.38), (0.5, 0.41), (0.45, 0.38)], fill=SKIN)
    elif design == "criss-cross straps":
        canvas.rect(0.43, 0.21, 0.57, 0.38, fill=SKIN)
        canvas.line([(0.43, 0.21), (0.57, 0.38)], fill=_shade(base, -0.2), width=0.025)
        canvas.line([(0.57, 0.21), (0.43, 0.38)], fill=_shade(base, -0.2), width=0.025)
    elif design == "back zipper":
        canvas.line([(0.5, 0.19), (0.5, 0.46)], fill=DARK, width=0.015)
        for y in np.linspace(0.21, 0.44, 6):
            canvas.line([(0.49, y), (0.51, y)], fill=(200, 200, 200), width=0.006)
    elif design == "back graphic":
        ink = _contrast(base)
        c = (0.5, 0.32)
        star = [(c[0] + (0.07 if i % 2 == 0 else 0.03) * math.sin(i * math.pi / 5),
                 c[1] - (0.07 if i % 2 == 0 else 0.03) * math.cos(i * math.pi / 5)) for i in range(10)]
        canvas.polygon(star, fill=ink)


def _side(canvas: Canvas, attrs: dict[str, str], rng: random.Random) -> None:
    _garment(canvas, attrs, 0.45, rng)
    hem = _HEM_Y[attrs["category"]][attrs["hem"]]
    top = 0.3 if attrs["category"] == "pants" else (0.34 if attrs["category"] == "skirt" else 0.2)
    detail = attrs.get("side_detail", "none")
    base = COLOURS[attrs["colour"]]
    if detail == "side slit":
        canvas.polygon([(0.49, hem), (0.51, hem), (0.5, hem - 0.12)], fill=SKIN)
    elif detail == "side stripe":
        canvas.rect(0.49, top + 0.02, 0.51, hem - 0.01, fill=_contrast(base))
    elif detail == "side zipper":
        canvas.line([(0.5, top + 0.05), (0.5, top + 0.2)], fill=DARK, width=0.015)


def render_view(attrs: dict[str, str], view: str, size: int, rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(200, 250) for _ in range(3))
    jitter = Jitter.sample(rng)
    if view == "detail":
        # Zoomed crop of the front torso: a separate, larger render so details stay sharp.
        big = Canvas(size * 2, bg, Jitter(1.0, rng.uniform(-0.02, 0.02), rng.uniform(-0.02, 0.02), 0.0))
        _front(big, attrs, rng)
        cy = 0.3 if _upper(attrs) else 0.42
        box = (int(size * 0.5), int(size * 2 * (cy - 0.25)), int(size * 1.5), int(size * 2 * (cy + 0.25)))
        img = big.image.crop(box).resize((size, size), Image.BILINEAR)
    else:
        canvas = Canvas(size, bg, jitter)
        if view == "front":
            _front(canvas, attrs, rng)
        elif view == "back":
            _back(canvas, attrs, rng)
        elif view in ("side_left", "side_right"):
            _side(canvas, attrs, rng)
        else:
            raise ValueError(f"unknown view {view!r}")
        img = canvas.image
        if view == "side_right":
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.int16)
    noise = np.random.default_rng(rng.getrandbits(32)).integers(-10, 11, size=arr.shape, dtype=np.int16)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))
