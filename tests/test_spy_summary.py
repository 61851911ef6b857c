"""benchmarks/spy_summary.py on a hand-written py-spy raw profile."""

from __future__ import annotations

from benchmarks.spy_summary import main, summarize, thread_name

RAW = """\
thread (10): MainThread;<module> (benchmarks/embed.py:300);write_caption_shards (tasks/embed.py:800);encode_tokens (models/text_encoder.py:230);cudaMemcpyAsync (libcudart.so) 6
thread (10): MainThread;<module> (benchmarks/embed.py:300);write_caption_shards (tasks/embed.py:800);_wait (tasks/embed.py:450);pthread_cond_wait (libc.so.6) 2
thread (10): MainThread;<module> (benchmarks/embed.py:290);naive_loop (benchmarks/embed.py:200);addmm (libtorch_cuda.so) 50
thread (11): embed-arrow_0;_bootstrap (threading.py:1002);_caption_record_batch (tasks/embed.py:640);sha256 (libcrypto.so) 3
thread (12): embed-write_0;_bootstrap (threading.py:1002);write (tasks/embed.py:425);WriteTable (libparquet.so) 1
thread (13): pt_autograd_0;_bootstrap (threading.py:1002);futex (libc.so.6) 9
thread (12): embed-write_0;_bootstrap (threading.py:1002);write (tasks/embed.py:425);0x7f3d8a0a3f16 (libc.so.6) 4
thread (12): embed-write_0;_bootstrap (threading.py:1002);write (tasks/embed.py:425);0x7f3d8a18bb75 (libc.so.6) 2
not a sample line
"""


def test_threads_leaves_and_own_frames_within_the_shard_loop():
    threads = summarize(RAW.splitlines(), "write_caption_shards", "embed-")
    assert set(threads) == {"MainThread", "embed-arrow", "embed-write"}  # the naive loop and other threads left out
    main_thread = threads["MainThread"]
    assert main_thread["leaf"].total() == main_thread["own"].total() == 8
    assert main_thread["leaf"] == {"cudaMemcpyAsync (libcudart.so)": 6, "pthread_cond_wait (libc.so.6)": 2}
    assert main_thread["own"] == {"encode_tokens (models/text_encoder.py:230)": 6, "_wait (tasks/embed.py:450)": 2}
    assert threads["embed-arrow"]["own"] == {"_caption_record_batch (tasks/embed.py:640)": 3}
    assert threads["embed-write"]["leaf"] == {"WriteTable (libparquet.so)": 1, "? (libc.so.6)": 6}  # addresses by library
    assert thread_name("thread (13): pt_autograd_0") == "pt_autograd" and thread_name("thread (13)") == "thread (13)"


def test_report_lists_the_busiest_thread_first_with_shares(tmp_path, capsys):
    raw = tmp_path / "spy.raw"
    raw.write_text(RAW)
    text = main([str(raw), "--top", "1"])
    lines = text.splitlines()
    assert lines[0] == "== MainThread: 8 samples"
    assert "75.0%  cudaMemcpyAsync (libcudart.so)" in lines[2] and "pthread_cond_wait" not in text  # --top 1
    assert text.index("== embed-write: 7 samples") < text.index("== embed-arrow: 3 samples")  # busiest first
    assert capsys.readouterr().out.strip() == text
