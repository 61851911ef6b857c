"""benchmarks/quality.py: the budget fit and the target check (the run itself is the tiny pipeline
that test_pipeline.py already covers), that every stage module it imports loads without
Prefect and MLflow, as on the GPU box, and tiny runs of benchmarks/embed.py and sample.py."""

import json

import pytest
from conftest import python_without

from benchmarks.quality import check_targets, fit_steps, json_line
from tasks.presets import load_preset


def test_fit_steps_fills_the_budget_and_clamps_the_cadence():
    config = load_preset("gpu-32px").train
    fitted = fit_steps(config, seconds=100, images_per_s=2560)  # 256000 images = 1000 steps of 256
    assert fitted.steps == 1000
    assert fitted.warmup_steps == min(config.warmup_steps, 100)
    assert fitted.checkpoint_every <= 500 and fitted.sample_every <= 1000
    assert fitted.lr == config.lr and fitted.ema_decay == config.ema_decay
    assert fit_steps(config, seconds=1, images_per_s=1).steps == 1


def test_json_line_writes_non_finite_numbers_as_null():
    line = json_line({"metrics": {"fd_clip": float("nan"), "attr_accuracy": 0.5}, "train": [float("inf"), 1]})
    assert json.loads(line) == {"metrics": {"fd_clip": None, "attr_accuracy": 0.5}, "train": [None, 1]}
    assert "NaN" not in line and "Infinity" not in line


def test_check_targets_marks_each_target():
    metrics = {
        "attr_colour_acc": 0.97, "attr_shape_acc": 0.85, "attr_position_acc": 0.9, "heldout_accuracy": 0.8,
        "acc_ddpm_1000": 0.90, "acc_ddim_50": 0.86, "images_per_s_ddpm_1000": 10.0, "images_per_s_ddim_50": 190.0,
    }  # fmt: skip
    targets = check_targets(metrics)
    assert targets["attr_colour_acc"]["met"] and not targets["attr_shape_acc"]["met"]
    assert targets["attr_position_acc"]["met"] and targets["heldout_accuracy"]["met"]
    gap = targets["ddim50_vs_ddpm1000"]
    assert gap["gap_points"] == 4.0 and gap["speedup"] == 19.0 and not gap["met"]
    assert check_targets({"acc_ddpm_1000": 0.9, "acc_ddim_50": 0.88, "images_per_s_ddpm_1000": 1.0,
                          "images_per_s_ddim_50": 20.0})["ddim50_vs_ddpm1000"]["met"]
    assert check_targets({})["attr_colour_acc"]["met"] is None


def test_stage_modules_and_presets_load_without_prefect_or_mlflow():
    python_without(
        ("prefect", "mlflow", "dask", "distributed", "boto3"),
        "import benchmarks.quality, benchmarks.train, benchmarks.embed, benchmarks.sample, benchmarks.host_copies\n"
        "import tasks.shapes, tasks.ingest, tasks.embed, tasks.train, tasks.evaluate\n"
        "from tasks.presets import load_preset\n"
        "load_preset('gpu-32px')\n",
    )


def test_embed_benchmark_runs_on_given_captions(tiny_clip, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.embed import main as embed_benchmark

    captions = [f"a {c} {s} in the {p}" for c in ("red", "blue", "green") for s in ("circle", "square") for p in ("top", "centre")]
    (tmp_path / "part").mkdir()
    pq.write_table(pa.table({"caption": captions + [None, captions[0]]}), tmp_path / "part" / "a.parquet")
    args = ["--model", tiny_clip, "--device", "cpu", "--batch", "4", "--naive-captions", "2", "--captions", "100"]
    out = embed_benchmark([*args, "--tokenize-captions", "30", "--captions-from", str(tmp_path)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    assert out["captions"] == len(captions) - 4 - 2  # the distinct ones past the warm-up and the naive loop
    assert out["shares_prefixes"] and out["speedup"] > 0 and out["single_captions_per_s"] > 0
    assert out["shared_vs_padded_rel_error"] < 1e-5  # fp32 on the CPU: rounding only
    # "a {colour}" prefixes are shared within a batch: fewer positions run than real tokens.
    assert out["tower_tokens_per_caption"] < out["mean_tokens"] == 8.0
    with pytest.raises(SystemExit, match="distinct captions"):
        embed_benchmark([*args, "--batch", "12", "--captions-from", str(tmp_path)])


def test_embed_benchmark_times_both_graph_settings(tiny_clip, capsys, cpu_graphs):
    from benchmarks.embed import main as embed_benchmark

    args = ["--model", tiny_clip, "--device", "cpu", "--batch", "8", "--naive-captions", "2", "--captions", "40",
            "--tokenize-captions", "10", "--cuda-graphs", "both"]  # fmt: skip
    with pytest.raises(SystemExit, match="need a CUDA device"):
        embed_benchmark(args)

    cpu_graphs()
    out = embed_benchmark(args)
    assert out["cuda_graphs"] == [False, True] and out["graphs_captions_per_s"] > 0 and out["graphs_vs_eager"] > 0
    assert [len(r) for r in out["rounds_captions_per_s"].values()] == [2, 2]
    assert out["graphs_vs_padded_rel_error"] < 1e-5 and out["graph_captures"] >= 1 and out["graphs_error"] is None

    cpu_graphs(failing=True)
    out = embed_benchmark(args)  # graphs that fail: the eager figures, and why there are no others
    assert out["cuda_graphs"] == [False] and "graphs_captions_per_s" not in out and out["batched_captions_per_s"] > 0
    assert list(out["rounds_captions_per_s"]) == ["graphs_off"]
    assert "capture failed: operation not permitted" in out["graphs_error"]
    with pytest.raises(SystemExit, match="--cuda-graphs on: CUDA graphs failed: graph"):
        embed_benchmark([*args[:-1], "on"])


def test_sample_benchmark_times_each_steps_table_row(tiny_clip, capsys):
    from benchmarks.sample import main as sample_benchmark

    sets = [f"embed.encoder.model_name={tiny_clip}", "train.unet.channels=[8,16]", "train.unet.attention_levels=[false,true]",
            "train.unet.norm_groups=4", "train.unet.head_dim=8", "evaluate.batch_size=2", "evaluate.steps_table_runs=[[ddpm,100],[ddim,10],[dpmpp_2m,4]]"]
    out = sample_benchmark(["--preset", "cpu-demo", "--prompts", "3", "--no-progress", *[a for s in sets for a in ("--set", s)]])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    assert [r["tag"] for r in out["rows"]] == ["ddpm_100", "ddim_10", "dpmpp_4"]
    assert out["resolution"] == 16 and out["prompts"] == 3 and out["precision"] == "fp32"  # cpu-demo's ingest size, CPU
    assert all(r["images_per_s"] > 0 for r in out["rows"]) and out["rows"][0]["speedup_over_first"] == 1.0
    assert "target" not in out  # the DDIM-50 vs DDPM-1000 target only where both rows ran
