"""models/tokenizer.py against its oracle, open_clip's own SimpleTokenizer (the bundled BPE vocabulary)."""

from __future__ import annotations

import html
import random
import string

import ftfy
import numpy as np
import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from models.tokenizer import _PLAIN, ClipTokenizer
from tasks import shapes

PLAIN_ALPHABET = "".join(c for c in string.printable if " " <= c <= "~" and c != "&")

ADVERSARIAL = [
    "",
    " ",
    "   leading and trailing   ",
    "tabs\tand\nnew\r\nlines",
    "UPPER Case MiXeD",
    "it's they're we've I'm you'll he'd",
    "digits 12345 and 3.14159, 1/2",
    "punctuation!!! ... ??? (brackets) [square] {curly} <angle> #hash @at ~tilde `tick`",
    "fish &amp; chips",
    "double &amp;amp; escaped &lt;b&gt;",
    "a & b",
    "&",
    "naïve café ½ — “curly quotes” ‘single’",
    "mojibake: cafÃ© donâ€™t",
    "ｆｕｌｌ ｗｉｄｔｈ",
    "ligature ﬁsh ﬂower",
    "emoji 🐍🔥 and CJK 猫が好き",
    "control\x00chars\x07here\x1b[31mred\x1b[0m",
    "<start_of_text> inside <end_of_text> the caption",
    "a small red circle next to a big blue square " * 20,  # past 77 tokens: truncated
    "x" * 500,  # one very long word
]


@pytest.fixture(scope="module")
def base() -> SimpleTokenizer:
    return open_clip.get_tokenizer("ViT-B-32")


def test_plain_text_is_left_unchanged_by_ftfy_and_html_unescape():
    # The fast path's premise, checked on random printable-ASCII strings without "&".
    rng = random.Random(0)
    texts = ["".join(rng.choice(PLAIN_ALPHABET) for _ in range(rng.randint(0, 120))) for _ in range(3000)]
    for text in texts:
        assert _PLAIN.fullmatch(text)
        assert ftfy.fix_text(text) == text
        assert html.unescape(html.unescape(text)) == text
    for text in ("a & b", "tab\there", "new\nline", "café", "\x7f"):
        assert not _PLAIN.fullmatch(text)


def test_ids_equal_open_clip_on_adversarial_captions(base):
    fast = ClipTokenizer(base)
    for text in ADVERSARIAL:
        assert torch.equal(fast([text]), base([text])), text
    assert torch.equal(fast(ADVERSARIAL), base(ADVERSARIAL))
    assert fast(ADVERSARIAL).dtype == torch.long
    # A second call hits the per-word cache and must still agree.
    assert torch.equal(fast(ADVERSARIAL), base(ADVERSARIAL))


def test_ids_equal_open_clip_on_random_and_shapes_captions(base):
    rng = random.Random(1)
    alphabet = PLAIN_ALPHABET + "&\t\néü½“”’—🐍猫"
    random_texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200))) for _ in range(1500)]
    shape_captions = [
        shapes.describe([shapes.ShapeSpec(c, s, "small", p)], "black", rng)
        for c in shapes.COLOURS
        for s in shapes.SHAPES
        for p in shapes.POSITIONS
    ]
    fast = ClipTokenizer(base)
    for texts in (random_texts, shape_captions):
        assert torch.equal(fast(texts), base(texts))


def test_context_length_single_string_and_numpy_ids(base):
    fast = ClipTokenizer(base)
    caption = "a small red circle next to a big blue square " * 3
    for length in (5, 16, 77, 100):
        assert torch.equal(fast(caption, context_length=length), base(caption, context_length=length))
    ids = fast.ids([caption, ""], 16)
    assert ids.dtype == np.int32 and ids.shape == (2, 16)
    assert np.array_equal(ids, base([caption, ""], context_length=16).numpy())
    assert ids[0, -1] == fast.eot_token_id and ids[1, :2].tolist() == [fast.sot_token_id, fast.eot_token_id]


def test_other_clean_modes_are_open_clips_own_call():
    for clean in ("whitespace", "canonicalize"):
        base = SimpleTokenizer(clean=clean)
        fast = ClipTokenizer(base)
        assert torch.equal(fast(ADVERSARIAL), base(ADVERSARIAL))
        assert np.array_equal(fast.ids(ADVERSARIAL), base(ADVERSARIAL).numpy())


def test_refuses_other_tokenizers():
    with pytest.raises(TypeError, match="SimpleTokenizer"):
        ClipTokenizer(lambda texts: texts)
    with pytest.raises(ValueError, match="context length"):
        ClipTokenizer(SimpleTokenizer(context_length=None)).ids(["a caption"])
