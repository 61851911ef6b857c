"""The shapes attribute checker: captions parsed in every generator wording, and attributes read
back from the generator's ground-truth images (>= 99% per attribute) at 16, 32 and 64 px."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.attributes import (
    ATTRIBUTES,
    ShapeAttributes,
    match_objects,
    parse_caption,
    prompt_for,
    read_shapes,
    score_prompts,
)
from tasks import shapes
from tasks.image_io import resize_image
from tasks.shapes import (
    BACKGROUNDS,
    COLOURS,
    POSITION_WORDS,
    POSITIONS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    ShapesConfig,
    ShapeSpec,
    describe,
    generate_shapes,
    render_shapes,
)

# --- captions ---------------------------------------------------------------------------------------


def _random_specs(rng: random.Random) -> list[ShapeSpec]:
    colours = rng.sample(list(COLOURS), 2)
    positions = rng.sample(list(POSITIONS), 2)
    n = rng.choice([1, 2])
    return [ShapeSpec(colours[i], rng.choice(SHAPES), rng.choice(list(SIZES)), positions[i]) for i in range(n)]


def test_parse_caption_reads_every_generator_wording():
    rng = random.Random(0)
    size_word = re.compile(r"\b(" + "|".join(w for ws in SIZE_WORDS.values() for w in ws) + r")\b")
    for _ in range(600):
        specs = _random_specs(rng)
        background = rng.choice(list(BACKGROUNDS))
        caption = describe(specs, background, rng)
        parsed = parse_caption(caption)
        assert parsed is not None, caption
        names_size = size_word.search(caption) is not None  # some wordings name no size
        expected = tuple(
            ShapeAttributes(s.colour, s.shape, s.position, s.size if names_size else None) for s in specs
        )
        assert parsed.objects == expected, caption
        if background in caption:
            assert parsed.background == background, caption


@pytest.mark.parametrize("template", [*shapes._SINGLE_TEMPLATES, *shapes._PAIR_TEMPLATES])
def test_parse_caption_reads_each_template_with_every_position_wording(template):
    # every template, with each wording of each position (the random test above samples them)
    for i, (position, words) in enumerate(POSITION_WORDS.items()):
        other = list(POSITIONS)[(i + 4) % len(POSITIONS)]
        for word in words:
            fields = {"bg": "grey", "a": "a", "size": "little", "colour": "red", "shape": "triangle", "pos": word,
                      "a1": "a", "size1": "big", "colour1": "white", "shape1": "square", "pos1": word,
                      "a2": "a", "size2": "small", "colour2": "cyan", "shape2": "circle", "pos2": POSITION_WORDS[other][-1]}
            parsed = parse_caption(template.format(**fields))
            assert parsed is not None, template.format(**fields)
            assert parsed.objects[0].position == position
            assert parsed.background == ("grey" if "{bg}" in template else None)
            if "{pos2}" in template:
                assert parsed.objects[1] == ShapeAttributes("cyan", "circle", other, "small" if "{size2}" in template else None)


def test_prompt_for_round_trips_through_the_parser():
    for colour in COLOURS:
        for shape in SHAPES:
            for size in [*SIZES, None]:
                for position in POSITIONS:
                    attrs = ShapeAttributes(colour, shape, position, size)
                    parsed = parse_caption(prompt_for(attrs))
                    assert parsed is not None and parsed.objects == (attrs,)


@pytest.mark.parametrize(
    "caption",
    ["a photo of a dog on a beach", "a red circle", "", "a red circle in the top left and a blue square"],
)
def test_captions_that_are_not_shapes_captions_give_none(caption):
    assert parse_caption(caption) is None


# --- reading images ------------------------------------------------------------------------------------


def _accuracy_on(images_and_truth) -> tuple[dict[str, float], list]:
    right, total, errors = Counter(), Counter(), []
    for image, objects, skip_shape in images_and_truth:
        for want, found in zip(objects, match_objects(objects, read_shapes(image)), strict=True):
            for a in ATTRIBUTES:
                if a == "shape" and skip_shape(want):
                    continue
                ok = found is not None and getattr(found, a) == getattr(want, a)
                right[a] += ok
                total[a] += 1
                if not ok:
                    errors.append((want, found))
    return {a: right[a] / total[a] for a in ATTRIBUTES}, errors


def _ground_truth(root: Path, downscale_to: int | None = None):
    for line in (root / "metadata.jsonl").read_text().splitlines():
        record = json.loads(line)
        image = Image.open(root / record["file_name"]).convert("RGB")
        if downscale_to is not None:
            image = resize_image(image, downscale_to, "center_crop")  # what ingest does
        yield image, [ShapeAttributes.from_spec(o) for o in record["objects"]]


def _never(_):
    return False


def _small_circle_or_square(attrs: ShapeAttributes) -> bool:
    return attrs.size == "small" and attrs.shape in ("circle", "square")


@pytest.fixture(scope="module")
def set32(tmp_path_factory) -> Path:
    # one and two shapes, both backgrounds, jitter: the generator's defaults
    return generate_shapes(tmp_path_factory.mktemp("gt") / "s32", ShapesConfig(n_images=160, resolution=32, seed=5))


def test_checker_reads_ground_truth_at_32px_and_after_ingest_downscale_to_16px(set32):
    for downscale in (None, 16):
        accuracy, errors = _accuracy_on((im, objs, _never) for im, objs in _ground_truth(set32, downscale))
        assert min(accuracy.values()) >= 0.99, (downscale, accuracy, errors[:5])


def test_checker_reads_ground_truth_rendered_at_16px(tmp_path):
    root = generate_shapes(tmp_path / "s16", ShapesConfig(n_images=160, resolution=16, seed=6))
    # (a small circle and a small square are the same pixels at 16 px, see the next test)
    accuracy, errors = _accuracy_on((im, objs, _small_circle_or_square) for im, objs in _ground_truth(root))
    assert min(accuracy.values()) >= 0.99, (accuracy, errors[:5])


def test_small_circle_and_small_square_are_the_same_pixels_when_rendered_at_16px():
    # Why the 16 px test above does not score their shape: radius 2.4 px around a pixel corner
    # covers exactly the 4x4 pixel centres a half-side of 2.4 px does. At 32 px they differ,
    # and ingest's downscale from 32 to 16 keeps the difference (the first test).
    for position in POSITIONS:
        circle = render_shapes([ShapeSpec("red", "circle", "small", position)], 16)
        square = render_shapes([ShapeSpec("red", "square", "small", position)], 16)
        assert np.array_equal(np.asarray(circle), np.asarray(square))
    circle = render_shapes([ShapeSpec("red", "circle", "small", "centre")], 32)
    square = render_shapes([ShapeSpec("red", "square", "small", "centre")], 32)
    assert not np.array_equal(np.asarray(circle), np.asarray(square))


def test_checker_reads_ground_truth_at_64px(tmp_path):
    root = generate_shapes(tmp_path / "s64", ShapesConfig(n_images=40, resolution=64, seed=7))
    accuracy, errors = _accuracy_on((im, objs, _never) for im, objs in _ground_truth(root))
    assert min(accuracy.values()) >= 0.99, (accuracy, errors[:5])


def test_checker_tolerates_sampling_noise(set32):
    rng = np.random.default_rng(0)
    noisy = []
    for i, (image, objects) in enumerate(_ground_truth(set32)):
        if i == 60:
            break
        pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, 20, (32, 32, 3))
        noisy.append((np.clip(pixels, 0, 255), objects, _never))
    accuracy, errors = _accuracy_on(noisy)
    assert min(accuracy.values()) >= 0.95, (accuracy, errors[:5])


def test_a_plain_background_shows_no_shape():
    assert read_shapes(Image.new("RGB", (16, 16), BACKGROUNDS["grey"])) == []
    assert read_shapes(np.zeros((32, 32, 3))) == []


def test_non_square_or_non_rgb_input_is_a_clear_error():
    with pytest.raises(ValueError, match="square"):
        read_shapes(np.zeros((16, 32, 3)))
    with pytest.raises(ValueError, match="RGB"):
        read_shapes(np.zeros((16, 16)))


# --- scores -------------------------------------------------------------------------------------------------


def test_score_prompts_counts_each_attribute():
    want = ShapeAttributes("red", "circle", "top left", "large")
    right = render_shapes([ShapeSpec("red", "circle", "large", "top left")], 32)
    wrong_colour_and_place = render_shapes([ShapeSpec("blue", "circle", "large", "bottom right")], 32)
    blank = Image.new("RGB", (32, 32))
    scores = score_prompts([(want,), (want,), (want,)], [right, wrong_colour_and_place, blank])
    assert scores["colour_acc"] == pytest.approx(1 / 3)
    assert scores["position_acc"] == pytest.approx(1 / 3)
    assert scores["shape_acc"] == pytest.approx(2 / 3) and scores["size_acc"] == pytest.approx(2 / 3)
    assert scores["accuracy"] == pytest.approx((1 / 3 + 1 / 3 + 2 / 3 + 2 / 3) / 4)
    assert scores["all_correct"] == pytest.approx(1 / 3)


def test_a_prompt_without_size_does_not_score_size():
    want = ShapeAttributes("green", "square", "centre", None)
    image = render_shapes([ShapeSpec("green", "square", "small", "centre")], 32)
    scores = score_prompts([(want,)], [image])
    assert np.isnan(scores["size_acc"]) and scores["accuracy"] == 1.0 and scores["all_correct"] == 1.0


def test_two_shape_prompts_match_shapes_by_colour():
    want = (ShapeAttributes("red", "circle", "top left", "small"), ShapeAttributes("blue", "triangle", "bottom right", "large"))
    image = render_shapes(
        [ShapeSpec("blue", "triangle", "large", "bottom right"), ShapeSpec("red", "circle", "small", "top left")], 32
    )
    assert score_prompts([want], [image])["all_correct"] == 1.0


def test_a_shape_without_a_colour_match_does_not_take_another_shapes_match():
    # The red circle is missing; the blue triangle is drawn right and must be scored right, not
    # handed to the red circle (as the largest detection left) before the blue one is matched.
    want = (ShapeAttributes("red", "circle", "top left", "small"), ShapeAttributes("blue", "triangle", "bottom right", "large"))
    image = render_shapes(
        [ShapeSpec("blue", "triangle", "large", "bottom right"), ShapeSpec("green", "triangle", "small", "top left")], 32
    )
    matched = match_objects(want, read_shapes(image))
    assert [d.colour for d in matched] == ["green", "blue"]
    scores = score_prompts([want], [image])
    assert scores["colour_acc"] == 0.5 and scores["shape_acc"] == 0.5
    assert scores["position_acc"] == 1.0 and scores["size_acc"] == 1.0


def test_a_dark_shape_on_grey_is_not_read_as_a_palette_colour():
    # From grey, black lies as much towards red as green or blue: it must not read as red (the
    # first of them), or a model drawing every shape black would score on all red prompts.
    image = render_shapes([ShapeSpec("red", "square", "large", "top left")], 32, "grey")
    dark = np.asarray(image).copy()
    dark[(dark != BACKGROUNDS["grey"]).any(axis=-1)] = 0  # the same square, black
    (found,) = read_shapes(dark)
    assert found.colour not in COLOURS and (found.shape, found.size, found.position) == ("square", "large", "top left")
    scores = score_prompts([(ShapeAttributes("red", "square", "top left", "large"),)], [dark])
    assert scores["colour_acc"] == 0.0 and scores["shape_acc"] == scores["position_acc"] == 1.0
    (white,) = read_shapes(render_shapes([ShapeSpec("white", "circle", "small", "centre")], 32, "grey"))
    assert white.colour == "white"
    # Dark grey is black too; dark but coloured fills keep their colour (only hue-less pixels are black).
    for fill, colour in [((40, 40, 40), "black"), ((0, 0, 90), "blue"), ((110, 0, 0), "red"), ((0, 100, 0), "green")]:
        recoloured = np.asarray(image).copy()
        recoloured[(recoloured != BACKGROUNDS["grey"]).any(axis=-1)] = fill
        (found,) = read_shapes(recoloured)
        assert found.colour == colour, (fill, found.colour)
