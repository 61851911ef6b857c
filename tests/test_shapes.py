"""The shapes generator: determinism, held-out combinations, captions, and readability.

Readability is checked with a small independent reader (colour by projection on the
palette, position from the centroid, size from the area, shape from image moments),
at 32 px and after ingest's downscale to 16 px: the attributes a caption names must
be recoverable from the pixels, or a compositional evaluation means nothing.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.image_io import resize_image
from tasks.shapes import (
    distinct_images,
    BACKGROUNDS,
    COLOURS,
    POSITION_WORDS,
    POSITIONS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    ShapesConfig,
    ShapeSpec,
    default_shapes_dir,
    describe,
    generate_shapes,
    heldout_pairs,
    render_shapes,
)


def records(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "set", ShapesConfig(n_images=400, seed=11))


# --- vocabulary ---------------------------------------------------------------------------------------


def test_vocabulary_is_read_only_and_well_separated():
    with pytest.raises(TypeError):
        COLOURS["pink"] = (255, 192, 203)  # type: ignore[index]
    palette = {**COLOURS, **BACKGROUNDS}
    for (a, ca), (b, cb) in [(x, y) for x in palette.items() for y in palette.items() if x[0] < y[0]]:
        assert np.linalg.norm(np.subtract(ca, cb)) > 120, (a, b)
    assert set(POSITION_WORDS) == set(POSITIONS) and set(SIZE_WORDS) == set(SIZES)
    assert SIZES["large"] / SIZES["small"] > 1.4


# --- rendering ---------------------------------------------------------------------------------------------


def test_render_is_crisp_and_places_shapes_by_centroid():
    spec = ShapeSpec("red", "triangle", "large", "top left")
    pixels = np.asarray(render_shapes([spec], 32, "grey"))
    colours = {tuple(c) for c in pixels.reshape(-1, 3)}
    assert colours == {COLOURS["red"], BACKGROUNDS["grey"]}  # no anti-aliasing: two colours only
    ys, xs = np.nonzero((pixels == COLOURS["red"]).all(-1))
    assert abs(xs.mean() + 0.5 - 8) < 0.6 and abs(ys.mean() + 0.5 - 8) < 0.6  # centroid at (1/4, 1/4) of 32


@pytest.mark.parametrize("shape, fill", [("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)])
def test_shapes_fill_their_bounding_box_as_geometry_says(shape, fill):
    pixels = np.asarray(render_shapes([ShapeSpec("white", shape, "large", "centre")], 128, "black"))
    mask = pixels[..., 0] > 0
    ys, xs = np.nonzero(mask)
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    assert abs(mask.sum() / box - fill) < 0.04
    assert xs.max() - xs.min() + 1 == pytest.approx(2 * SIZES["large"] * 128, abs=1.5)


def test_every_position_and_size_stays_inside_the_image():
    for position in POSITIONS:
        for shape in SHAPES:
            spec = ShapeSpec("white", shape, "large", position, offset=(1 / 32, -1 / 32))
            full = np.asarray(render_shapes([spec], 32, "black"))[..., 0] > 0
            big = np.asarray(render_shapes([spec], 320, "black"))[..., 0] > 0
            assert full.any() and abs(big.mean() - full.mean()) < 0.02  # not clipped by the border


# --- generation -------------------------------------------------------------------------------------------


def test_generation_is_deterministic_for_a_seed(tmp_path: Path):
    config = ShapesConfig(n_images=40, seed=3)
    a = generate_shapes(tmp_path / "a", config)
    b = generate_shapes(tmp_path / "b", config)
    c = generate_shapes(tmp_path / "c", config.model_copy(update={"seed": 4}))

    def digest(root: Path) -> str:
        h = hashlib.sha256()
        for path in sorted(root.rglob("*")):
            if path.is_file():
                h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
        return h.hexdigest()

    assert digest(a) == digest(b) != digest(c)


def test_generation_is_idempotent_and_refuses_to_mix_configs(tmp_path: Path):
    config = ShapesConfig(n_images=10)
    out = generate_shapes(tmp_path / "s", config)
    mtime = (out / "metadata.jsonl").stat().st_mtime_ns
    assert generate_shapes(out, config) == out and (out / "metadata.jsonl").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="another config"):
        generate_shapes(out, ShapesConfig(n_images=11))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        generate_shapes(tmp_path / "busy", config)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_layout_and_ground_truth(shapes_dir: Path):
    assert sorted(p.name for p in shapes_dir.iterdir()) == ["heldout.json", "images", "metadata.jsonl", "shapes.json"]
    rows = records(shapes_dir)
    assert len(rows) == 400 and len(list((shapes_dir / "images").iterdir())) == 400
    counts = Counter(len(r["objects"]) for r in rows)
    assert counts[1] > 0.6 * len(rows) and counts[2] > 0.1 * len(rows)  # mostly single shapes
    first = Image.open(shapes_dir / rows[0]["file_name"])
    assert (first.format, first.size, first.mode) == ("PNG", (32, 32), "RGB")
    images = {hashlib.sha256((shapes_dir / r["file_name"]).read_bytes()).hexdigest() for r in rows}
    assert len(images) == len(rows)  # no exact duplicates for ingest to drop
    for r in rows:
        if len(r["objects"]) == 2:
            a, b = r["objects"]
            assert a["colour"] != b["colour"] and a["position"] != b["position"]


def test_heldout_pairs_never_appear_in_training(shapes_dir: Path):
    config = ShapesConfig(n_images=400, seed=11)
    held = heldout_pairs(config)
    assert len(held) == round(0.1 * len(COLOURS) * len(SHAPES))
    saved = json.loads((shapes_dir / "heldout.json").read_text())
    assert [tuple(p) for p in saved["colour_shape"]] == held
    assert saved["prompts"] and all(any(c in p["text"] and s in p["text"] for c, s in held) for p in saved["prompts"])
    seen = Counter()
    for r in records(shapes_dir):
        for o in r["objects"]:
            assert (o["colour"], o["shape"]) not in held
            seen[o["colour"]] += 1
            seen[o["shape"]] += 1
        for colour, shape in held:
            assert f"{colour} {shape}" not in r["text"]
    assert all(seen[c] > 0 for c in COLOURS) and all(seen[s] > 0 for s in SHAPES)  # each attribute still taught


def test_captions_name_the_attributes_in_varied_wordings(shapes_dir: Path):
    rows = records(shapes_dir)
    for r in rows:
        for o in r["objects"]:
            assert o["colour"] in r["text"] and o["shape"] in r["text"]
            assert any(word in r["text"] for word in POSITION_WORDS[o["position"]])
    assert len({r["text"] for r in rows}) > 0.8 * len(rows)
    spec = ShapeSpec("red", "circle", "small", "top left")
    wordings = {describe([spec], "black", random.Random(i)) for i in range(200)}
    assert "a small red circle in the top left" in wordings
    assert "red circle, upper left, on black" in wordings
    assert len(wordings) > 20


def test_config_validation():
    with pytest.raises(ValueError, match="colours"):
        ShapesConfig(colours=("red", "pink"))
    with pytest.raises(ValueError, match="extra"):
        ShapesConfig(n_image=3)
    with pytest.raises(ValueError, match="two-shape"):
        ShapesConfig(colours=("red",), max_shapes=2)
    assert ShapesConfig(n_images=500, colours=("red",), max_shapes=1).colours == ("red",)
    assert default_shapes_dir(ShapesConfig()).name.startswith("shapes-")
    assert default_shapes_dir(ShapesConfig()) != default_shapes_dir(ShapesConfig(seed=1))


def test_task_wrapper_writes_to_the_default_folder(tmp_path: Path):
    from tasks.shapes import shapes_task

    config = ShapesConfig(n_images=5)
    path = shapes_task.fn(config)
    assert Path(path) == default_shapes_dir(config) and (Path(path) / "metadata.jsonl").is_file()
    assert shapes_task.fn(config, str(tmp_path / "here")) == str(tmp_path / "here")


# --- readability ----------------------------------------------------------------------------------------------

_AREA = {"square": 4.0, "circle": np.pi, "triangle": 1.5}  # area / half-side^2, from the geometry


def read_objects(pixels: np.ndarray, background: str) -> dict[str, dict]:
    """Attributes per colour present: an independent reader, not the generator's own code."""
    res = pixels.shape[0]
    bg = np.array(BACKGROUNDS[background], float)
    offset = pixels.astype(float) - bg  # (H, W, 3)
    ys, xs = np.mgrid[0:res, 0:res] + 0.5
    found = {}
    for name, rgb in COLOURS.items():
        direction = np.array(rgb, float) - bg
        alpha = np.clip(offset @ direction / (direction @ direction), 0, 1)  # (H, W) coverage by this colour
        residual = np.linalg.norm(offset - alpha[..., None] * direction, axis=-1)
        w = np.where((residual < 60) & (alpha > 0.15), alpha, 0.0)
        if w.sum() < 0.01 * res * res:
            continue
        cx, cy = (w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()
        w = np.where((xs - cx) ** 2 + (ys - cy) ** 2 < (0.3 * res) ** 2, w, 0.0)  # this shape only
        m = w.sum()
        cx, cy = (w * xs).sum() / m, (w * ys).sum() / m
        dx, dy = xs - cx, ys - cy
        vx, vy = (w * dx**2).sum() / m, (w * dy**2).sum() / m
        skew_y = (w * dy**3).sum() / m / vy**1.5  # a triangle pointing up: mass towards its base
        coupling = (w * dx**2 * dy**2).sum() / m / (vx * vy)  # square 1 (x, y independent), disc 2/3
        shape = "triangle" if skew_y < -0.2 else ("square" if coupling > 0.8 else "circle")
        half = np.sqrt(m / _AREA[shape]) / res
        size = "large" if half > np.sqrt(SIZES["small"] * SIZES["large"]) else "small"
        col = ("left", "centre", "right")[min(2, int(3 * cx / res))]
        row = ("top", "centre", "bottom")[min(2, int(3 * cy / res))]
        position = "centre" if (row, col) == ("centre", "centre") else f"{row} {col}"
        found[name] = {"shape": shape, "size": size, "position": position}
    return found


@pytest.mark.parametrize("resolution", [32, 16])
def test_attributes_can_be_read_back_from_pixels(shapes_dir: Path, resolution: int):
    correct = total = 0
    for r in records(shapes_dir):
        image = Image.open(shapes_dir / r["file_name"]).convert("RGB")
        if resolution != image.width:
            image = resize_image(image, resolution, "center_crop")  # what ingest does
        found = read_objects(np.asarray(image), r["background"])
        for o in r["objects"]:
            total += 1
            got = found.get(o["colour"])
            correct += got == {"shape": o["shape"], "size": o["size"], "position": o["position"]}
    assert correct / total >= 0.99, f"{correct}/{total} objects read back at {resolution} px"


def test_distinct_image_count_is_exactly_what_the_generator_can_draw(tmp_path: Path):
    # A small space: 2 colours x 1 shape x 3 positions (only the two corners are separated)
    # x 1 size x 1 background, no jitter at 16 px: 6 one-shape images, and 2 two-shape ones
    # (red left and blue right, or the other way round) -- 8 in all, none held out.
    small = dict(
        resolution=16, colours=("red", "blue"), shapes=("square",), positions=("top left", "top centre", "top right"),
        sizes=("large",), backgrounds=("black",), heldout_fraction=0.0, two_shape_fraction=0.5,
    )  # fmt: skip
    assert distinct_images(ShapesConfig(n_images=1, **small)) == (6, 2)
    root = generate_shapes(tmp_path / "all", ShapesConfig(n_images=8, **small))
    records = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert sorted(len(r["objects"]) for r in records) == [1] * 6 + [2] * 2
    with pytest.raises(ValueError, match=r"n_images=9 exceeds the 8 distinct images .* \(6 with one shape, 2 with two\)"):
        ShapesConfig(n_images=9, **small)
    # the shipped sizes: 32 px has 6,156 + 39,424 (so 50,000 is refused before any drawing)
    assert distinct_images(ShapesConfig(resolution=32)) == (6156, 39424)
    with pytest.raises(ValueError, match="45,580 distinct images"):
        ShapesConfig(n_images=50_000, resolution=32)


def test_holding_out_fewer_pairs_than_asked_says_so(tmp_path, caplog):
    # One colour: holding out any (colour, shape) pair would take that shape out of training.
    config = ShapesConfig(colours=["red"], max_shapes=1, n_images=20, heldout_fraction=0.5)
    assert heldout_pairs(config) == []
    generate_shapes(tmp_path / "one-colour", config)
    assert caplog.text.count("0 (colour, shape) pairs held out, not the 2") == 1  # once, when generating
    caplog.clear()
    generate_shapes(tmp_path / "default", ShapesConfig(n_images=20))
    assert "held out" not in caplog.text


def test_drawing_below_the_smallest_readable_size_says_how_to_get_small_images(tmp_path, caplog):
    generate_shapes(tmp_path / "small", ShapesConfig(n_images=8, resolution=16))
    assert caplog.text.count("drawing shapes at 16 px: below 32 px") == 1
    assert "(ingest.resolution=16)" in caplog.text
    caplog.clear()
    generate_shapes(tmp_path / "small", ShapesConfig(n_images=8, resolution=16))  # already there: nothing drawn, no warning
    generate_shapes(tmp_path / "readable", ShapesConfig(n_images=8, resolution=32))
    assert "drawing shapes at" not in caplog.text
