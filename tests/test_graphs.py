"""models/graphs.py: the static inputs, shared outputs and invalidation of a `GraphCache`, on the
CPU with `run_eagerly` in place of the CUDA capture (the CUDA test in test_text_encoder.py
runs the real one)."""

from __future__ import annotations

import math

import pytest
import torch

from models.graphs import GraphCache, GraphError, relative_difference, run_eagerly

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
    assert body.calls == 3 and cache.captures == 1  # replayed, not captured again; the first replay checked eagerly
    assert torch.equal(again[0], torch.tensor([2.0, 2.0, 2.0, 10.0])) and float(again[1]) == 8.0
    cache.run("a", 1, torch.ones(4), body)
    assert body.calls == 4  # checked once


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


class ReadsHost:
    """body(inputs) -> (inputs * their sum), the sum read on the host: a CUDA graph replays the
    sum its capture read. `capture` stands in for that capture."""

    def __init__(self):
        self.captured_sum: float | None = None
        self.capturing = self.replaying = False

    def __call__(self, inputs: torch.Tensor) -> tuple[torch.Tensor]:
        total = float(inputs.sum())
        if self.capturing:
            self.captured_sum = total
        return (inputs * (self.captured_sum if self.replaying else total),)

    def capture(self, fn, device, pool, stream):
        self.capturing = True
        fn()
        self.capturing = False

        def replay():
            self.replaying = True
            fn()
            self.replaying = False

        return replay


def test_a_replay_that_disagrees_with_the_body_run_eagerly_is_an_error():
    body = ReadsHost()
    cache = GraphCache(CPU, capture=body.capture)
    assert torch.equal(cache.run("a", 1, torch.ones(3), body)[0], torch.full((3,), 3.0))  # the run before the capture
    assert torch.equal(cache.run("a", 1, torch.ones(3), body)[0], torch.full((3,), 3.0))  # the same sum: agrees
    cache.clear()  # a new set of graphs is checked again
    cache.run("a", 1, torch.ones(3), body)
    with pytest.raises(GraphError, match=r"graph a: output 0 of a replay differs from the same inputs run eagerly by 0\.5"):
        cache.run("a", 1, torch.full((3,), 2.0), body)  # replays 2 * 3 where eagerly it is 2 * 6


def test_a_graph_that_keeps_old_outputs_is_caught_on_its_first_replay():
    cache = GraphCache(CPU, capture=lambda fn, *_: lambda: None)  # records nothing: the outputs keep the last batch's
    cache.run("a", 1, torch.ones(3), Body())
    with pytest.raises(GraphError, match="differs"):
        cache.run("a", 1, torch.arange(3.0), Body())


def test_a_failed_capture_is_a_graph_error_and_keeps_no_graph():
    def capture(fn, device, pool, stream):
        raise RuntimeError("operation not permitted when stream is capturing")

    cache = GraphCache(CPU, capture=capture)
    with pytest.raises(GraphError, match="graph a: capture failed: operation not permitted"):
        cache.run("a", 1, torch.ones(3), Body())
    assert len(cache) == 0 and cache.captures == 0


def test_relative_difference():
    a = torch.tensor([1.0, -4.0, float("nan")])
    assert relative_difference(a, a.clone()) == 0.0  # NaN where the other has NaN
    assert relative_difference(torch.tensor([1.0, -3.0, float("nan")]), a) == 0.25
    assert math.isnan(relative_difference(torch.tensor([1.0, -4.0, 0.0]), a))  # a NaN the other lacks
    assert relative_difference(torch.ones(2), torch.zeros(2)) == float("inf")
    assert relative_difference(torch.ones(2, dtype=torch.bfloat16), torch.ones(2)) == 0.0
    assert relative_difference(torch.ones(0), torch.ones(0)) == 0.0
    with pytest.raises(ValueError, match="shapes"):
        relative_difference(torch.ones(2), torch.ones(3))
