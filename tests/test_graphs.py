"""models/graphs.py: the static inputs, shared outputs and invalidation of a `GraphCache`, on the
CPU with `run_eagerly` in place of the CUDA capture (the CUDA test in test_text_encoder.py
runs the real one)."""

from __future__ import annotations

import pytest
import torch

from models.graphs import GraphCache, run_eagerly

CPU = torch.device("cpu")


class Body:
    """body(inputs) -> (inputs * scale, inputs.sum()), counting its calls."""

    def __init__(self, scale: float = 2.0):
        self.scale = torch.tensor(scale)
        self.calls = 0

    def __call__(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return inputs * self.scale, inputs.sum()


def _cache(limit: int = 8) -> tuple[GraphCache, list]:
    captured = []

    def capture(fn, device, pool, stream):
        captured.append(fn)  # a CUDA capture records fn's kernels; it does not run them
        return run_eagerly(fn, device, pool, stream)

    return GraphCache(CPU, capture=capture, limit=limit), captured


def test_first_run_computes_then_replays_read_the_static_input():
    cache, captured = _cache()
    body = Body()
    out = cache.run("a", 1, torch.arange(4.0), body)
    assert body.calls == 1 and len(captured) == 1 and cache.captures == 1  # the warm-up is this call's result
    assert torch.equal(out[0], torch.arange(4.0) * 2) and float(out[1]) == 6.0
    again = cache.run("a", 1, torch.tensor([1.0, 1.0, 1.0, 5.0]), body)
    assert body.calls == 2 and cache.captures == 1  # replayed, not captured again
    assert torch.equal(again[0], torch.tensor([2.0, 2.0, 2.0, 10.0])) and float(again[1]) == 8.0


def test_graphs_write_one_shared_buffer_and_results_are_copied_out_of_it():
    cache, _ = _cache()
    body = Body()
    first = cache.run("four", 1, torch.arange(4.0), body)
    second = cache.run("three", 1, torch.ones(3), body)
    assert len(cache) == 2 and len(cache._buffers) == 2  # one buffer per output, for every graph
    shared = cache._buffers[0].untyped_storage().data_ptr()
    assert {g.outputs[0].untyped_storage().data_ptr() for g in cache._graphs.values()} == {shared}
    assert shared not in {first[0].untyped_storage().data_ptr(), second[0].untyped_storage().data_ptr()}
    assert torch.equal(first[0], torch.arange(4.0) * 2) and torch.equal(second[0], torch.full((3,), 2.0))
    # A larger output grows the buffer; the graphs before keep the one they were captured with.
    big = cache.run("six", 1, torch.ones(6), body)
    assert cache._buffers[0].untyped_storage().data_ptr() != shared and torch.equal(big[0], torch.full((6,), 2.0))
    assert torch.equal(cache.run("four", 1, torch.arange(4.0), body)[0], first[0])


def test_new_weights_drop_every_graph_and_a_full_cache_declines_new_shapes():
    cache, _ = _cache(limit=2)
    body = Body()
    cache.run("a", ("w", 1), torch.ones(2), body)
    cache.run("b", ("w", 1), torch.ones(3), body)
    assert cache.run("c", ("w", 1), torch.ones(4), body) is None  # full: the caller runs its own path
    assert len(cache) == 2 and cache.captures == 2
    assert cache.run("a", ("w", 1), torch.ones(2), body) is not None  # known shapes still replay
    cache.run("a", ("w", 2), torch.ones(2), body)  # parameters moved: captured again
    assert len(cache) == 1 and cache.captures == 3


def test_inputs_of_another_size_for_a_known_key_are_refused():
    cache, _ = _cache()
    cache.run("a", 1, torch.ones(4), Body())
    with pytest.raises(ValueError, match="captured with"):
        cache.run("a", 1, torch.ones(5), Body())
