"""Caption-embedding throughput: the embed stage's batched path against a naive loop, same run.

Batched: what `embed_dataset` runs over its shards: tokenize (over a `TokenizerPool` of
worker processes on a GPU, started before the timing as the stage starts it once per run;
the next shard tokenizing while this one encodes), sort by token prefix, encode `--batch`
captions per call, each distinct token prefix once (bf16 autocast on CUDA), write Parquet
caption shards from writer threads, each fsynced in the background while the next encodes
(`tasks.embed.write_caption_shards`, the stage's own loop; timed until every file is durable). Naive: what a hand-rolled loop runs, one caption at a
time through open_clip's own forward at the full context length (the encoder's padded path
on 77 positions), each result copied to the host (no file); `single_captions_per_s` is this
project's encoder one caption at a time (only the real tokens), for the share of the
speedup that batching adds; before the timing, `shared_vs_padded_rel_error` checks the
prefix path against the padded one on this device and precision (the run fails past 5%).
All use the same random-init encoder (no download) on
distinct shapes-style captions of varied length (or the distinct captions of
`--captions-from`), after an untimed warm-up. Prints one JSON
line: captions/s of each, `speedup` = batched / naive, bytes written per caption, the
tokenizer's own captions/s in one process (and `tokenize_speedup` over open_clip's own
tokenizer, which gives the same ids) and over the pool, and the targets (>= 10x on CPU; >= 25,000 captions/s for
ViT-B-32 at batch 1024 on an H100). On a GPU the batched path runs twice per round on the same
captions, without and with `embed.cuda_graphs` (`--cuda-graphs`): `graphs_captions_per_s`
includes capturing each new batch shape, as a stage run would, and is the stage's figure on a
GPU (graphs are on by default there); `batched_captions_per_s` is the eager tower's, and
`graphs_vs_eager` their ratio; `rounds_captions_per_s` shows each round alone. Graphs that fail (a capture, or the check of a replay against the eager
tower) are reported in `graphs_error`, and the run goes on without them.

    python benchmarks/embed.py                                                  # CPU, ViT-B-32
    python benchmarks/embed.py --device cuda --captions 100000 --batch 1024     # GPU

Imports torch, open_clip, pyarrow, pydantic, duckdb and the project's `models` and `tasks.embed`
(whose Prefect import is optional): no prefect, no mlflow.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.graphs import relative_difference  # noqa: E402
from models.text_encoder import PrefixTrie, TextEncoder, TextEncoderConfig, TokenizerPool  # noqa: E402
from tasks.embed import (  # noqa: E402
    TOKENIZE_CHUNK,
    EmbedConfig,
    _autocast,
    caption_batches,
    write_caption_shard,
    write_caption_shards,
)

from benchmarks.quality import _at_least  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "magenta", "grey", "pink"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon", "cross", "diamond", "heart"]
SIZES = ["", "small ", "large ", "tiny ", "big "]
POSITIONS = ["top left", "top right", "bottom left", "bottom right", "centre", "upper middle", "lower middle"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name (random init, no download)")
    p.add_argument("--captions", type=int, default=None, help="captions for the batched path (default: 256 CPU, 100000 GPU; with --captions-from at most what the files hold past the warm-up and naive ones)")
    p.add_argument("--naive-captions", type=int, default=None, help="captions for the naive loop (default: 16 CPU, 512 GPU)")
    p.add_argument("--batch", type=int, default=None, help="captions per encoder call (default: 256 CPU, 1024 GPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument(
        "--tokenize-workers", type=int, default=None, help="tokenizer processes (default: as the embed stage, 0 on CPU)"
    )
    p.add_argument("--rounds", type=int, default=2, help="alternations of naive and batched timing")
    p.add_argument(
        "--tokenize-captions", type=_at_least(1), default=20_000,
        help="captions for timing the tokenizer alone, this project's and open_clip's (default: 20000)",
    )  # fmt: skip
    p.add_argument("--shard", type=int, default=16384, help="captions per shard (the stage's captions_per_shard)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--captions-from", type=Path, default=None, metavar="PATH",
        help="take the distinct captions of these Parquet files (a file, or a folder searched recursively, "
        "rejects.parquet skipped; a `caption` column) instead of generated ones, in a seeded shuffle",
    )  # fmt: skip
    p.add_argument(
        "--cuda-graphs", choices=["off", "on", "both"], default=None,
        help="the batched path without or with embed.cuda_graphs (CUDA graphs of the text tower), or both "
        "in alternation, each on the same captions (default: both on a GPU, off on the CPU, which has none)",
    )  # fmt: skip
    p.add_argument(
        "--profile", action="store_true",
        help="after the timing, run one more shard under torch.profiler and print where its time went to stderr",
    )  # fmt: skip
    return p.parse_args(argv)


def make_captions(n: int, seed: int) -> list[str]:
    """`n` distinct captions of one or two shapes, 10 to 35 tokens: every one is encoded."""
    rng = random.Random(seed)
    captions: dict[str, None] = {}
    while len(captions) < n:
        parts = [f"a {rng.choice(SIZES)}{rng.choice(COLOURS)} {rng.choice(SHAPES)} in the {rng.choice(POSITIONS)}"]
        if rng.random() < 0.4:
            parts.append(f"and a {rng.choice(SIZES)}{rng.choice(COLOURS)} {rng.choice(SHAPES)} in the {rng.choice(POSITIONS)}")
        caption = " ".join(parts) + f" on a {rng.choice(COLOURS)} background"
        if rng.random() < 0.5:
            caption += f", picture {rng.randrange(10**6)}"
        captions[caption] = None
    return list(captions)


def read_captions(path: Path, seed: int) -> list[str]:
    """The distinct non-null `caption` values of a Parquet file or of every one under a folder
    (but an ingested dataset's rejects.parquet), shuffled."""
    import pyarrow.parquet as pq

    files = sorted(f for f in path.rglob("*.parquet") if f.name != "rejects.parquet") if path.is_dir() else [path]
    found: dict[str, None] = {}
    for f in files:
        if "caption" in pq.read_schema(f).names:
            found.update(dict.fromkeys(c for c in pq.read_table(f, columns=["caption"]).column(0).to_pylist() if c is not None))
    if not found:
        raise SystemExit(f"no Parquet file with a `caption` column under {path}")
    captions = sorted(found)
    random.Random(seed).shuffle(captions)
    return captions


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.captions or (100_000 if gpu else 256)
    n_naive = args.naive_captions or (512 if gpu else 16)
    batch = args.batch or (1024 if gpu else 256)
    graph_modes = {"off": [False], "on": [True], "both": [False, True]}[args.cuda_graphs or ("both" if gpu else "off")]

    encoder = TextEncoder(TextEncoderConfig(args.model, allow_random_init=True), device=device, cuda_graphs=True)
    if True in graph_modes and encoder._graph_cache(device) is None:
        raise SystemExit(f"--cuda-graphs {args.cuda_graphs}: CUDA graphs need a CUDA device, and this run is on {device}")
    if args.captions_from is not None:
        captions = read_captions(args.captions_from, args.seed)
        n = min(n, len(captions) - batch - n_naive)
        if n < 1:
            raise SystemExit(f"{args.captions_from} has {len(captions)} distinct captions; need more than {batch + n_naive}")
    else:
        captions = make_captions(batch + n_naive + n, args.seed)
    warmup, naive, batched = captions[:batch], captions[batch : batch + n_naive], captions[batch + n_naive : batch + n_naive + n]

    workers = args.tokenize_workers
    if workers is None:
        workers = EmbedConfig().resolved_tokenize_workers(device)
    t0 = time.perf_counter()
    pool = TokenizerPool(encoder, workers, TOKENIZE_CHUNK)  # once per embed stage run, so outside the timing
    pool([""] * (TOKENIZE_CHUNK * max(1, workers)))  # workers up and unpickled
    pool_start_s = time.perf_counter() - t0

    # Rounds alternate the two paths, so a neighbour's load on a shared machine hits both alike.
    naive_s = single_s = 0.0
    batched_s = dict.fromkeys(graph_modes, 0.0)  # per embed.cuda_graphs setting
    round_rates: dict[bool, list[float]] = {mode: [] for mode in graph_modes}
    shard_bytes, max_tokens = 0, 0
    trie_error: dict[bool, float] = {}
    with tempfile.TemporaryDirectory() as tmp, pool:
        for mode in graph_modes:
            encoder.cuda_graphs = mode
            write_caption_shard(encoder, warmup, Path(tmp) / "warmup.parquet", batch)  # kernels, allocator, BPE cache
            trie_error[mode] = shared_vs_padded(encoder, warmup[:64], device)  # also warms the naive loop's path
        if encoder.graphs_error is not None:  # the eager figures still come; the graphs' error is reported
            if graph_modes == [True]:
                raise SystemExit(f"--cuda-graphs on: CUDA graphs failed: {encoder.graphs_error}")
            graph_modes.remove(True)
            del batched_s[True], round_rates[True]
            print(f"# CUDA graphs failed, timed without them: {encoder.graphs_error}", file=sys.stderr)
        for r in range(args.rounds):
            encoder.cuda_graphs = False  # the one-caption loops run as a hand-rolled script would
            synchronize(device)
            t0 = time.perf_counter()
            for caption in naive[r :: args.rounds]:
                with _autocast(device):
                    enc = encoder.encode_tokens(encoder.tokenize([caption]), share_prefixes=False)  # 77 positions
                enc.tokens[enc.mask].to(torch.float16).cpu()
            synchronize(device)
            naive_s += time.perf_counter() - t0

            t0 = time.perf_counter()
            for caption in naive[r :: args.rounds]:
                with _autocast(device):
                    enc = encoder.encode([caption])  # real tokens only
                enc.tokens[enc.mask].to(torch.float16).cpu()
            synchronize(device)
            single_s += time.perf_counter() - t0

            part = batched[r :: args.rounds]
            shards = [part[i : i + args.shard] for i in range(0, len(part), args.shard)]
            # The same captions for each setting, which goes first in turn; a new shape is captured in the timing.
            for mode in graph_modes if r % 2 == 0 else graph_modes[::-1]:
                encoder.cuda_graphs = mode and encoder.graphs_error is None  # graphs that failed stay off (graphs_error)
                out = Path(tmp) / f"round-{r:02d}-graphs-{mode}"
                t0 = time.perf_counter()
                names, longest = write_caption_shards(encoder, shards, out, batch, pool)  # the stage's shard loop
                synchronize(device)
                elapsed = time.perf_counter() - t0
                batched_s[mode] += elapsed
                round_rates[mode].append(round(len(part) / elapsed, 1))
                max_tokens = max(max_tokens, longest)
                if mode == graph_modes[0]:  # the files of one setting
                    shard_bytes += sum((out / name).stat().st_size for name in names)
                shutil.rmtree(out)  # a 100k-caption round is ~2.5 GB

        if args.profile:
            for mode in graph_modes:
                encoder.cuda_graphs = mode
                print(f"# profile with embed.cuda_graphs={mode}", file=sys.stderr)
                profile_shard(encoder, batched[: args.shard], pool, Path(tmp) / f"profiled-{mode}", batch, device)

        sample = make_captions(args.tokenize_captions, args.seed + 1)  # the same for every --captions
        t0 = time.perf_counter()
        pool(sample)  # the stage's tokenizer pool alone: what it can feed the encoder
        pool_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = encoder.tokenize(sample)  # the tokenizer alone, one process: the host's share of the work
    tokenize_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference = encoder.tokenizer.base(sample, context_length=encoder.context_length)  # open_clip's own, same ids
    open_clip_tokenize_s = time.perf_counter() - t0
    if not torch.equal(ids, reference):
        raise AssertionError("ClipTokenizer and open_clip's tokenizer disagree on the benchmark captions")

    batched_rate, naive_rate = len(batched) / batched_s[graph_modes[0]], len(naive) / naive_s
    mean_tokens, tower_tokens = token_counts(encoder, [batched[r :: args.rounds] for r in range(args.rounds)], args.shard, batch)
    out = {
        "benchmark": "embed",
        "device": torch.cuda.get_device_name(device) if gpu else f"cpu ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
        "model": args.model,
        "precision": "bf16-autocast" if gpu else "fp32",
        "batch": batch,
        "captions": len(batched),
        "captions_from": str(args.captions_from) if args.captions_from else "generated",
        "rounds": args.rounds,
        "shard": args.shard,
        "batched_captions_per_s": round(batched_rate, 2),  # with embed.cuda_graphs off unless --cuda-graphs on
        "cuda_graphs": graph_modes,
        "graphs_error": encoder.graphs_error,  # why CUDA graphs were turned off, if they were
        "rounds_captions_per_s": {f"graphs_{'on' if m else 'off'}": rates for m, rates in round_rates.items()},
        "naive_captions": len(naive),
        "naive_captions_per_s": round(naive_rate, 2),
        "speedup": round(batched_rate / naive_rate, 2),
        "single_captions_per_s": round(len(naive) / single_s, 2),
        "speedup_over_single": round(batched_rate * single_s / len(naive), 2),
        "shares_prefixes": encoder.shares_prefixes,
        "shared_vs_padded_rel_error": trie_error[graph_modes[0]],
        "tower_tokens_per_caption": tower_tokens,  # positions the tower's projections and MLPs ran, per caption
        "bytes_per_caption": round(shard_bytes / len(batched), 1),
        "mean_tokens": mean_tokens,  # of the batched captions
        "max_tokens": max_tokens,
        "context_length": encoder.context_length,
        "width": encoder.width,
        "tokenize_captions_per_s": round(len(sample) / tokenize_s, 1),
        "open_clip_tokenize_captions_per_s": round(len(sample) / open_clip_tokenize_s, 1),
        "tokenize_speedup": round(open_clip_tokenize_s / tokenize_s, 2),
        "tokenize_workers": workers,
        "tokenize_pool_captions_per_s": round(len(sample) / pool_s, 1),
        "tokenize_pool_start_s": round(pool_start_s, 2),
        "target": {"speedup_cpu": 10.0, "captions_per_s_h100_vit_b_32_batch_1024": 25000},
        "torch": torch.__version__,
    }
    if gpu:  # graphs hold their inputs, shared outputs and one pool of scratch memory on top of eager's
        out["cuda_max_memory_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["cuda_memory_reserved_mb"] = round(torch.cuda.memory_reserved(device) / 2**20, 1)
    if True in graph_modes:
        graphs_rate = len(batched) / batched_s[True]
        out["graphs_captions_per_s"] = round(graphs_rate, 2)  # embed.cuda_graphs on, captures included
        out["graphs_vs_eager"] = round(graphs_rate / batched_rate, 3) if False in graph_modes else None  # eager goes first
        out["graphs_vs_padded_rel_error"] = trie_error[True]
        out["graph_captures"] = encoder._graphs.captures if encoder._graphs is not None else 0
    print(json.dumps(out), flush=True)
    return out


def shared_vs_padded(encoder: TextEncoder, captions: list[str], device: torch.device) -> float:
    """The prefix path against the padded one (open_clip's own block calls) on this device and
    precision: the largest difference of token states or pooled embeddings, relative to their
    largest magnitude. Fails the run past 5% (bf16 rounding stays near 1%)."""
    text = encoder.tokenize(captions)
    with _autocast(device):
        shared, padded = encoder.encode_tokens(text), encoder.encode_tokens(text, share_prefixes=False)
        if encoder.cuda_graphs:  # the first call of a shape returns the run before its capture: check a replay
            graphs = encoder._graphs
            captures = graphs.captures
            shared = encoder.encode_tokens(text)
            if encoder.cuda_graphs and graphs.captures != captures:
                raise AssertionError("the second call of one batch shape captured a graph again")
    error = max(relative_difference(a, b) for a, b in [(shared.tokens, padded.tokens), (shared.pooled, padded.pooled)])
    if error > 0.05:
        raise AssertionError(f"the prefix path differs from the padded path by {error:.3f} of the largest value")
    return round(error, 6)


def token_counts(encoder: TextEncoder, rounds: list[list[str]], shard: int, batch: int) -> tuple[float, float]:
    """(real tokens, positions the tower runs) per caption over the stage's shards and batches:
    the distinct token prefixes of each batch, in prefix order within a shard, when the encoder
    shares prefixes; each batch's longest caption times its size otherwise."""
    real = run = 0
    for captions in rounds:
        for start in range(0, len(captions), shard):
            text = encoder.tokenize(captions[start : start + shard])
            lengths = encoder.token_lengths(text)  # (n,)
            real += int(lengths.sum())
            for rows in caption_batches(encoder, text, lengths, batch):
                if encoder.shares_prefixes:
                    run += len(PrefixTrie.build(text[rows], lengths[rows]).first_row)
                else:
                    run += len(rows) * int(lengths[rows].max())
    n = sum(map(len, rounds))
    return round(real / n, 2), round(run / n, 2)


def profile_shard(encoder, captions: list[str], pool: TokenizerPool, out: Path, batch: int, device: torch.device) -> None:
    """One shard through the stage's path under torch.profiler: the ops by their own host time,
    and on a GPU by device time, with the share of the wall time the GPU was busy."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=activities, record_shapes=True) as prof:
        write_caption_shards(encoder, [captions], out, batch, pool)
        synchronize(device)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    print(f"# profile: {len(captions)} captions in {wall:.3f} s ({len(captions) / wall:,.0f}/s)", file=sys.stderr)
    print(events.table(sort_by="self_cpu_time_total", row_limit=20), file=sys.stderr)
    waits = {  # the stage's named waits, on the host
        e.key: e.cpu_time_total / 1e6 for e in events if e.key.startswith("embed: ") and e.device_type == DeviceType.CPU
    }
    print("# encoding thread waited: " + ", ".join(f"{k[7:]} {v:.3f} s" for k, v in sorted(waits.items())), file=sys.stderr)
    # Copies are the casts, the index tensors to the device and the results to the host: their
    # input shapes tell which is which.
    copies = sorted(
        (e for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::copy_"),
        key=lambda e: -e.self_cpu_time_total,
    )
    print("# aten::copy_ by input shapes, most host time first:", file=sys.stderr)
    for e in copies[:10]:
        print(
            f"#   {e.count:5d} x {e.input_shapes}: {e.self_cpu_time_total / 1e3:.1f} ms of host time "
            f"({e.self_cpu_time_total / e.count:.0f} us each)",
            file=sys.stderr,
        )
    if device.type == "cuda":
        # Kernels only: a launch's CPU event also carries its kernel's device time, and would count it twice.
        kernels = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6  # microseconds -> s
        print(f"# GPU busy {busy:.3f} s of {wall:.3f} s ({100 * busy / wall:.0f}%)", file=sys.stderr)
        print(events.table(sort_by="self_device_time_total", row_limit=12), file=sys.stderr)


if __name__ == "__main__":
    main()
