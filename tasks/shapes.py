"""The built-in `shapes` caption dataset: the default demo data, and the ground truth for evaluation.

`generate_shapes(out_dir, ShapesConfig(...))` writes a source in the imagefolder layout
that `tasks/ingest.py` reads:

    out_dir/images/000000.png ...   one or two coloured shapes on a plain background
    out_dir/metadata.jsonl          file_name, text, background, objects (ground truth per shape)
    out_dir/heldout.json            (colour, shape) pairs that never occur, with prompts for them
    out_dir/shapes.json             the config that generated the folder

Captions name colour, shape, size and position in varied wordings ("a small red
circle in the top left", "red circle, upper left, on black"). The same seed gives the
same bytes. Shapes are drawn without anti-aliasing in pure colours far apart in RGB,
on backgrounds unlike every shape colour, centred in a 3x3 grid with a gap between
neighbours, so an attribute checker can read them back even after downscaling to 16 px.
`render_shapes` draws one image from attributes, for evaluation; `shapes_task` is
the Prefect wrapper of `generate_shapes`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.checkpoint import temp_dir
from tasks.prefect_compat import task
from tasks.settings import get_settings

# The smallest side at which every shape class draws apart from the others (the attribute
# checker reads the generator's own images right at 32 px and above); a smaller dataset is
# best drawn at this size and scaled down by ingest, as cpu-demo does.
MIN_SHAPES_RESOLUTION = 32

log = logging.getLogger(__name__)

# Attribute vocabularies (read-only). Every shape colour differs from every other one,
# and from every background, by 255 in at least one channel (grey: by >= 127 in each).
COLOURS: MappingProxyType[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (255, 0, 0),
        "green": (0, 255, 0),
        "blue": (0, 0, 255),
        "yellow": (255, 255, 0),
        "magenta": (255, 0, 255),
        "cyan": (0, 255, 255),
        "white": (255, 255, 255),
    }
)
BACKGROUNDS: MappingProxyType[str, tuple[int, int, int]] = MappingProxyType({"black": (0, 0, 0), "grey": (128, 128, 128)})
# Fill ratios of their bounding boxes differ (square 1, circle pi/4, triangle 1/2),
# which keeps them apart even at a few pixels across.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Half the bounding-box side, as a fraction of the image side: ~10 px vs ~14 px across at 32 px.
SIZES: MappingProxyType[str, float] = MappingProxyType({"small": 0.15, "large": 0.22})
# Shape centres (x, y) as fractions of the side: a 3x3 grid. Centres sit at 1/4, 1/2, 3/4
# (not the cell centres 1/6, 1/2, 5/6) so that a large shape never leaves the image;
# each still lies in its own third of the image, which is how a checker reads position.
POSITIONS: MappingProxyType[str, tuple[float, float]] = MappingProxyType(
    {
        "top left": (0.25, 0.25),
        "top centre": (0.5, 0.25),
        "top right": (0.75, 0.25),
        "centre left": (0.25, 0.5),
        "centre": (0.5, 0.5),
        "centre right": (0.75, 0.5),
        "bottom left": (0.25, 0.75),
        "bottom centre": (0.5, 0.75),
        "bottom right": (0.75, 0.75),
    }
)
# Wordings used in captions for each canonical name.
POSITION_WORDS: MappingProxyType[str, tuple[str, ...]] = MappingProxyType(
    {
        "top left": ("top left", "upper left", "top left corner"),
        "top centre": ("top centre", "top middle", "upper middle"),
        "top right": ("top right", "upper right", "top right corner"),
        "centre left": ("centre left", "middle left", "left middle"),
        "centre": ("centre", "center", "middle"),
        "centre right": ("centre right", "middle right", "right middle"),
        "bottom left": ("bottom left", "lower left", "bottom left corner"),
        "bottom centre": ("bottom centre", "bottom middle", "lower middle"),
        "bottom right": ("bottom right", "lower right", "bottom right corner"),
    }
)
SIZE_WORDS: MappingProxyType[str, tuple[str, ...]] = MappingProxyType({"small": ("small", "little"), "large": ("large", "big")})

_SINGLE_TEMPLATES = (
    "{a} {size} {colour} {shape} in the {pos}",
    "{colour} {shape}, {pos}, on {bg}",
    "{a} {size} {colour} {shape} at the {pos} on a {bg} background",
    "{size} {colour} {shape}, {pos}",
    "there is {a} {size} {colour} {shape} in the {pos} of the image",
    "{a} {colour} {shape} ({size}) in the {pos}, {bg} background",
)
_PAIR_TEMPLATES = (
    "{a1} {size1} {colour1} {shape1} in the {pos1} and {a2} {size2} {colour2} {shape2} in the {pos2}",
    "{colour1} {shape1} {pos1}, {colour2} {shape2} {pos2}, on {bg}",
    "two shapes on a {bg} background: {a1} {size1} {colour1} {shape1} in the {pos1} "
    "and {a2} {size2} {colour2} {shape2} in the {pos2}",
    "{a1} {colour1} {shape1} ({size1}, {pos1}) next to {a2} {colour2} {shape2} ({size2}, {pos2})",
)


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    size: str
    position: str
    offset: tuple[float, float] = (0.0, 0.0)  # of the centre, as fractions of the side

    def to_json(self) -> dict:
        return {**asdict(self), "offset": list(self.offset)}


class ShapesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    n_images: int = Field(1000, ge=1)
    resolution: int = Field(32, ge=8, le=1024, description=f"pixels per side; below {MIN_SHAPES_RESOLUTION} a warning (see MIN_SHAPES_RESOLUTION)")
    seed: int = 0
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    sizes: tuple[str, ...] = tuple(SIZES)
    positions: tuple[str, ...] = tuple(POSITIONS)
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    max_shapes: int = Field(2, ge=1, le=2)
    two_shape_fraction: float = Field(0.25, ge=0.0, le=1.0, description="share of two-shape images if max_shapes=2")
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of (colour, shape) pairs never shown")
    jitter_px: int = Field(
        1,
        ge=0,
        le=2,
        description="random shift of single shapes in pixels, capped at 4% of the side (none below 25 px) "
        "so a shape stays inside the image and in its third",
    )

    @model_validator(mode="after")
    def _check(self) -> ShapesConfig:
        for field, vocab in (
            ("colours", COLOURS),
            ("shapes", SHAPES),
            ("sizes", SIZES),
            ("positions", POSITIONS),
            ("backgrounds", BACKGROUNDS),
        ):
            values = getattr(self, field)
            unknown = [v for v in values if v not in vocab]
            if unknown or not values or len(set(values)) != len(values):
                raise ValueError(f"{field} must be distinct names from {list(vocab)}; got {list(values)}")
        if self.max_shapes == 2 and self.two_shape_fraction > 0:
            if len(self.colours) < 2 or not _separated_position_pairs(self.positions):
                raise ValueError("two-shape images need two colours and two positions that are not neighbours")
        singles, pairs = distinct_images(self)
        if self.n_images > singles + pairs:
            raise ValueError(
                f"n_images={self.n_images} exceeds the {singles + pairs:,} distinct images this attribute space has at "
                f"{self.resolution} px ({singles:,} with one shape, {pairs:,} with two); lower n_images, or allow more "
                "colours, positions, sizes or backgrounds (jitter_px adds one-shape offsets, up to 4% of the side)"
            )
        return self


def distinct_images(config: ShapesConfig) -> tuple[int, int]:
    """(one-shape, two-shape) counts of the distinct images `config` can draw; the generator
    never repeats an image. One shape: pair x position x size x background x jitter offset.
    Two shapes: two objects of different colours (pair x size each) on an ordered pair of
    separated positions, no jitter (listing the pair the other way round is the same image)."""
    held = set(heldout_pairs(config))
    allowed = [(c, s) for c in config.colours for s in config.shapes if (c, s) not in held]
    offsets = (2 * _jitter_px(config) + 1) ** 2
    singles = len(allowed) * len(config.positions) * len(config.sizes) * len(config.backgrounds) * offsets
    if config.max_shapes < 2 or config.two_shape_fraction == 0:
        return singles, 0
    objects = [(c, s, z) for c, s in allowed for z in config.sizes]  # (colour, shape, size)
    ordered = sum(1 for a in objects for b in objects if a[0] != b[0])
    return singles, ordered * len(_separated_position_pairs(config.positions)) * len(config.backgrounds)


def render_shapes(
    specs: Sequence[ShapeSpec], resolution: int, background: str | tuple[int, int, int] = "black"
) -> Image.Image:
    """Draw shapes in pure colours, without anti-aliasing; each centred on its position (+ offset).

    A pixel belongs to a shape when its centre lies inside; triangles point up and
    are placed by their centroid, so every shape's centroid is its position.
    """
    bg = BACKGROUNDS[background] if isinstance(background, str) else tuple(background)
    pixels = np.empty((resolution, resolution, 3), dtype=np.uint8)  # (H, W, 3)
    pixels[:] = bg
    ys, xs = np.mgrid[0:resolution, 0:resolution] + 0.5  # pixel centres, (H, W) each
    for spec in specs:
        px, py = POSITIONS[spec.position]
        dx = xs - (px + spec.offset[0]) * resolution
        dy = ys - (py + spec.offset[1]) * resolution
        h = SIZES[spec.size] * resolution
        if spec.shape == "circle":
            mask = dx**2 + dy**2 <= h**2
        elif spec.shape == "square":
            mask = (np.abs(dx) <= h) & (np.abs(dy) <= h)
        elif spec.shape == "triangle":
            # apex at -h, base at +h/2 (height 1.5h, base 2h): the centroid, (apex + 2 base) / 3, is at 0.
            mask = (dy >= -h) & (dy <= h / 2) & (np.abs(dx) <= (dy + h) / 1.5)
        else:
            raise ValueError(f"unknown shape {spec.shape!r}; known: {SHAPES}")
        pixels[mask] = COLOURS[spec.colour]
    return Image.fromarray(pixels, "RGB")


def describe(specs: Sequence[ShapeSpec], background: str, rng: random.Random) -> str:
    """A caption in one of several wordings; every wording names colour, shape and position."""

    def words(spec: ShapeSpec, suffix: str = "") -> dict[str, str]:
        size = rng.choice(SIZE_WORDS[spec.size])
        return {
            f"a{suffix}": _article(size),
            f"size{suffix}": size,
            f"colour{suffix}": spec.colour,
            f"shape{suffix}": spec.shape,
            f"pos{suffix}": rng.choice(POSITION_WORDS[spec.position]),
        }

    if len(specs) == 1:
        fields = words(specs[0])
        template = rng.choice(_SINGLE_TEMPLATES)
        if template.startswith("{a} {colour}"):
            fields["a"] = _article(specs[0].colour)
        return template.format(bg=background, **fields)
    if len(specs) == 2:
        fields = {**words(specs[0], "1"), **words(specs[1], "2")}
        template = rng.choice(_PAIR_TEMPLATES)
        if "{a1} {colour1}" in template:
            fields["a1"], fields["a2"] = _article(specs[0].colour), _article(specs[1].colour)
        return template.format(bg=background, **fields)
    raise ValueError(f"captions describe one or two shapes, got {len(specs)}")


def heldout_pairs(config: ShapesConfig) -> list[tuple[str, str]]:
    """(colour, shape) pairs kept out of training; every colour and shape still appears otherwise.

    Picked in a seeded order, preferring pairs that share no colour or shape with
    those already held out, so a compositional test varies both attributes.
    """
    pairs = [(c, s) for c in config.colours for s in config.shapes]
    n = _heldout_wanted(config)
    order = random.Random(f"heldout-{config.seed}").sample(pairs, len(pairs))
    held: list[tuple[str, str]] = []
    for distinct in (True, False):
        for pair in order:
            if len(held) == n:
                break
            if pair in held or (distinct and any(pair[0] == h[0] or pair[1] == h[1] for h in held)):
                continue
            kept = [p for p in pairs if p not in held and p != pair]
            if {c for c, _ in kept} == set(config.colours) and {s for _, s in kept} == set(config.shapes):
                held.append(pair)
    return sorted(held)


def _heldout_wanted(config: ShapesConfig) -> int:
    """How many (colour, shape) pairs `heldout_fraction` asks to hold out."""
    return 0 if config.heldout_fraction == 0 else max(1, round(config.heldout_fraction * len(config.colours) * len(config.shapes)))


def generate_shapes(out_dir: str | Path, config: ShapesConfig | None = None) -> Path:
    """Write the shapes source into `out_dir` (atomically); a no-op if it already holds this config."""
    config = config or ShapesConfig()
    out_dir = Path(out_dir)
    recorded = out_dir / "shapes.json"
    if recorded.is_file():
        if json.loads(recorded.read_text(encoding="utf-8")) == config.model_dump(mode="json"):
            return out_dir
        raise ValueError(f"{out_dir} holds a shapes set generated with another config; choose a new folder or delete it")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty and is not a shapes set; choose an empty or new folder")

    if config.resolution < MIN_SHAPES_RESOLUTION:
        log.warning(
            "drawing shapes at %d px: below %d px some shape classes share their pixels, and the attribute checker "
            "misreads some of the generator's own images; draw at %d px and let ingest scale them down "
            "(ingest.resolution=%d), as cpu-demo does", config.resolution, MIN_SHAPES_RESOLUTION,
            MIN_SHAPES_RESOLUTION, config.resolution,
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out_dir.parent, f".tmp-{out_dir.name}-")
    try:
        _write_shapes(tmp, config)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


@task(name="shapes", retries=1)
def shapes_task(config: ShapesConfig | None = None, out_dir: str | None = None) -> str:
    """Prefect wrapper of `generate_shapes`: the source folder path, for `ingest_task`.

    No cache key is needed: generating a folder that already holds this config is a
    no-op, and the content (hence the dataset version) is the same for the same config.
    """
    config = config or ShapesConfig()
    return str(generate_shapes(Path(out_dir) if out_dir else default_shapes_dir(config), config))


def default_shapes_dir(config: ShapesConfig | None = None) -> Path:
    """`<data_root>/raw/shapes-<config hash>`: one folder per distinct config."""
    config = config or ShapesConfig()
    digest = hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    return get_settings().raw_dir / f"shapes-{digest[:12]}"


def _write_shapes(root: Path, config: ShapesConfig) -> None:
    rng = random.Random(config.seed)
    held = heldout_pairs(config)
    if len(held) < _heldout_wanted(config):
        log.warning("shapes: %d (colour, shape) pairs held out, not the %d heldout_fraction=%s asks for: holding out "
                    "more would leave a colour or shape out of training entirely",
                    len(held), _heldout_wanted(config), config.heldout_fraction)
    allowed = [(c, s) for c in config.colours for s in config.shapes if (c, s) not in held]
    pair_positions = _separated_position_pairs(config.positions)
    two_shapes = config.max_shapes == 2 and config.two_shape_fraction > 0
    (root / "images").mkdir()
    seen: set[bytes] = set()
    with open(root / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for index in range(config.n_images):
            for _ in range(1000):
                background = rng.choice(config.backgrounds)
                # Drawn per attempt: once the single-shape space is used up (small
                # resolutions have no jitter), retries end up as two-shape images.
                if two_shapes and rng.random() < config.two_shape_fraction:
                    specs = _sample_pair(rng, config, allowed, pair_positions)
                else:
                    specs = [_sample_single(rng, config, allowed)]
                image = render_shapes(specs, config.resolution, background)
                key = hashlib.sha256(image.tobytes()).digest()
                if key not in seen:  # ingest dedupes exact copies; make none
                    seen.add(key)
                    break
            else:
                raise ValueError(
                    f"cannot draw {config.n_images} distinct images from this attribute space; "
                    "lower n_images or allow more colours, shapes, positions or jitter"
                )
            file_name = f"images/{index:06d}.png"
            image.save(root / file_name, "PNG")
            record = {
                "file_name": file_name,
                "text": describe(specs, background, rng),
                "background": background,
                "objects": [s.to_json() for s in specs],
            }
            meta.write(json.dumps(record, sort_keys=True) + "\n")
    heldout = {
        "colour_shape": [list(p) for p in held],
        "prompts": _heldout_prompts(held, config),
        "note": "no training image contains these (colour, shape) pairs",
    }
    (root / "heldout.json").write_text(json.dumps(heldout, indent=2) + "\n", encoding="utf-8")
    (root / "shapes.json").write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")


def _sample_single(rng: random.Random, config: ShapesConfig, allowed: list[tuple[str, str]]) -> ShapeSpec:
    colour, shape = rng.choice(allowed)
    j = _jitter_px(config)
    offset = (rng.randint(-j, j) / config.resolution, rng.randint(-j, j) / config.resolution)
    return ShapeSpec(colour, shape, rng.choice(config.sizes), rng.choice(config.positions), offset)


def _jitter_px(config: ShapesConfig) -> int:
    return min(config.jitter_px, int(0.04 * config.resolution))


def _sample_pair(
    rng: random.Random,
    config: ShapesConfig,
    allowed: list[tuple[str, str]],
    pair_positions: list[tuple[str, str]],
) -> list[ShapeSpec]:
    # Two shapes never share a colour (a checker separates them by colour) and never sit
    # in neighbouring cells; no jitter, so the gap between them stays.
    first = rng.choice(allowed)
    second = rng.choice([p for p in allowed if p[0] != first[0]])
    positions = list(rng.choice(pair_positions))
    rng.shuffle(positions)
    return [
        ShapeSpec(first[0], first[1], rng.choice(config.sizes), positions[0]),
        ShapeSpec(second[0], second[1], rng.choice(config.sizes), positions[1]),
    ]


def _separated_position_pairs(positions: Sequence[str]) -> list[tuple[str, str]]:
    """Pairs of positions at least two grid cells apart along x or y."""

    def cell(name: str) -> tuple[int, int]:
        x, y = POSITIONS[name]
        return round(x * 4), round(y * 4)  # 1..3

    return [
        (a, b)
        for a, b in combinations(positions, 2)
        if max(abs(cell(a)[0] - cell(b)[0]), abs(cell(a)[1] - cell(b)[1])) >= 2
    ]


def _heldout_prompts(held: list[tuple[str, str]], config: ShapesConfig) -> list[dict]:
    prompts = []
    positions = [p for p in ("centre", "top left", "bottom right") if p in config.positions] or [config.positions[0]]
    for colour, shape in held:
        for size in config.sizes:
            for position in positions:
                spec = ShapeSpec(colour, shape, size, position)
                prompts.append(
                    {
                        "text": f"{_article(size)} {size} {colour} {shape} in the {position}",
                        "background": config.backgrounds[0],
                        "objects": [spec.to_json()],
                    }
                )
    return prompts


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"
