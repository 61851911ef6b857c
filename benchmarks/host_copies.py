"""Host time of the embed stage's copies between host and device, against the alternatives.

On an H100 the embed stage is bound by the host (the GPU was busy 9-15% of a shard) and
`aten::copy_` is its largest host item: ~10 ms per batch of 1,024 captions once the weight
casts were gone. Per batch the stage copies index tensors to the device (the trie plan, the
mask, the lengths and the real tokens' positions: 64 KB to 1 MB of int64) and results to the
host (~23 MB of float16 token states, 2 MB of float32 pooled embeddings, one bool). This times
each way of making those copies, as host time per call, with the stream busy with queued
matmuls when the copy is issued (as the tower's kernels keep it):

- to the device: `pin_memory()` and then a non-blocking copy (the stage's `to_device`), a
  non-blocking copy straight from pageable memory, and a blocking copy;
- to the host: a fresh pinned buffer per copy (the stage's `_to_host`), one pinned buffer
  per size reused, and a blocking `.cpu()`.

Each is checked against the source's values. Prints one JSON line: microseconds per call
(mean, p90, max) of each, and the busy work's own GPU time. CUDA only.

    python benchmarks/host_copies.py            # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=200, help="timed calls of each way (after 10 untimed)")
    p.add_argument("--busy-ms", type=float, default=5.0, help="GPU work queued before each copy, in ms")
    return p.parse_args(argv)


def busy_work(device: torch.device, ms: float) -> Callable[[], None]:
    """A callable that queues about `ms` of matmuls on the current stream and returns at once."""
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ a
    end.record()
    end.synchronize()
    per_matmul = start.elapsed_time(end) / 10
    n = max(1, round(ms / per_matmul))

    def queue() -> None:
        for _ in range(n):
            a @ a

    return queue


def timed(name: str, copy: Callable[[], torch.Tensor], expected: torch.Tensor, busy: Callable[[], None],
          device: torch.device, calls: int) -> dict[str, float]:
    """Host microseconds per `copy()` issued behind `busy()`'s queued work."""
    times = []
    for i in range(10 + calls):
        busy()
        t0 = time.perf_counter()
        out = copy()
        elapsed = time.perf_counter() - t0
        torch.cuda.synchronize(device)
        if i >= 10:
            times.append(elapsed * 1e6)
        if i == 0 and not torch.equal(out.cpu(), expected.cpu()):
            raise AssertionError(f"{name}: the copy differs from its source")
    times.sort()
    return {
        "mean_us": round(statistics.fmean(times), 1),
        "p90_us": round(times[int(0.9 * (len(times) - 1))], 1),
        "max_us": round(times[-1], 1),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("host_copies.py needs a CUDA device")
    device = torch.device("cuda")
    busy = busy_work(device, args.busy_ms)
    rows: dict[str, dict[str, float]] = {}

    for label, n in (("index_64KB", 8192), ("index_1MB", 131072)):
        host = torch.arange(n, dtype=torch.int64)
        rows[f"to_device_{label}_pinned_then_async"] = timed(
            "pinned", lambda: host.pin_memory().to(device, non_blocking=True), host, busy, device, args.calls
        )
        rows[f"to_device_{label}_pageable_async"] = timed(
            "pageable", lambda: host.to(device, non_blocking=True), host, busy, device, args.calls
        )
        rows[f"to_device_{label}_blocking"] = timed("blocking", lambda: host.to(device), host, busy, device, args.calls)

    for label, shape, dtype in (("tokens_23MB", (22800, 512), torch.float16), ("pooled_2MB", (1024, 512), torch.float32)):
        src = torch.randn(shape, device=device).to(dtype)
        reused = torch.empty(shape, dtype=dtype, pin_memory=True)
        rows[f"to_host_{label}_fresh_pinned_async"] = timed(
            "fresh", lambda: torch.empty(shape, dtype=dtype, pin_memory=True).copy_(src, non_blocking=True),
            src, busy, device, args.calls,
        )  # fmt: skip
        rows[f"to_host_{label}_reused_pinned_async"] = timed(
            "reused", lambda: reused.copy_(src, non_blocking=True), src, busy, device, args.calls
        )
        rows[f"to_host_{label}_blocking"] = timed("blocking", lambda: src.cpu(), src, busy, device, args.calls)

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    busy()
    end.record()
    end.synchronize()
    out = {
        "benchmark": "host_copies",
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "busy_gpu_ms": round(start.elapsed_time(end), 2),
        "calls": args.calls,
        "host_us_per_call": rows,
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
