"""Ingest throughput: N generated 256 px JPEG/PNG images -> 32 px and 64 px Parquet.

    .venv/bin/python benchmarks/ingest.py [--n 2000] [--workers N]

For each resolution it times `tasks.ingest.ingest_dataset` end to end (fingerprint,
parallel decode/resize/encode, DuckDB curation, atomic publish) and, in the same
run, a straightforward single-process baseline: a Pillow loop over the metadata
(open, RGB, centre-crop Lanczos resize, PNG encode, sha256) and one pandas
`to_parquet`. Prints one JSON line: images/s, images/s per core, the ratio to the baseline
(wall clock, fastest of --repeat interleaved runs), the same for a single worker,
images per CPU-second (robust to other load on the machine), and peak memory (PSS
of this process and all its workers, sampled). About three minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
TARGET_SPEEDUP = 1.8


def make_source(root: Path, n: int, size: int = 256, seed: int = 0) -> Path:
    """Photo-like images (smooth structure plus sensor-like noise), half JPEG, half PNG."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    with open(root / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for i in range(n):
            coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=float)
            pixels = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
            fmt, ext = ("JPEG", "jpg") if i % 2 == 0 else ("PNG", "png")
            file_name = f"images/{i:06d}.{ext}"
            Image.fromarray(pixels).save(root / file_name, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            meta.write(json.dumps({"file_name": file_name, "text": f"benchmark image number {i}"}) + "\n")
    return root


def baseline(source: Path, resolution: int, out: Path) -> float:
    """The straightforward way: one process, a Pillow loop, one to_parquet. Returns seconds."""
    import pandas as pd

    started = time.perf_counter()
    rows = []
    for line in (source / "metadata.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        with Image.open(source / record["file_name"]) as im:
            width, height = im.size
            small = ImageOps.fit(im.convert("RGB"), (resolution, resolution), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        small.save(buf, "PNG")
        data = buf.getvalue()
        rows.append(
            {
                "id": hashlib.sha256(data).hexdigest(),
                "caption": record["text"],
                "image": data,
                "orig_width": width,
                "orig_height": height,
                "source_uri": record["file_name"],
            }
        )
    pd.DataFrame(rows).to_parquet(out)
    return time.perf_counter() - started


class MemorySampler(threading.Thread):
    """Peak total memory of this process and its descendants (PSS, so shared pages count once)."""

    def __init__(self, enabled: bool = True, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak_bytes, self.running = interval, 0, enabled
        if enabled:
            self.start()

    def run(self) -> None:
        family, tick = [os.getpid()], 0
        while self.running:
            if tick % 10 == 0:  # listing /proc is the costly part; workers live long
                family = _family(os.getpid())
            self.peak_bytes = max(self.peak_bytes, sum(_pss(pid) for pid in family))
            tick += 1
            time.sleep(self.interval)

    def stop(self) -> int | None:
        if not self.running:
            return None
        self.running = False
        self.join()
        return self.peak_bytes


def _mb(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def _family(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    family, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        family += frontier
    return family


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds() -> float:
    """CPU used so far by this process and its descendants, reaped or not.

    Ingest workers are children of the multiprocessing fork server, not of this
    process, so they are counted through the fork server's cutime/cstime once it
    has reaped them (and through their own utime/stime while they run).
    """
    own = os.times()
    total = own.user + own.system + own.children_user + own.children_system
    tick = os.sysconf("SC_CLK_TCK")
    for pid in _family(os.getpid())[1:]:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
        total += (utime + stime + cutime + cstime) / tick
    return total


def timed(fn) -> tuple[float, float, float | None]:
    """(wall seconds, CPU seconds, peak memory bytes) of fn()."""
    sampler = MemorySampler(enabled=os.path.exists("/proc/self/smaps_rollup"))
    cpu, started = cpu_seconds(), time.perf_counter()
    fn()
    wall = time.perf_counter() - started
    time.sleep(0.2)  # let the fork server reap finished workers, so their CPU is counted
    return wall, cpu_seconds() - cpu, sampler.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="images to generate and ingest")
    parser.add_argument("--workers", type=int, default=None, help="ingest worker processes (default: usable cores)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the fastest counts (timeit's rule)")
    args = parser.parse_args()

    # Imported here, not at module level: worker processes may re-import the main
    # module (spawn) and must not pay for Prefect's import each time.
    sys.path.insert(0, str(REPO))
    from tasks.ingest import IngestConfig, ingest_dataset, usable_cores

    cores = usable_cores()
    workers = args.workers or cores
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        tmp_path = Path(tmp)
        source = make_source(tmp_path / "source", args.n)
        results = []
        for resolution in (32, 64):
            runs: dict[str, list[tuple[float, float, float | None]]] = {"baseline": [], "ingest": [], "ingest_1": []}
            for attempt in range(args.repeat):  # interleaved, so load changes hit all alike

                def ingest(n_workers: int, tag: str) -> None:
                    version = ingest_dataset(
                        source,
                        f"bench-{resolution}-{tag}-{attempt}",  # a new name: never "already published"
                        IngestConfig(resolution=resolution, workers=n_workers, val_fraction=0.0),
                        data_root=tmp_path / "data",
                        progress=False,
                    )
                    assert version.counts["train"] == args.n, version.counts

                out = tmp_path / f"baseline-{resolution}.parquet"
                runs["baseline"].append(timed(lambda: baseline(source, resolution, out)))
                runs["ingest"].append(timed(lambda: ingest(workers, "w")))
                runs["ingest_1"].append(timed(lambda: ingest(1, "1")))
            best = {k: min(v, key=lambda r: r[0]) for k, v in runs.items()}
            wall, base_wall, one_wall = best["ingest"][0], best["baseline"][0], best["ingest_1"][0]
            cpu = min(r[1] for r in runs["ingest"])
            base_cpu = min(r[1] for r in runs["baseline"])
            results.append(
                {
                    "resolution": resolution,
                    "images_per_s": round(args.n / wall, 1),
                    "images_per_s_per_core": round(args.n / wall / workers, 1),
                    "baseline_images_per_s": round(args.n / base_wall, 1),
                    "speedup_vs_baseline": round(base_wall / wall, 2),
                    "single_worker_images_per_s": round(args.n / one_wall, 1),
                    "single_worker_speedup_vs_baseline": round(base_wall / one_wall, 2),
                    "images_per_cpu_s": round(args.n / cpu, 1),
                    "baseline_images_per_cpu_s": round(args.n / base_cpu, 1),
                    "seconds": [round(r[0], 2) for r in runs["ingest"]],  # the first includes starting workers
                    "baseline_seconds": [round(r[0], 2) for r in runs["baseline"]],
                    "single_worker_seconds": [round(r[0], 2) for r in runs["ingest_1"]],
                    "peak_memory_mb": _mb(max((r[2] or 0) for r in runs["ingest"]) or None),
                    "baseline_peak_memory_mb": _mb(max((r[2] or 0) for r in runs["baseline"]) or None),
                }
            )
    speedup = min(r["speedup_vs_baseline"] for r in results)
    print(
        json.dumps(
            {
                "benchmark": "ingest",
                "n_images": args.n,
                "source": "256 px, half JPEG q90, half PNG, metadata.jsonl",
                "cores": cores,
                "workers": workers,
                "repeat": args.repeat,
                "results": results,
                "speedup_vs_baseline": speedup,
                "target_speedup": TARGET_SPEEDUP,
                "meets_target": speedup >= TARGET_SPEEDUP,
                "peak_memory_mb": max((r["peak_memory_mb"] or 0) for r in results) or None,
                "load_average_before": round(load_before, 2),
                "load_average_after": round(os.getloadavg()[0], 2),
                "notes": "fastest of `repeat` interleaved runs; memory is the PSS of this process and "
                "its workers sampled every 100 ms; CPU includes the workers; a load average above "
                "the core count means other processes shared the CPUs",
            }
        )
    )


if __name__ == "__main__":
    main()
