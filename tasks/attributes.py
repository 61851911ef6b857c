"""Attribute checker for the `shapes` dataset: what a caption asks for, what an image shows.

No learned model: the vocabulary and geometry come from `tasks/shapes.py`, so a score
measures the diffusion model, not a second network.

- `parse_caption("a small red circle in the top left")` -> the shapes a caption names
  (every wording the generator writes, one or two shapes).
- `read_shapes(image)` -> the shapes an image shows. The background colour is the median of
  the border pixels; the foreground is what lies far from it. Colour: the named colour in
  whose direction from the background a pixel lies (so dim or edge pixels keep their colour),
  or black for a grey pixel darker than the background;
  the foreground of each colour splits into connected blobs. Per blob: a soft coverage map
  (each pixel's fraction of the way from the background to the blob's core colour, so
  anti-aliased or downscaled edges count in part) gives the centroid -> position (the third
  of the image it falls in, as the generator places shapes) and the area. Shape and size
  together: the (shape, size) whose ideal coverage, rendered by the generator's own
  `render_shapes` 4x supersampled at the measured centroid, is nearest (least squares) to
  the coverage map. That compares fill ratio, corners and area in one number and works from
  16 px (a small shape is ~5 px across) up.
- `score_prompts(expected, images)` -> colour, shape, position and size accuracy.

    detections = read_shapes(Image.open("sample.png"))
    detections[0].colour, detections[0].shape, detections[0].position, detections[0].size
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tasks.shapes import (
    BACKGROUNDS,
    COLOURS,
    POSITION_WORDS,
    POSITIONS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    ShapeSpec,
    render_shapes,
)

ATTRIBUTES = ("colour", "shape", "position", "size")

# Every shape colour is >= 220 (Euclidean, 0..255 RGB) from every background; a pixel this
# far from the background is foreground. A third of the gap: a half-covered edge pixel
# (~110 away) still counts, mild sampling noise does not.
FOREGROUND_DISTANCE = 75.0
# Blobs smaller than a quarter of the smallest shape (a small triangle) are noise.
MIN_AREA_FRACTION = 0.25 * 1.5 * min(SIZES.values()) ** 2
SUPERSAMPLE = 4  # sub-pixels per pixel side for the ideal coverage templates
# The colours `read_shapes` names: the palette, and black, which no prompt names (see there).
READ_COLOURS = {**COLOURS, "black": BACKGROUNDS["black"]}
# A pixel whose channels differ by less than this is grey (no hue); darker than the background, black.
NEUTRAL_SPREAD = 48.0


@dataclass(frozen=True)
class ShapeAttributes:
    """What a caption says about one shape; `size` is None for wordings that do not name one."""

    colour: str
    shape: str
    position: str
    size: str | None = None

    @classmethod
    def from_spec(cls, spec: ShapeSpec | dict) -> ShapeAttributes:
        d = spec if isinstance(spec, dict) else spec.to_json()
        return cls(colour=d["colour"], shape=d["shape"], position=d["position"], size=d.get("size"))


@dataclass(frozen=True)
class ParsedCaption:
    objects: tuple[ShapeAttributes, ...]
    background: str | None = None


@dataclass(frozen=True)
class Detection:
    """One shape read from an image. Fractions are of the image side (centroid) or area."""

    colour: str  # a palette colour, or "black" (a dark shape on grey: no prompt's colour)
    shape: str
    size: str
    position: str
    centroid: tuple[float, float]  # (x, y)
    area: float
    rgb: tuple[float, float, float]  # mean colour of the core pixels, 0..255
    colour_distance: float  # from `rgb` to the named colour; large: the model drew an off-palette colour


# ---------------------------------------------------------------------------------------------
# Captions


def _alternation(words) -> str:
    # Longest first, so "top left corner" wins over "top left" and "centre left" over "centre".
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_OBJECT_RE = re.compile(rf"\b({_alternation(COLOURS)}) ({_alternation(SHAPES)})\b")
_SIZE_OF = {w: size for size, words in SIZE_WORDS.items() for w in words}
_SIZE_RE = re.compile(rf"\b({_alternation(_SIZE_OF)})\b")
_POSITION_OF = {w: pos for pos, words in POSITION_WORDS.items() for w in words}
_POSITION_RE = re.compile(rf"\b({_alternation(_POSITION_OF)})\b")
_BACKGROUND_RE = re.compile(rf"\b(?:on (?:an? )?({_alternation(BACKGROUNDS)})\b|({_alternation(BACKGROUNDS)}) background\b)")


def parse_caption(caption: str) -> ParsedCaption | None:
    """The shapes a shapes-dataset caption names, in order; None if it is not such a caption.

    Each shape is "<colour> <shape>" in every generator wording; its position and size words
    follow in the same order as the shapes. A caption whose counts do not line up (a position
    per shape; a size per shape or none at all) is not understood, so None.
    """
    text = caption.lower()
    objects = _OBJECT_RE.findall(text)
    positions = [_POSITION_OF[m] for m in _POSITION_RE.findall(text)]
    sizes = [_SIZE_OF[m] for m in _SIZE_RE.findall(text)]
    if not objects or len(positions) != len(objects) or len(sizes) not in (0, len(objects)):
        return None
    sizes_or_none = sizes or [None] * len(objects)
    bg = _BACKGROUND_RE.search(text)
    return ParsedCaption(
        objects=tuple(
            ShapeAttributes(colour=c, shape=s, position=p, size=z)
            for (c, s), p, z in zip(objects, positions, sizes_or_none, strict=True)
        ),
        background=None if bg is None else (bg.group(1) or bg.group(2)),
    )


def prompt_for(attrs: ShapeAttributes) -> str:
    """The canonical wording, "a small red circle in the top left" (the generator's first template)."""
    words = f"{attrs.size} {attrs.colour}" if attrs.size else attrs.colour
    article = "an" if words[0] in "aeiou" else "a"
    return f"{article} {words} {attrs.shape} in the {attrs.position}"


# ---------------------------------------------------------------------------------------------
# Images


def read_shapes(image: Image.Image | np.ndarray, max_shapes: int = 2) -> list[Detection]:
    """The shapes in `image` (PIL RGB or (H, W, 3) array in 0..255), largest first, at most `max_shapes`."""
    pixels = _as_pixels(image)  # (H, W, 3) float64
    h, w, _ = pixels.shape
    if h != w:
        raise ValueError(f"the shapes checker reads square images, got {w}x{h}")
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])  # (4H-4, 3)
    background = np.median(border, axis=0)  # (3,)
    offset = pixels - background  # (H, W, 3)
    distance = np.linalg.norm(offset, axis=-1)  # (H, W)
    foreground = distance > FOREGROUND_DISTANCE
    # Colour class of each pixel: the palette colour in whose direction from the background it
    # lies (cosine). Mixing with the background (edges, downscaling) keeps the direction, so an
    # edge pixel keeps its shape's colour; two shapes of different colours stay apart even
    # where downscaling blurs the gap between them (the generator never pairs equal colours).
    names = list(COLOURS)
    palette = np.asarray([COLOURS[n] for n in names], dtype=np.float64) - background  # (C, 3)
    palette /= np.maximum(np.linalg.norm(palette, axis=-1, keepdims=True), 1e-6)
    colour_class = (offset @ palette.T).argmax(axis=-1)  # (H, W)
    # Black, which no prompt names: from a grey background a dark grey pixel lies as much towards
    # red as green or blue, and would read as red (the first of them). A pixel with (nearly)
    # equal channels, darker than the background, is black; a dark but coloured one (navy, dark
    # red) keeps its colour. On a black background nothing is darker: black never wins there.
    dark_grey = (np.ptp(pixels, axis=-1) < NEUTRAL_SPREAD) & (pixels.mean(axis=-1) < background.mean())  # (H, W)
    colour_class = np.where(dark_grey, len(names), colour_class)
    names.append("black")

    ys, xs = np.mgrid[0:h, 0:w] + 0.5  # pixel centres
    blobs = []  # (area, colour, coverage (H, W), core rgb)
    # A shape's thresholded blob holds well over a quarter of its soft area.
    min_pixels = MIN_AREA_FRACTION * h * w / 4
    for c, name in enumerate(names):
        for coords in _components(foreground & (colour_class == c)):
            if len(coords) < min_pixels:  # cannot reach the minimum area (speeds up noisy samples)
                continue
            # Work in the blob's bounding box grown by one pixel (noisy samples have many blobs).
            (y0, x0), (y1, x1) = np.maximum(coords.min(0) - 1, 0), np.minimum(coords.max(0) + 2, (h, w))
            blob = np.zeros((y1 - y0, x1 - x0), dtype=bool)
            blob[coords[:, 0] - y0, coords[:, 1] - x0] = True
            box_distance, box_offset = distance[y0:y1, x0:x1], offset[y0:y1, x0:x1]
            # Core: the blob's pixels nearly as far from the background as its farthest (edges are mixed).
            core = blob & (box_distance >= 0.7 * box_distance[blob].max())
            rgb = pixels[y0:y1, x0:x1][core].mean(axis=0)  # (3,)
            # Soft coverage on the blob and its 1-pixel ring (not other foreground pixels): the
            # fraction of the way from the background to the core colour, in [0, 1].
            region = _dilate(blob) & (blob | ~foreground[y0:y1, x0:x1])
            direction = rgb - background
            box_alpha = np.clip(box_offset @ direction / max(direction @ direction, 1e-6), 0.0, 1.0)
            box_alpha = np.where(region, box_alpha, 0.0)
            area = float(box_alpha.sum())
            if area >= MIN_AREA_FRACTION * h * w:
                alpha = np.zeros((h, w))
                alpha[y0:y1, x0:x1] = box_alpha
                blobs.append((area, name, alpha, rgb))
    blobs.sort(key=lambda b: b[0], reverse=True)

    detections = []
    for area, name, alpha, rgb in blobs[:max_shapes]:  # template matching only for the shapes returned
        cx, cy = float((alpha * xs).sum() / area / w), float((alpha * ys).sum() / area / h)
        shape, size = _match_template(alpha, cx, cy)
        detections.append(
            Detection(
                colour=name,
                shape=shape,
                size=size,
                position=position_of(cx, cy),
                centroid=(cx, cy),
                area=area / (h * w),
                rgb=tuple(float(v) for v in rgb),
                colour_distance=float(np.linalg.norm(rgb - np.asarray(READ_COLOURS[name], dtype=np.float64))),
            )
        )
    return detections


def position_of(cx: float, cy: float) -> str:
    """The named position whose third of the image (along x and along y) holds the centroid."""
    col, row = min(int(cx * 3), 2), min(int(cy * 3), 2)
    return _POSITION_BY_CELL[(max(col, 0), max(row, 0))]


_POSITION_BY_CELL = {(round((x - 0.25) * 4), round((y - 0.25) * 4)): name for name, (x, y) in POSITIONS.items()}


def _as_pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    pixels = np.asarray(image, dtype=np.float64)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {pixels.shape}")
    return pixels


def _match_template(alpha: np.ndarray, cx: float, cy: float) -> tuple[str, str]:
    """The (shape, size) whose ideal coverage at centroid (cx, cy) is nearest to `alpha` (least squares)."""
    best, best_error = ("", ""), np.inf
    for shape in SHAPES:
        for size in SIZES:
            template = _coverage(shape, size, alpha.shape[0], cx, cy)
            error = float(((alpha - template) ** 2).sum())
            if error < best_error:
                best, best_error = (shape, size), error
    return best


def _coverage(shape: str, size: str, resolution: int, cx: float, cy: float) -> np.ndarray:
    """Fraction of each pixel the generator's shape covers when centred at (cx, cy) (fractions of the side)."""
    # Drawn with the generator's own geometry: position "centre" plus the offset to the centroid.
    spec = ShapeSpec("white", shape, size, "centre", offset=(cx - 0.5, cy - 0.5))
    fine = np.asarray(render_shapes([spec], resolution * SUPERSAMPLE, "black"))[..., 0] / 255.0  # (sH, sW)
    return fine.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE).mean(axis=(1, 3))  # (H, W)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """8-neighbour dilation by one pixel."""
    h, w = mask.shape
    out = mask.copy()
    out[1:, :] |= mask[:-1, :]
    out[:-1, :] |= mask[1:, :]
    rows = out.copy()
    out[:, 1:] |= rows[:, :-1]
    out[:, :-1] |= rows[:, 1:]
    return out


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, each as its (K, 2) array of (y, x) pixels."""
    h, w = mask.shape
    seen = np.zeros((h, w), dtype=bool)
    components = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, pixels = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        components.append(np.asarray(pixels, dtype=np.int64))
    return components


# ---------------------------------------------------------------------------------------------
# Scores


def match_objects(expected: Sequence[ShapeAttributes], detections: Sequence[Detection]) -> list[Detection | None]:
    """Pair each expected shape with a detection: the one of its colour if any, else the largest left
    once every colour match is made (so a shape missing its colour never takes another's match)."""
    left = list(detections)
    matched: list[Detection | None] = []
    for attrs in expected:
        pick = next((d for d in left if d.colour == attrs.colour), None)
        if pick is not None:
            left.remove(pick)
        matched.append(pick)
    for i, pick in enumerate(matched):
        if pick is None and left:
            matched[i] = left.pop(0)
    return matched


def score_prompts(
    expected: Sequence[Sequence[ShapeAttributes]], images: Sequence[Image.Image | np.ndarray]
) -> dict[str, float]:
    """Prompt adherence over images, one list of expected shapes per image.

    `<attr>_acc`: share of expected shapes whose attribute the image shows (a missing shape
    counts as wrong on all four; size only where the prompt names one). `accuracy`: the mean
    of the four. `all_correct`: share of images showing every named attribute of every shape.
    """
    if len(expected) != len(images):
        raise ValueError(f"got {len(expected)} expected attribute lists for {len(images)} images")
    if not expected:
        raise ValueError("score_prompts needs at least one image")
    right = {a: 0 for a in ATTRIBUTES}
    total = {a: 0 for a in ATTRIBUTES}
    all_correct = 0
    for objects, image in zip(expected, images, strict=True):
        detections = read_shapes(image, max_shapes=max(2, len(objects)))
        ok_image = True
        for attrs, found in zip(objects, match_objects(objects, detections), strict=True):
            for a in ATTRIBUTES:
                want = getattr(attrs, a)
                if want is None:
                    continue
                ok = found is not None and getattr(found, a) == want
                right[a] += ok
                total[a] += 1
                ok_image &= ok
        all_correct += ok_image
    scores = {f"{a}_acc": right[a] / total[a] if total[a] else float("nan") for a in ATTRIBUTES}
    scores["accuracy"] = float(np.nanmean([scores[f"{a}_acc"] for a in ATTRIBUTES]))
    scores["all_correct"] = all_correct / len(expected)
    return scores
