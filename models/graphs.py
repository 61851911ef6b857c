"""CUDA graphs of a computation at a few fixed shapes: one launch per call instead of one per op.

A batch of the text tower is a few hundred small kernels; on an H100 their launches, not the
GPU, bound the embed stage (the GPU was busy 9-15% of a shard). A CUDA graph records those
launches once per input shape and replays them with one. Shapes must be fixed, so callers pad
their inputs to a few buckets (`TextEncoder` pads its prefix-trie plan) and key each graph by
its bucket.

`GraphCache.run(key, weights, host_inputs, body)` copies `host_inputs` into the key's static
input on the device, replays the key's graph (capturing it the first time) and returns copies
of its outputs. The graphs write their outputs into buffers they all share, so only the inputs
and those buffers outlive a capture: the graphs share one memory pool for everything else and
may replay in any order, one at a time. A lock keeps threads from interleaving a replay and
the copies out of the buffers; the callers' one current stream orders the device work.

A cache captures all its graphs on one stream of its own, and never runs eager work on it:
torch's allocator reuses a freed block only on the stream that freed it, so graphs captured
on one stream share their scratch memory, and cuBLAS keeps a workspace per stream, which a
capture takes from the graphs' pool (eager work on that stream would write into it; see
pytorch#193832). Graphs are dropped all at once (`clear`), never one by one, since graphs
captured on one stream share that workspace (pytorch#193402).

A graph replays what its capture recorded, so a value the capture fixed (a host-side scalar
read from the batch, a tensor other than the static input) would go on giving the captured
batch's answer. The first replay of a cache's graphs is therefore compared with `body` run
eagerly on the same inputs; a disagreement, like a failed capture, raises `GraphError`, and
the caller runs its own path instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import NamedTuple

import torch

# Graphs a cache holds before it runs new shapes without one: each holds its own inputs
# and the kernels' parameters, and a capture costs a device synchronization.
GRAPH_LIMIT = 64

# How far a replay may be from `body` run eagerly on its inputs (`relative_difference`): the
# same kernels on the same inputs, bar cuBLAS picking another algorithm for another stream's
# workspace. A value the capture fixed is off by the values' own size.
REPLAY_TOLERANCE = 2e-2

# One capture at a time in a process: captures from two threads (a Dask worker's) would
# otherwise interleave their kernels.
_capturing = threading.Lock()


class GraphError(RuntimeError):
    """A graph could not be captured, or its replay disagrees with the computation run eagerly."""


class _Captured(NamedTuple):
    inputs: torch.Tensor  # the static input on the device, (n,)
    replay: Callable[[], None]
    outputs: tuple[torch.Tensor, ...]  # views of the shared output buffers


Capture = Callable[[Callable[[], None], torch.device, object, "torch.cuda.Stream | None"], Callable[[], None]]


def capture_cuda_graph(
    fn: Callable[[], None], device: torch.device, pool: object, stream: torch.cuda.Stream
) -> Callable[[], None]:
    """Records `fn`'s kernels on `device` into a graph in memory pool `pool`, on `stream` -> its
    replay. `fn` has run once already, outside the capture (attention and cuBLAS pick their
    kernels then). Other threads may use the device meanwhile (their calls are not captured:
    "thread_local"). `stream`, not torch's default capture stream: that one is one per process,
    made on whichever device came first."""
    graph = torch.cuda.CUDAGraph()
    with _capturing, torch.cuda.device(device):
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            fn()

    def replay() -> None:
        with torch.cuda.device(device):  # on `device`'s current stream, behind the input copy
            graph.replay()

    return replay


def run_eagerly(fn: Callable[[], None], device: torch.device, pool: object, stream: object) -> Callable[[], None]:
    """A stand-in for `capture_cuda_graph` where there is no CUDA (tests): "replay" runs `fn`
    again, so the static inputs, the shared outputs and their reuse are the ones a graph uses."""
    return fn


class GraphCache:
    """CUDA graphs of `body` keyed by input shape bucket.

    `weights` (any hashable, e.g. the data pointers of the parameters `body` reads) is compared
    on each run: a graph replays the memory it was captured on, so when the parameters move
    (`.to()`, a reload into new tensors) every graph is dropped and captured again. In-place
    edits need nothing: the graphs read the same memory."""

    def __init__(self, device: torch.device, capture: Capture = capture_cuda_graph, limit: int = GRAPH_LIMIT):
        self.device = device
        self.limit = limit
        self.captures = 0  # graphs captured over the cache's life (each costs a synchronization)
        self._capture = capture
        self._weights: Hashable = None
        self._graphs: dict[Hashable, _Captured] = {}
        self._buffers: list[torch.Tensor] = []  # one flat buffer per output, shared by every graph
        cuda = device.type == "cuda"
        self._checked = False  # whether a replay of these graphs has matched `body` run eagerly
        self._pool = torch.cuda.graph_pool_handle() if cuda else None
        self._stream = torch.cuda.Stream(device) if cuda else None  # every capture's, and nothing else's
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._graphs)

    @property
    def full(self) -> bool:
        return len(self._graphs) >= self.limit

    def run(
        self, key: Hashable, weights: Hashable, host_inputs: torch.Tensor,
        body: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    ) -> tuple[torch.Tensor, ...] | None:
        """`body(inputs)` -> outputs, through the graph of `key` -> new tensors holding them; None
        when the cache is full and `key` is new (the caller then runs its own path). `host_inputs`
        is a 1-D host tensor; every key has one size. `body` must not sync with the host.
        Raises `GraphError` when a capture fails or the first replay disagrees with `body`."""
        with self._lock:
            outputs = self._run(key, weights, host_inputs, body)
            return None if outputs is None else tuple(out.clone() for out in outputs)  # queued before any next replay

    def _run(
        self, key: Hashable, weights: Hashable, host_inputs: torch.Tensor,
        body: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    ) -> tuple[torch.Tensor, ...] | None:
        if weights != self._weights:
            self._clear()
            self._weights = weights
        captured = self._graphs.get(key)
        if captured is not None:
            if captured.inputs.shape != host_inputs.shape or captured.inputs.dtype != host_inputs.dtype:
                raise ValueError(f"graph {key}: inputs {tuple(host_inputs.shape)} {host_inputs.dtype}, captured with "
                                 f"{tuple(captured.inputs.shape)} {captured.inputs.dtype}")
            _queue_copy(captured.inputs, host_inputs)
            captured.replay()
            if not self._checked:
                self._check(key, captured, body)
            return captured.outputs
        if self.full:
            return None
        inputs = torch.empty(host_inputs.shape, dtype=host_inputs.dtype, device=self.device)
        _queue_copy(inputs, host_inputs)
        results = tuple(body(inputs))  # this call's results, and the warm-up before the capture
        outputs = self._shared_outputs(results)
        for out, result in zip(outputs, results):
            out.copy_(result)
        del results  # freed before the capture, which reuses their memory from its pool

        def fn() -> None:
            for out, result in zip(outputs, body(inputs)):
                out.copy_(result)

        try:
            replay = self._capture(fn, self.device, self._pool, self._stream)
        except RuntimeError as error:  # an op that cannot be captured
            raise GraphError(f"graph {key}: capture failed: {error}") from error
        self.captures += 1
        self._graphs[key] = _Captured(inputs, replay, outputs)
        return outputs

    def _check(self, key: Hashable, captured: _Captured, body: Callable[[torch.Tensor], Sequence[torch.Tensor]]) -> None:
        """A replay's outputs against `body` run eagerly on the same inputs, which are a batch
        other than the captured one (a first call of a key returns the eager run): what the
        capture fixed shows. Once per set of graphs; it syncs with the device."""
        for i, (got, expected) in enumerate(zip(captured.outputs, body(captured.inputs))):
            difference = relative_difference(got, expected)
            if not difference <= REPLAY_TOLERANCE:  # NaN fails too
                raise GraphError(f"graph {key}: output {i} of a replay differs from the same inputs run "
                                 f"eagerly by {difference:.3g} of its largest value")
        self._checked = True

    def clear(self) -> None:
        """Drop every graph and buffer (their memory goes back when nothing else holds it)."""
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self._graphs.clear()
        self._buffers.clear()
        self._weights = None
        self._checked = False
        if self.device.type == "cuda":
            self._pool = torch.cuda.graph_pool_handle()

    def _shared_outputs(self, results: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Views shaped as `results` of the shared buffers, each grown (a new buffer; graphs
        captured before keep the old one) when it is too small or of another dtype."""
        if len(self._buffers) not in (0, len(results)):
            raise ValueError(f"body gave {len(results)} outputs, earlier {len(self._buffers)}")
        if not self._buffers:
            self._buffers = [torch.empty(0, dtype=r.dtype, device=self.device) for r in results]
        views = []
        for i, r in enumerate(results):
            buffer = self._buffers[i]
            if buffer.numel() < r.numel() or buffer.dtype != r.dtype:
                buffer = self._buffers[i] = torch.empty(r.numel(), dtype=r.dtype, device=self.device)
            views.append(buffer[: r.numel()].view(r.shape))
        return tuple(views)


def relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference of `got` from `expected`, relative to `expected`'s largest
    magnitude (0 for equal tensors, NaN where either holds a NaN the other does not)."""
    got, expected = got.float(), expected.float()
    if got.shape != expected.shape:
        raise ValueError(f"shapes {tuple(got.shape)} and {tuple(expected.shape)}")
    if torch.equal(got.isnan(), expected.isnan()):
        got, expected = got.nan_to_num(0.0), expected.nan_to_num(0.0)
    if got.numel() == 0 or torch.equal(got, expected):
        return 0.0
    return float((got - expected).abs().max() / expected.abs().max())


def _queue_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """`src` (host) into `dst` (device) without waiting for the device: from pinned memory
    the copy is queued behind the device's work."""
    if dst.device.type == "cuda":
        src = src.pin_memory()
    dst.copy_(src, non_blocking=dst.device.type == "cuda")
