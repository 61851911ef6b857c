"""Unit tests for models/text_encoder.py on a tiny open_clip config (CPU, seconds, no network)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import numpy as np
import open_clip
import open_clip.pretrained
import pytest
import torch
import torchvision.transforms.functional
from open_clip.transform import ResizeKeepRatio
from safetensors.torch import save_file

import models.text_encoder as text_encoder_module
from models.checkpoint import UnsafeCheckpointError
from models.graphs import GraphCache, run_eagerly
from models.text_encoder import (
    PrefixTrie,
    TextEncoder,
    TextEncoderConfig,
    TextEncoding,
    TokenizerPool,
    _shares_prefixes,
    _text_modules,
    _TriePlan,
    prefix_order,
)

TINY = "t2i-test-text-encoder-tiny"  # own name: conftest registers another tiny config
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CAPTIONS = ["a red circle on a white background", "two blue squares", "a red circle on a white background", ""]


@pytest.fixture(scope="session", autouse=True)
def tiny_model_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("open_clip_cfg") / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(path)
    assert TINY in open_clip.list_models()


def _random(seed: int = 0, layer: str = "penultimate") -> TextEncoder:
    return TextEncoder(TextEncoderConfig(TINY, layer=layer, allow_random_init=True, random_init_seed=seed))


@pytest.fixture
def no_network(monkeypatch):
    """Every DNS lookup and socket connect fails and is recorded; the hub client is told it
    is online, so only the encoder's own code can keep it off the network."""
    attempts = []

    def refuse_connect(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network disabled in tests (connect to {address})")

    def refuse_lookup(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(f"network disabled in tests (lookup of {host})")

    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse_connect)
    monkeypatch.setattr(socket, "getaddrinfo", refuse_lookup)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return attempts


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point the Hugging Face cache and open_clip's URL cache (~/.cache/clip) at empty folders."""
    hf_cache = tmp_path / "hf-cache"
    hf_cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return hf_cache


# --- config ---------------------------------------------------------------------------------


def test_config_round_trip_and_unknown_keys():
    cfg = TextEncoderConfig(TINY, weights="x.safetensors", layer="last", random_init_seed=3)
    assert TextEncoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown TextEncoderConfig keys.*'layr'"):
        TextEncoderConfig.from_dict({**cfg.to_dict(), "layr": "last"})
    with pytest.raises(ValueError, match="layer must be one of"):
        TextEncoderConfig(TINY, layer="middle")


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown open_clip model_name 'ViT-B-33'.*ViT-B-32"):
        TextEncoder(TextEncoderConfig("ViT-B-33", allow_random_init=True))
    with pytest.raises(ValueError, match="hf-hub:/local-dir: sources are not supported"):
        TextEncoder(TextEncoderConfig("hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K", allow_random_init=True))


# --- encoding -------------------------------------------------------------------------------


def test_encode_shapes_mask_and_lengths():
    enc = _random()
    out = enc.encode(CAPTIONS)
    assert isinstance(out, TextEncoding)
    B, L, D = len(CAPTIONS), enc.context_length, enc.width
    assert (enc.context_length, enc.width, enc.pooled_dim) == (77, 32, 32)
    assert out.tokens.shape == (B, L, D) and out.pooled.shape == (B, enc.pooled_dim)
    assert out.mask.shape == (B, L) and out.mask.dtype == torch.bool
    assert out.lengths.dtype == torch.long

    # Oracle: open_clip's own tokenizer; real tokens are the non-zero (non-pad) ids.
    ids = open_clip.tokenize(CAPTIONS)
    assert torch.equal(out.lengths, (ids != 0).sum(1))
    assert out.lengths[3] == 2  # empty caption: start + end-of-text
    tok = open_clip.get_tokenizer(TINY)
    for i, n in enumerate(out.lengths.tolist()):
        assert ids[i, 0] == tok.sot_token_id and ids[i, n - 1] == tok.eot_token_id
        assert out.mask[i, :n].all() and not out.mask[i, n:].any()

    # Same caption -> identical states; different captions -> different states on real tokens.
    assert torch.equal(out.tokens[0], out.tokens[2]) and torch.equal(out.pooled[0], out.pooled[2])
    n = int(min(out.lengths[0], out.lengths[1]))
    assert not torch.allclose(out.tokens[0, 1:n], out.tokens[1, 1:n])
    assert not torch.allclose(out.pooled[0], out.pooled[1])
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()


@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_an_empty_batch_encodes_to_empty_tensors_as_open_clip_does(layer):
    enc = _random(layer=layer)
    text = enc.tokenize([])
    out = enc.encode([])
    assert out.tokens.shape == (0, enc.context_length, enc.width) and out.mask.shape == (0, enc.context_length)
    assert out.pooled.shape == enc.clip.encode_text(text).shape == (0, enc.pooled_dim) and out.lengths.shape == (0,)
    assert enc.encode_tokens(text[:, :5]).tokens.shape == (0, 5, enc.width)
    assert prefix_order(text, enc.token_lengths(text)).shape == (0,)


def test_token_lengths_count_up_to_the_end_of_text_token():
    enc = _random()
    ids = open_clip.tokenize(["two blue squares!", "", "a red circle " * 30])  # the oracle: open_clip's ids
    ids[0, 2] = 0  # id 0 (a byte-level "!") is also the padding id: a real token all the same
    eot = open_clip.get_tokenizer(TINY).eot_token_id
    expected = [row.index(eot) + 1 for row in ids.tolist()]  # EOT located by a Python scan
    assert enc.token_lengths(ids).tolist() == expected
    assert expected[1:] == [2, 77] and expected[0] == (ids[0] != 0).sum() + 1
    with pytest.raises(ValueError, match="end-of-text token"):
        enc.token_lengths(ids[:, :20])  # the long caption's EOT cut off


def test_last_layer_matches_open_clip_encode_text():
    enc = _random(seed=1, layer="last")
    out = enc.encode(CAPTIONS)
    text = enc.tokenize(CAPTIONS)
    reference = enc.clip.encode_text(text)  # open_clip's own forward: the oracle
    torch.testing.assert_close(out.pooled, reference, rtol=1e-5, atol=1e-6)
    # Pool our token states at the EOT position and project: must be encode_text as well.
    at_eot = out.tokens[torch.arange(len(CAPTIONS)), out.lengths - 1]  # (B, D)
    torch.testing.assert_close(at_eot @ enc.clip.text_projection, reference, rtol=1e-5, atol=1e-6)


def test_penultimate_matches_open_clip_intermediates_and_differs_from_last():
    pen, last = _random(seed=1, layer="penultimate"), _random(seed=1, layer="last")
    out_pen, out_last = pen.encode(CAPTIONS), last.encode(CAPTIONS)
    n_blocks = TINY_CFG["text_cfg"]["layers"]
    ref = pen.clip.forward_intermediates(
        text=pen.tokenize(CAPTIONS), text_indices=[n_blocks - 2], normalize_intermediates=True, intermediates_only=True
    )["text_intermediates"][0]
    real = out_pen.mask[:, :, None]  # past a caption's end the states are zero, as a loaded set pads them
    torch.testing.assert_close(out_pen.tokens, ref * real, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out_pen.tokens, out_last.tokens)
    # The pooled embedding is CLIP's, whichever layer conditions the UNet.
    torch.testing.assert_close(out_pen.pooled, out_last.pooled)
    assert pen.identity["layer"] == "penultimate" and pen.identity_id != last.identity_id


def test_frozen_and_autocast():
    enc = _random()
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.clip.training
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc.encode(CAPTIONS[:2])
    assert torch.isfinite(out.tokens.float()).all() and out.tokens.shape == (2, 77, 32)


def _casts(enc: TextEncoder, text: torch.Tensor) -> tuple[TextEncoding, int]:
    """enc.encode_tokens(text) under CPU bf16 autocast -> (its encoding, the dtype casts it ran)."""
    from torch.profiler import profile

    with profile() as prof, torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc.encode_tokens(text)
    return out, sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")


def _without_cache(monkeypatch, enc: TextEncoder, text: torch.Tensor) -> tuple[TextEncoding, int]:
    """`_casts` with autocast casting each weight on each call, as without the cast copy."""
    with monkeypatch.context() as m:
        m.setattr(TextEncoder, "_autocast_blocks", lambda self, blocks: blocks)
        return _casts(enc, text)


def test_autocast_casts_the_block_weights_once(monkeypatch):
    enc = _random(seed=3, layer="last")
    text = enc.tokenize(CAPTIONS)
    blocks = len(enc.clip.transformer.resblocks)
    per_call, per_call_casts = _without_cache(monkeypatch, enc, text)
    first, _ = _casts(enc, text)  # makes the cast copy
    cached, cached_casts = _casts(enc, text)
    assert per_call_casts - cached_casts == 8 * blocks  # 4 matmuls' weight and bias per block
    for out in (first, cached):  # the same bits: autocast casts to the same dtype
        assert torch.equal(out.tokens, per_call.tokens) and torch.equal(out.pooled, per_call.pooled)
    assert not any("cast" in key for key in enc.state_dict())
    # Without autocast the float32 weights run; a change to them makes a new copy.
    torch.testing.assert_close(enc.encode_tokens(text).tokens, per_call.tokens, rtol=0.05, atol=0.05)
    with torch.no_grad():
        enc.clip.transformer.resblocks[0].mlp.c_fc.weight.mul_(2)
    edited, _ = _casts(enc, text)
    expected, _ = _without_cache(monkeypatch, enc, text)
    assert torch.equal(edited.tokens, expected.tokens) and not torch.equal(edited.tokens, cached.tokens)
    # A parameter replaced by another tensor, not edited, makes a new copy too.
    fc = enc.clip.transformer.resblocks[1].mlp.c_fc
    fc.weight = torch.nn.Parameter(fc.weight.detach() * 3, requires_grad=False)
    replaced, _ = _casts(enc, text)
    assert not torch.equal(replaced.tokens, edited.tokens)
    assert enc._cast_blocks[2][1].mlp.c_fc.weight.dtype == torch.bfloat16
    import pickle

    assert pickle.loads(pickle.dumps(enc))._cast_blocks is None  # a worker's copy casts its own
    torch.testing.assert_close(pickle.loads(pickle.dumps(enc)).encode_tokens(text).tokens, enc.encode_tokens(text).tokens)


def test_autocast_copy_follows_dtype_moves_float64_and_inference_tensors(monkeypatch):
    enc = _random(seed=5, layer="last")
    text = enc.tokenize(CAPTIONS)
    _casts(enc, text)
    made = enc._cast_blocks[2]
    fc = enc.clip.transformer.resblocks[0].mlp.c_fc
    # The copy holds the cast matmul weights only once: they were not deep-copied in float32 first.
    assert made[0].mlp.c_fc.weight.dtype == torch.bfloat16 and made[0].ln_1.weight is not enc.clip.transformer.resblocks[0].ln_1.weight
    # Module.to() keeps the Parameter objects and their version counters: the dtype tells.
    for dtype in (torch.bfloat16, torch.float32):  # (a float16 tower has no CPU layer norm under autocast)
        enc.to(dtype)
        out = _casts(enc, text)[0]
        assert enc._cast_blocks[2] is not made and torch.equal(out.tokens, _without_cache(monkeypatch, enc, text)[0].tokens)
        made = enc._cast_blocks[2]
    # Autocast leaves float64 alone, and so does the copy.
    enc.to(torch.float64)
    assert fc.weight.dtype == torch.float64
    assert torch.equal(_casts(enc, text)[0].tokens, _without_cache(monkeypatch, enc, text)[0].tokens)
    # An edit through .data bypasses the version counter: forget_cast_blocks() is the way out.
    enc.to(torch.float32)
    _casts(enc, text)
    fc.weight.data.mul_(2)
    enc.forget_cast_blocks()
    assert torch.equal(_casts(enc, text)[0].tokens, _without_cache(monkeypatch, enc, text)[0].tokens)
    # Built under inference mode, its parameters have no version counter.
    with torch.inference_mode():
        frozen = _random(seed=5, layer="last")
    assert frozen.clip.transformer.resblocks[0].mlp.c_fc.weight.is_inference()
    assert torch.equal(_casts(frozen, text)[0].tokens, _without_cache(monkeypatch, frozen, text)[0].tokens)


def test_long_caption_truncated_like_open_clip():
    enc = _random()
    caption = "a small red circle next to a big blue square " * 20
    ids = enc.tokenize([caption, "short"])
    assert torch.equal(ids, open_clip.tokenize([caption, "short"]))
    assert torch.equal(ids, open_clip.get_tokenizer(TINY)([caption, "short"]))
    out = enc.encode([caption])
    assert out.lengths.tolist() == [enc.context_length] and out.mask.all()
    assert ids[0, -1] == open_clip.get_tokenizer(TINY).eot_token_id


def test_prefix_trie_nodes_are_the_distinct_prefixes():
    # Oracle: the set of real-token prefixes, counted with Python tuples.
    gen = torch.Generator().manual_seed(0)
    B, L, eot = 60, 9, 99
    lengths = torch.randint(1, L + 1, (B,), generator=gen)
    text = torch.randint(0, 3, (B, L), generator=gen)  # 3 symbols: many shared prefixes and some equal rows
    text[torch.arange(L)[None, :] >= lengths[:, None]] = 0
    text[torch.arange(B), lengths - 1] = eot
    trie = PrefixTrie.build(text, lengths)
    rows = [tuple(text[r, : lengths[r]].tolist()) for r in range(B)]
    prefixes = {row[: j + 1] for row in rows for j in range(len(row))}
    assert len(trie.first_row) == len(prefixes) < int(lengths.sum())
    assert sorted(rows) == [rows[r] for r in trie.order.tolist()]  # lexicographic order
    assert trie.node_of.shape == (B, int(lengths.max()))
    seen = {}
    for s, r in enumerate(trie.order.tolist()):
        for j in range(trie.node_of.shape[1]):
            node = int(trie.node_of[s, j])
            if j >= lengths[r]:
                assert node == -1
                continue
            assert seen.setdefault(node, rows[r][: j + 1]) == rows[r][: j + 1]  # one prefix per node
            made_at = rows[int(trie.order[trie.first_row[node]])][: int(trie.first_col[node]) + 1]
            assert made_at == rows[r][: j + 1]
    assert len(set(seen.values())) == len(seen) == len(prefixes)  # and one node per prefix
    # Ids past a row's length never count: equal real tokens share, whatever follows them.
    assert len(PrefixTrie.build(torch.tensor([[1, 2, 3], [1, 2, 3]]), torch.tensor([2, 3])).first_row) == 3
    assert len(PrefixTrie.build(torch.tensor([[1, 2, 7], [1, 2, 0]]), torch.tensor([2, 2])).first_row) == 2


def test_rows_already_in_prefix_order_skip_the_sort_and_give_the_same_trie(monkeypatch):
    from models.text_encoder import _differs_from_above, _in_lexicographic_order, _prefix_trie, _real_tokens

    rng = np.random.default_rng(0)
    for trial in range(300):
        B, L = int(rng.integers(1, 12)), int(rng.integers(1, 6))
        ids = rng.integers(0, 3, size=(B, L))  # few tokens: many shared prefixes and equal rows
        lengths = rng.integers(1, L + 1, size=B)
        if trial % 2:  # half of them sorted, as the embed stage's batches come
            keyed = _real_tokens(ids, lengths)
            order = np.lexsort(keyed[:, ::-1].T)
            ids, lengths = ids[order], lengths[order]
        keyed = _real_tokens(ids, lengths)
        in_order = bool((np.lexsort(keyed[:, ::-1].T) == np.arange(B)).all())  # stable: the identity iff in order
        assert _in_lexicographic_order(keyed, _differs_from_above(keyed)) == in_order
        fast = _prefix_trie(ids, lengths)
        with monkeypatch.context() as m:
            m.setattr("models.text_encoder._in_lexicographic_order", lambda *a: False)  # always sort
            sorted_anyway = _prefix_trie(ids, lengths)
        assert all(np.array_equal(a, b) for a, b in zip(fast, sorted_anyway))


def test_host_side_index_work_runs_no_torch_compute_op():
    # Lengths, order and trie run in numpy: a torch CPU op starts a parallel region on the
    # intra-op threads, and with the cores busy (writer threads, tokenizer workers, another
    # process's training) an op of microseconds then waits milliseconds.
    from torch.profiler import profile

    enc = _random()
    text = enc.tokenize(["a red circle", "a red square in the top left", "a red circle", "blue"])
    with profile() as prof:
        lengths = enc.token_lengths(text)
        order = prefix_order(text, lengths)
        PrefixTrie.build(text, lengths)
        _TriePlan.from_ids(text.numpy(), lengths.numpy())
    ran = {e.key for e in prof.key_averages() if e.key.startswith("aten::")}
    no_compute = {"aten::to", "aten::detach", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg"}
    views = {"aten::split_with_sizes", "aten::split", "aten::as_strided", "aten::view", "aten::narrow", "aten::slice"}
    assert ran <= no_compute | views, ran
    rows = [tuple(text[r, : lengths[r]].tolist()) for r in range(len(text))]
    assert [len(r) for r in rows] == [5, 9, 5, 3] and all(r[-1] == enc.tokenizer.eot_token_id for r in rows)
    assert order.tolist() == sorted(range(len(rows)), key=rows.__getitem__)


@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_prefix_path_gathers_with_index_select_and_one_plan_copy(layer):
    # Advanced indexing (aten::index) costs far more host time per launch than index_select,
    # and a boolean mask (aten::nonzero) syncs the device. The plan is one buffer: on a GPU
    # one pinned copy, not one per index tensor.
    from torch.profiler import profile

    enc = _random(layer=layer)
    text = enc.tokenize(["a red circle", "a red square in the top left", "a red circle", "blue"])
    with profile() as prof:
        enc.encode_tokens(text)
    ran = {e.key: e.count for e in prof.key_averages()}
    assert "aten::index" not in ran and "aten::nonzero" not in ran, sorted(ran)
    assert ran["aten::index_select"] >= 2 * len(enc.clip.transformer.resblocks)
    plan = _TriePlan.from_ids(text.numpy(), enc.token_lengths(text).numpy())
    assert len({t.untyped_storage().data_ptr() for t in plan}) == 1
    assert plan.eot_node.shape == plan.eot_at.shape == (3,)  # the distinct captions' ends, unpadded


@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_shared_prefixes_give_the_padded_towers_states(layer):
    enc = _random(seed=2, layer=layer)
    assert enc.shares_prefixes  # open_clip's plain blocks: the trie path runs
    long = "a small red circle next to a big blue square " * 20
    captions = [
        "a red circle", "a red circle on a white background", "a red square", "a red circle", "",
        "two blue squares", "a red", long, "a red circle on a white", "two", "a red circle on a white background",
    ]  # fmt: skip
    ids = enc.tokenize(captions)
    longest = int(((ids == enc.tokenizer.eot_token_id).int().argmax(dim=1) + 1).max())
    for text in (ids, ids[[3, 2, 6, 0], :7]):  # full context and a cut one (rows in the callers' order, not sorted)
        shared, padded = enc.encode_tokens(text), enc.encode_tokens(text, share_prefixes=False)
        assert torch.equal(shared.mask, padded.mask) and torch.equal(shared.lengths, padded.lengths)
        torch.testing.assert_close(shared.tokens, padded.tokens, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shared.pooled, padded.pooled, rtol=1e-5, atol=1e-5)
        assert not shared.tokens[~shared.mask].any()
    out = enc.encode_tokens(ids[:, :longest])
    assert torch.equal(out.tokens[0], out.tokens[3]) and torch.equal(out.pooled[1], out.pooled[10])
    # A shared prefix has one set of states: "a red circle" is the start of "a red circle on a ...".
    assert torch.equal(out.tokens[0, :4], out.tokens[1, :4])


def _variant(tmp_path: Path, name: str, **text_cfg) -> TextEncoder:
    """A random-init encoder of the tiny config with `text_cfg` changed, registered under `name`."""
    cfg = {**TINY_CFG, "text_cfg": {**TINY_CFG["text_cfg"], **text_cfg}}
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    return TextEncoder(TextEncoderConfig(name, layer="last", allow_random_init=True))


def _assert_pooled_matches_open_clip(enc: TextEncoder) -> None:
    reference = enc.clip.encode_text(enc.tokenize(CAPTIONS))  # the oracle, at full context
    torch.testing.assert_close(enc.encode(CAPTIONS).pooled, reference, rtol=1e-5, atol=1e-6)


def test_towers_the_trie_cannot_compute_take_the_padded_path(tmp_path):
    assert _variant(tmp_path, "t2i-test-text-layerscale", ls_init_value=0.5).shares_prefixes  # LayerScale: supported
    eos_elsewhere = _variant(tmp_path, "t2i-test-text-eos-2", pool_type="eos")  # open_clip's default eos_id 2 is not CLIP's EOT
    assert not eos_elsewhere.shares_prefixes
    _assert_pooled_matches_open_clip(eos_elsewhere)
    biased = _variant(tmp_path, "t2i-test-text-biased-mask")
    assert biased.shares_prefixes
    with torch.no_grad():  # a bias below the diagonal (ALiBi-like): no longer is_causal's mask
        biased.clip.attn_mask.add_(torch.ones(77, 77).tril(-1) * -0.5)
    assert not _shares_prefixes(_text_modules(biased.clip, biased.config.model_name), biased.tokenizer.eot_token_id)


def test_tower_without_causal_mask_takes_the_padded_path_at_full_length(tmp_path):
    enc = _variant(tmp_path, "t2i-test-text-encoder-bidirectional", no_causal_mask=True)
    assert not enc.shares_prefixes
    _assert_pooled_matches_open_clip(enc)
    with pytest.raises(ValueError, match="full context length"):  # pads would change real tokens' states
        enc.encode_tokens(enc.tokenize(CAPTIONS)[:, :12])


def test_tokenizer_pool_gives_the_serial_ids_in_order():
    enc = _random()
    long = "a small red circle next to a big blue square " * 20
    captions = [f"caption {i} {'long ' * (i % 7)}" for i in range(23)] + [long, "", "naïve café ½"]
    with TokenizerPool(enc, workers=2, chunk_size=4) as pool:
        ids = pool(captions)  # 7 chunks over 2 workers
        assert ids.dtype == torch.long
        assert torch.equal(ids, enc.tokenize(captions))
        assert torch.equal(pool(captions[:3]), enc.tokenize(captions[:3]))  # one chunk: serial
    with pytest.raises(TypeError, match="list of str"):
        TokenizerPool(enc, workers=0)([b"bytes"])
    with pytest.raises(ValueError, match="workers"):
        TokenizerPool(enc, workers=-1)


def test_encode_images():
    enc = _random()
    for shape in [(2, 3, 32, 32), (2, 3, 16, 16), (3, 3, 20, 28)]:
        emb = enc.encode_images(torch.rand(shape))
        assert emb.shape == (shape[0], enc.pooled_dim) and torch.isfinite(emb).all()
    # At the tower's own size nothing is resized: it is open_clip's encode_image after normalising.
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(enc.encode_images(x), enc.clip.encode_image((x - mean) / std))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        enc.encode_images(torch.rand(1, 3, 32, 32) * 2 - 1)


@pytest.mark.parametrize("image_size, interpolation", [(32, "bicubic"), ([24, 40], "bicubic"), (32, "bilinear")])
def test_encode_images_resizes_and_crops_as_open_clips_eval_transform(tmp_path, image_size, interpolation):
    # Oracle: open_clip's own eval transform (its torchvision Resize / ResizeKeepRatio and
    # CenterCrop run on tensors too), then the clip to [0, 1] its PIL path has, then its Normalize.
    name = f"t2i-test-image-size-{'x'.join(map(str, np.atleast_1d(image_size)))}"
    (tmp_path / f"{name}.json").write_text(json.dumps({**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "image_size": image_size}}))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    enc = TextEncoder(TextEncoderConfig(name, allow_random_init=True))
    enc.use_image_preprocess({"interpolation": interpolation})  # as a tag's preprocess sets it (MobileCLIP, PE-Core: bilinear)
    pp = enc.image_preprocess
    transform = open_clip.image_transform(pp["size"], is_train=False, mean=pp["mean"], std=pp["std"],
                                          resize_mode=pp["resize_mode"], interpolation=pp["interpolation"])
    resize, crop, normalize = transform.transforms[0], transform.transforms[1], transform.transforms[-1]

    def resized(im: torch.Tensor) -> torch.Tensor:
        if not isinstance(resize, ResizeKeepRatio):
            return resize(im)
        # ResizeKeepRatio reads a PIL image's .size: its own sizes, applied to the tensor
        size = resize.get_params(SimpleNamespace(size=(im.shape[-1], im.shape[-2])), resize.size, resize.longest)
        return torchvision.transforms.functional.resize(im, size, resize.interpolation)

    gen = torch.Generator().manual_seed(0)
    for h, w in [(20, 28), (35, 32), (32, 67), (13, 8), (50, 50)]:  # long sides that truncate, odd crop margins
        x = torch.rand(2, 3, h, w, generator=gen)
        expected = enc.clip.encode_image(torch.stack([normalize(crop(resized(im)).clamp(0, 1)) for im in x]))
        torch.testing.assert_close(enc.encode_images(x), expected, rtol=1e-5, atol=1e-5)


# --- weights --------------------------------------------------------------------------------


def _sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_load_local_files_matches_in_memory_model(tmp_path):
    source = _random(seed=7, layer="last")
    sd = {k: v.contiguous() for k, v in source.clip.state_dict().items()}
    files = {
        "safetensors": tmp_path / "tiny.safetensors",
        "pt": tmp_path / "tiny.pt",
        "ddp-wrapped": tmp_path / "tiny_ddp.pth",
    }
    save_file(sd, str(files["safetensors"]))
    torch.save(sd, files["pt"])
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, files["ddp-wrapped"])
    expected = source.encode(CAPTIONS)

    for path in files.values():
        # Default seed 0 differs from the source's seed 7: equality proves the file was loaded.
        enc = TextEncoder(TextEncoderConfig(TINY, weights=str(path), layer="last"))
        out = enc.encode(CAPTIONS)
        assert torch.equal(out.tokens, expected.tokens) and torch.equal(out.pooled, expected.pooled)
        assert not enc.is_random_init
        assert enc.identity == {
            "model_name": TINY,
            "weights": f"sha256:{_sha16(path)}",
            "layer": "last",
            "width": 32,
            "context_length": 77,
        }
        assert enc.identity_id == f"{TINY}__sha256-{_sha16(path)}__last"


def test_load_is_strict_and_lists_keys(tmp_path):
    sd = dict(_random().clip.state_dict())
    sd.pop("ln_final.weight")
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(ValueError, match=r"missing 1 keys \['ln_final.weight'\].*unexpected 1 keys \['extra.weight'\]"):
        TextEncoder(TextEncoderConfig(TINY, weights=str(path)))
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        TextEncoder(TextEncoderConfig(TINY, weights=str(tmp_path / "missing.safetensors")))


class _CodePayload:
    """Unpickling this calls open(marker, "w"): code where weights belong."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_carrying_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"ln_final.weight": _CodePayload(marker)}}, path)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        TextEncoder(TextEncoderConfig(TINY, weights=str(path)))
    assert not marker.exists()

    # The payload is live: an unsafe load (never done by the encoder) would run it.
    live_marker, live_path = tmp_path / "live", tmp_path / "live.pt"
    torch.save(_CodePayload(live_marker), live_path)
    torch.load(live_path, weights_only=False).close()
    assert live_marker.exists()


def test_weights_none_without_random_init_is_an_error():
    with pytest.raises(ValueError, match="weights=None.*allow_random_init=True"):
        TextEncoder(TextEncoderConfig(TINY))


def test_uncached_tag_fails_fast_without_network(no_network, empty_caches):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="not in the local cache.*allow_random_init"):
        TextEncoder(TextEncoderConfig("ViT-B-32", weights="laion2b_s34b_b79k"))
    assert no_network == []
    assert time.perf_counter() - start < 2.0
    with pytest.raises(ValueError, match="neither an existing file nor an open_clip pretrained tag"):
        TextEncoder(TextEncoderConfig("ViT-B-32", weights="no_such_tag"))


def _fake_hf_cache(hf_cache: Path, repo_id: str, filename: str, sd: dict) -> None:
    # huggingface_hub's cache layout: refs/main names the snapshot that holds the file.
    repo = hf_cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(sd, str(repo / "snapshots" / commit / filename))


@pytest.mark.parametrize("source", ["hf_hub", "url"])
def test_cached_tag_resolves_offline(source, no_network, empty_caches, monkeypatch, tmp_path):
    ref = _random(seed=5, layer="last")
    sd = {k: v.contiguous() for k, v in ref.clip.state_dict().items()}
    if source == "hf_hub":
        _fake_hf_cache(empty_caches, "t2i-test/tiny-clip", "open_clip_model.safetensors", sd)
        tag_cfg = {"hf_hub": "t2i-test/tiny-clip/", "url": ""}
    else:
        url_cache = tmp_path / "home" / ".cache" / "clip"
        url_cache.mkdir(parents=True)
        save_file(sd, str(url_cache / "tiny-clip-weights.safetensors"))
        tag_cfg = {"hf_hub": "", "url": "https://example.invalid/weights/tiny-clip-weights.safetensors"}
    tag_cfg |= {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY, {"test_tag": tag_cfg})

    enc = TextEncoder(TextEncoderConfig(TINY, weights="Test-Tag", layer="last"))
    assert no_network == []
    assert torch.equal(enc.encode(CAPTIONS).pooled, ref.encode(CAPTIONS).pooled)
    assert enc.identity["weights"] == "tag:test_tag" and enc.identity_id == f"{TINY}__test_tag__last"
    assert tuple(enc.clip.visual.preprocess_cfg["mean"]) == (0.5, 0.5, 0.5)  # the tag's preprocessing


def test_tag_quick_gelu_mismatch_is_an_error(monkeypatch):
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY, {"qg": {"hf_hub": "x/y/", "quick_gelu": True}})
    with pytest.raises(ValueError, match=f"use model_name='{TINY}-quickgelu'"):
        TextEncoder(TextEncoderConfig(TINY, weights="qg"))


# --- random init ----------------------------------------------------------------------------

_DIGEST_SCRIPT = """
import hashlib, json, sys
import open_clip, torch
open_clip.add_model_config(sys.argv[1])
from models.text_encoder import TextEncoder, TextEncoderConfig
enc = TextEncoder(TextEncoderConfig(sys.argv[2], allow_random_init=True, random_init_seed=11))
h = hashlib.sha256()
for k, v in sorted(enc.clip.state_dict().items()):
    h.update(k.encode()); h.update(v.contiguous().numpy().tobytes())
print(h.hexdigest())
"""


def _digest(enc: TextEncoder) -> str:
    h = hashlib.sha256()
    for k, v in sorted(enc.clip.state_dict().items()):
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_random_init_is_deterministic_per_seed():
    a, b, c = _random(seed=11), _random(seed=11), _random(seed=12)
    assert a.is_random_init and a.identity["weights"] == "random-init-11"
    assert a.identity_id == f"{TINY}__random-init-11__penultimate"
    assert _digest(a) == _digest(b) != _digest(c)
    assert torch.equal(a.encode(CAPTIONS).tokens, b.encode(CAPTIONS).tokens)


@pytest.mark.slow  # a fresh interpreter importing torch + open_clip: ~5-10 s on 2 cores
def test_random_init_is_deterministic_across_processes(tmp_path):
    a = _random(seed=11)
    cfg_path = tmp_path / f"{TINY}.json"
    cfg_path.write_text(json.dumps(TINY_CFG))
    root = Path(__file__).resolve().parents[1]
    pythonpath = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", _DIGEST_SCRIPT, str(cfg_path), TINY],
        cwd=root, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == _digest(a)


def test_random_init_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _random(seed=0)
    assert torch.equal(torch.rand(3), expected)


def _graphed(enc: TextEncoder) -> GraphCache:
    """`enc` with its prefix path through a `GraphCache` on the CPU: padded plans, static inputs
    and shared outputs as on a GPU, with `run_eagerly` in place of the CUDA capture."""
    enc.cuda_graphs = True
    enc._graphs = GraphCache(torch.device("cpu"), capture=run_eagerly)
    return enc._graphs


@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_graph_path_pads_plans_and_gives_the_unpadded_states(layer):
    enc = _random(seed=3, layer=layer)
    assert enc._graph_cache(torch.device("cpu")) is None  # off by default, and never on the CPU itself
    enc.cuda_graphs = True
    assert enc._graph_cache(torch.device("cpu")) is None
    captions = [
        "a red circle", "a red circle on a white background", "a red square", "", "two blue squares",
        "a small red circle next to a big blue square " * 20, "a red circle on a white", "two", "a red",
    ]  # fmt: skip
    ids = enc.tokenize(captions)
    short = ids[[0, 1, 2, 3, 4, 6, 7, 8], :20]  # all but the long one, cut to 20 positions
    batches = [short, ids, ids[[4, 0, 3], :9], short, ids[[1, 2]]]  # a shape again
    enc.cuda_graphs = False
    expected = [enc.encode_tokens(text) for text in batches]
    graphs = _graphed(enc)
    got = [enc.encode_tokens(text) for text in batches]  # each kept while the later ones run
    for out, ref in zip(got, expected):
        assert out.tokens.shape == ref.tokens.shape and torch.equal(out.mask, ref.mask)
        torch.testing.assert_close(out.tokens, ref.tokens, rtol=1e-5, atol=1e-5)  # other GEMM shapes round apart
        torch.testing.assert_close(out.pooled, ref.pooled, rtol=1e-5, atol=1e-5)
        assert not out.tokens[~out.mask].any()
    # Every batch here pads to 64 rows, so shapes repeat: those replayed instead of capturing again.
    padded = [key[0][3] for key in graphs._graphs]  # node_of's (rows, cols) per graph
    assert graphs.captures == len(graphs) < len(batches) and {rows for rows, _ in padded} == {64}
    assert {cols for _, cols in padded} >= {enc.context_length, 16}
    # Weights moved to new memory (here a dtype round trip): the graphs are captured again.
    enc.to(torch.float64).to(torch.float32)
    torch.testing.assert_close(enc.encode_tokens(short).tokens, expected[0].tokens, rtol=1e-5, atol=1e-5)
    assert graphs.captures == len(padded) + 1 and len(graphs) == 1


def test_a_full_graph_cache_runs_new_shapes_unpadded_and_says_so_once(caplog):
    enc = _random(seed=3)
    ids = enc.tokenize(["a red circle", "two blue squares", "a small red circle next to a big blue square " * 3])
    expected = [enc.encode_tokens(ids[:2]), enc.encode_tokens(ids)]
    graphs = _graphed(enc)
    graphs.limit = 1
    enc.encode_tokens(ids[:2])  # the one graph
    planned = []
    original = text_encoder_module._plan_arrays
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(text_encoder_module, "_plan_arrays", lambda *a: planned.append(a[2] is not None) or original(*a))
        got = [enc.encode_tokens(ids), enc.encode_tokens(ids), enc.encode_tokens(ids[:2])]
    assert planned == [True, False, True, False, True]  # padded for a graph, then as it is where none can be made
    assert len(graphs) == graphs.captures == 1
    for out, ref in zip(got, [expected[1], expected[1], expected[0]]):
        torch.testing.assert_close(out.tokens, ref.tokens, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.pooled, ref.pooled, rtol=1e-5, atol=1e-5)
    assert sum("CUDA graphs held" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("failure", ["capture", "replay"])
def test_graphs_that_fail_are_turned_off_and_batches_run_without_them(failure, caplog):
    enc = _random(seed=3)
    ids = enc.tokenize(["a red circle", "two blue squares", "a small red circle next to a big blue square"])
    batches = [ids[:2], ids[1:], ids[:2]]  # one shape: the second batch is the first replay
    expected = [enc.encode_tokens(text) for text in batches]

    def capture(fn, device, pool, stream):
        if failure == "capture":
            raise RuntimeError("operation not permitted when stream is capturing")
        return lambda: None  # a graph that records nothing: its outputs keep the batch before's

    _graphed(enc)._capture = capture
    got = [enc.encode_tokens(text) for text in batches]
    for out, ref in zip(got, expected):
        torch.testing.assert_close(out.tokens, ref.tokens, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.pooled, ref.pooled, rtol=1e-5, atol=1e-5)
    assert not enc.cuda_graphs and enc._graphs is None
    assert enc.graphs_error.startswith(f"graph ((") and ("capture failed" if failure == "capture" else "differs") in enc.graphs_error
    warnings = [r.getMessage() for r in caplog.records if "CUDA graphs turned off" in r.getMessage()]
    assert len(warnings) == 1 and enc.graphs_error in warnings[0]


def test_graph_buckets_cover_the_plan_and_stay_few():
    enc = _random()
    shapes = set()
    for rows in range(1, 1025, 37):
        for cols in range(1, 78, 3):
            for nodes in {1, rows * cols // 3 + 1, rows * cols}:
                r, c, n = enc._graph_bucket(rows, cols, nodes)
                assert r >= rows and c >= cols and n >= nodes and n <= r * c and c <= enc.context_length
                shapes.add((r, c, n))
    assert enc._graph_bucket(1024, 34, 12_700) == (1024, 40, 12_800)
    assert enc._graph_bucket(672, 34, 8_000) == (1024, 40, 8_960)
    # Per batch size: 10 column buckets and at most 32 node buckets each.
    assert len({s for s in shapes if s[0] == 1024}) <= 10 * 32


# --- device ---------------------------------------------------------------------------------


def test_device_move_keeps_working():
    enc = _random(seed=2)
    expected = enc.encode(CAPTIONS).tokens
    enc.to(torch.float64)  # Module.to() replaces buffers such as the causal attn_mask
    assert enc.encode(CAPTIONS).tokens.dtype == torch.float64
    enc.to(torch.float32)
    torch.testing.assert_close(enc.encode(CAPTIONS).tokens, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_placement_and_bf16_autocast(monkeypatch):
    cpu = _random(seed=4)
    ref = cpu.encode(CAPTIONS)
    gpu = TextEncoder(cpu.config, device="cuda")
    assert gpu.device.type == "cuda"
    out = gpu.encode(CAPTIONS)
    assert out.tokens.device.type == "cuda" and out.mask.device.type == "cuda"
    torch.testing.assert_close(out.tokens.cpu(), ref.tokens, rtol=1e-3, atol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out16 = gpu.encode(CAPTIONS)
        img = gpu.encode_images(torch.rand(2, 3, 24, 24, device="cuda"))
    torch.testing.assert_close(out16.tokens.float().cpu(), ref.tokens, rtol=0.05, atol=0.05)
    assert img.shape == (2, gpu.pooled_dim) and torch.isfinite(img.float()).all()
    # Built on the CPU, then moved: the same encoder.
    cpu.to("cuda")
    torch.testing.assert_close(cpu.encode(CAPTIONS).tokens, out.tokens)
    # The prefix trie's pinned, non-blocking index copies against the padded path, on the device.
    assert gpu.shares_prefixes
    ids = gpu.tokenize(CAPTIONS)[:, :12]
    from torch.profiler import profile

    with profile() as prof:
        shared = gpu.encode_tokens(ids)
    pins = sum(e.count for e in prof.key_averages() if e.key == "aten::pin_memory")
    assert pins == 3, pins  # the whole trie plan in one copy, the mask and the lengths
    padded = gpu.encode_tokens(ids, share_prefixes=False)
    assert shared.lengths.device.type == "cuda" and torch.equal(shared.mask, padded.mask)
    torch.testing.assert_close(shared.tokens, padded.tokens, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(shared.pooled, padded.pooled, rtol=1e-3, atol=1e-3)
    # bf16 autocast on the device: the block weights cast once give autocast's own bits.
    with torch.autocast("cuda", dtype=torch.bfloat16):
        cast_once = gpu.encode_tokens(ids)
        monkeypatch.setattr(TextEncoder, "_autocast_blocks", lambda self, blocks: blocks)
        cast_per_call = gpu.encode_tokens(ids)
    assert gpu._cast_blocks is not None and torch.equal(cast_once.tokens, cast_per_call.tokens)
    assert torch.equal(cast_once.pooled, cast_per_call.pooled)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_give_the_eager_states_with_one_launch():
    from torch.profiler import profile

    gpu = TextEncoder(_random(seed=4).config, device="cuda")
    ids = gpu.tokenize([f"{c} {i}" for i, c in enumerate(CAPTIONS * 30)])
    longest = int(gpu.token_lengths(ids).max())
    long = gpu.tokenize(["a small red circle next to a big blue square " * 3, "two"])  # 30 tokens: more columns
    batches = [ids[:, :longest], ids[:50, :longest], long, ids[:, :longest]]  # the first shape again last
    for autocast in (False, True):
        gpu.cuda_graphs = False
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            eager = [gpu.encode_tokens(t) for t in batches]
            gpu.cuda_graphs = True
            graphed = [gpu.encode_tokens(t) for t in batches]  # each kept while the later ones run
            with profile() as prof:
                replayed = gpu.encode_tokens(batches[0])
        tolerance = 5e-2 if autocast else 1e-4  # bf16 rounds apart at other GEMM shapes
        for got, ref in zip(graphed + [replayed], eager + eager[:1]):
            assert torch.equal(got.mask, ref.mask) and not got.tokens[~got.mask].any()
            torch.testing.assert_close(got.tokens.float(), ref.tokens.float(), rtol=tolerance, atol=tolerance)
            torch.testing.assert_close(got.pooled.float(), ref.pooled.float(), rtol=tolerance, atol=tolerance)
        # Three shapes; under autocast the bf16 copy of the blocks is new memory: new graphs for it.
        assert gpu._graphs.captures == 3 * (1 + autocast) and len(gpu._graphs) == 3
        launches = {e.key: e.count for e in prof.key_averages() if e.key.startswith("cuda") and "Launch" in e.key}
        assert sum(n for key, n in launches.items() if key.startswith("cudaGraphLaunch")) == 1, launches
        assert sum(launches.values()) < 20, launches  # the tower's few hundred kernels in one graph
