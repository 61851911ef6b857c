"""Where each thread of a run spent its time, from a py-spy sampling profile.

`py-spy record --threads --idle --native --format raw -o FILE -- python3 benchmarks/embed.py ...`
samples every thread's Python and native stack; this reads FILE and, for the samples whose
stack passes through `--within` (default: the embed stage's shard loop) and those of the
stage's own threads (`--threads`, default: named embed-*), prints per thread:
the share of samples, the leaf frames (the native function the thread was in: a CUDA driver
call, a lock, a memcpy, numpy) and the deepest frame of the project's own code (which line of
`models/` or `tasks/` the time belongs to). `benchmarks/gpu.sh spy` runs both on a GPU.

    python benchmarks/spy_summary.py embed-spy.txt --top 15
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

OWN_CODE = re.compile(r"\((?:[^()]*/)?(?:models|tasks|benchmarks)/[^()]*:\d+\)$")
THREAD = re.compile(r"^thread \(\d+\)(?:: (.*))?$")
BARE_ADDRESS = re.compile(r"^0x[0-9a-fA-F]+ (\(.*\))$")  # a native frame without a symbol: '0x7f... (libc.so.6)'


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("raw", type=Path, help="py-spy's --format raw output (one stack and its count per line)")
    p.add_argument("--within", default="write_caption_shards", help="samples whose stack has a frame containing this")
    p.add_argument("--threads", default="embed-", help="and every sample of the threads whose names start so (the stage's own)")
    p.add_argument("--top", type=int, default=12, help="rows per table")
    return p.parse_args(argv)


def thread_name(frame: str) -> str:
    """'thread (123): embed-arrow_0' -> 'embed-arrow'; a thread without a name keeps its frame."""
    match = THREAD.match(frame)
    if not match or not match.group(1):
        return frame
    return re.sub(r"_\d+$", "", match.group(1))


def summarize(lines: list[str], within: str, threads: str = "") -> dict[str, dict[str, Counter]]:
    """Raw lines -> {thread: {"leaf": Counter, "own": Counter}} over the samples whose stack
    passes through `within` or whose thread's name starts with `threads`; each table's counts
    add up to the thread's samples."""
    out: dict[str, dict[str, Counter]] = defaultdict(lambda: {"leaf": Counter(), "own": Counter()})
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        n, thread = int(count), thread_name(frames[0])
        if not (any(within in f for f in frames) or (threads and thread.startswith(threads))):
            continue
        own = [f for f in frames if OWN_CODE.search(f)]
        out[thread]["leaf"][BARE_ADDRESS.sub(r"? \1", frames[-1])] += n  # one row per library, not per address
        out[thread]["own"][own[-1] if own else "(outside the project's code)"] += n
    return out


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    threads = summarize(args.raw.read_text().splitlines(), args.within, args.threads)
    if not threads:
        raise SystemExit(f"no sample in {args.raw} passes through {args.within!r} or is of a thread {args.threads}*")
    report = []
    for thread, tables in sorted(threads.items(), key=lambda kv: -kv[1]["leaf"].total()):
        total = tables["leaf"].total()
        report.append(f"== {thread}: {total} samples")
        for title in ("leaf", "own"):
            report.append(f"  {'leaf frames' if title == 'leaf' else 'deepest own-code frames'}:")
            for frame, n in tables[title].most_common(args.top):
                report.append(f"    {100 * n / total:5.1f}%  {frame[:160]}")
    text = "\n".join(report)
    print(text)
    return text


if __name__ == "__main__":
    main()
    sys.exit(0)
