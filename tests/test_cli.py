"""The `t2i` command line: options reach the stage configs as given, none dropped or replaced.
The stage functions are replaced by recorders; nothing is ingested, embedded or deployed."""

from __future__ import annotations

import pytest
from conftest import plain
from typer.testing import CliRunner

import flows.deploy
import tasks.embed
import tasks.ingest
import tasks.register
from flows.cli import app


@pytest.fixture
def embed_configs(monkeypatch) -> list:
    configs: list = []
    monkeypatch.setattr(tasks.embed, "embed_from_path", lambda root, config, dask_address=None: configs.append(config) or {})
    return configs


def test_embed_allow_random_init_is_the_presets_unless_given(embed_configs):
    runner = CliRunner()
    for args in ([], ["--allow-random-init"], ["--no-allow-random-init"]):
        result = runner.invoke(app, ["embed", "some/dataset", *args])
        assert result.exit_code == 0, result.output
    assert [c.encoder["allow_random_init"] for c in embed_configs] == [True, True, False]  # cpu-demo's is true
    result = runner.invoke(app, ["embed", "d", "--no-allow-random-init", "--preset", "gpu-32px"])
    assert result.exit_code == 0 and embed_configs[-1].encoder["allow_random_init"] is False
    result = runner.invoke(app, ["embed", "d", "--preset", "gpu-32px"])
    assert result.exit_code == 0 and "allow_random_init" not in embed_configs[-1].encoder  # the encoder's default


def test_empty_options_are_passed_on_not_replaced_by_the_preset(embed_configs, monkeypatch):
    runner = CliRunner()
    for option, message in (("--model-name", "model_name must be"), ("--weights", "weights must be")):
        result = runner.invoke(app, ["embed", "d", option, ""])
        assert result.exit_code != 0 and message in result.output
    assert not embed_configs

    restored: list = []
    monkeypatch.setattr(tasks.register, "restore_champion", lambda name, version: restored.append(version) or {})
    assert runner.invoke(app, ["register", "--restore", ""]).exit_code == 0 and restored == [""]

    checked: list = []

    def no_such_pool(name):
        checked.append(name)
        raise flows.deploy.DeployError(f"work pool {name!r} not found")

    monkeypatch.setattr(flows.deploy, "require_api_url", lambda: "http://127.0.0.1:4200/api")
    monkeypatch.setattr(flows.deploy, "check_work_pool", no_such_pool)
    monkeypatch.setattr(flows.deploy, "serve_deployment", lambda spec: pytest.fail("served without a work pool"))
    result = runner.invoke(app, ["deploy", "--work-pool", ""])
    assert result.exit_code != 0 and checked == [""] and "not found" in result.output


def test_ingest_resolution_zero_is_rejected_not_replaced(monkeypatch):
    called: list = []
    monkeypatch.setattr(tasks.ingest, "ingest_dataset", lambda *a, **k: called.append(a) or {})
    result = CliRunner().invoke(app, ["ingest", "some/source", "--name", "n", "--resolution", "0"])
    assert result.exit_code != 0 and not called
    assert "resolution" in result.output and "greater than or equal to 8" in result.output


def test_weights_paths_with_quotes_reach_the_config_as_given(embed_configs):
    runner = CliRunner()
    for path in ("/models/bob's.safetensors", "/m/a''b.pt", '/m/"x".pt', "/m/😀.pt"):
        result = runner.invoke(app, ["embed", "d", "--weights", path])
        assert result.exit_code == 0, result.output
        assert embed_configs[-1].encoder["weights"] == path



def test_run_rejects_a_bad_preset_or_override_as_a_usage_error(monkeypatch):
    import flows.pipeline

    monkeypatch.setattr(flows.pipeline, "text_to_image_pipeline", lambda params: pytest.fail("the flow started"))
    runner = CliRunner()
    for args, message in (
        (["--set", "train.stepz=5"], "train.stepz"),
        (["--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
        (["--set", "train.steps"], "must look like section.key=value"),
    ):
        result = runner.invoke(app, ["run", *args])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert message in plain(result.output)


def test_a_stage_refusing_its_input_is_a_one_line_error_not_a_traceback(monkeypatch, tmp_path):
    import flows.pipeline
    from tasks.ingest import IngestError
    from tasks.register import RegisterError

    def no_version(name, version):
        raise RegisterError(f"model {name!r} has no version {version} (registered versions: none)")

    def ingest_fails(params):
        raise flows.pipeline.StageFailed("ingest", IngestError("source /nowhere does not exist"))

    monkeypatch.setattr(tasks.register, "restore_champion", no_version)
    monkeypatch.setattr(flows.pipeline, "text_to_image_pipeline", ingest_fails)
    runner = CliRunner()
    for args, message in (
        (["ingest", str(tmp_path / "nowhere"), "--name", "n"], f"source {tmp_path / 'nowhere'} does not exist"),
        (["embed", str(tmp_path)], "is not a published dataset version"),
        (["register", "--restore", "3"], "model 't2i-shapes' has no version 3"),
        (["sample", "a red circle", "--model", str(tmp_path)], "is neither a models:/ or runs:/ URI"),
        (["run"], "stage 'ingest' failed: IngestError: source /nowhere does not exist"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (args, result.exception)
        assert message in plain(result.output), result.output


def test_sample_scale_below_one_is_rejected_not_ignored(monkeypatch):
    monkeypatch.setattr(tasks.register, "sample_images", lambda *a, **k: pytest.fail("sampled"))
    for scale in ("0", "-2"):
        result = CliRunner().invoke(app, ["sample", "a red circle", "--scale", scale])
        assert result.exit_code == 2 and "--scale" in result.output


def test_register_rejects_a_run_dir_together_with_restore(monkeypatch, tmp_path):
    monkeypatch.setattr(tasks.register, "restore_champion", lambda name, version: pytest.fail("restored"))
    result = CliRunner().invoke(app, ["register", str(tmp_path), "--restore", "3"])
    assert result.exit_code == 2 and "either RUN_DIR or --restore" in plain(result.output)


def test_an_empty_deployment_name_is_rejected_not_replaced(monkeypatch):
    monkeypatch.setattr(flows.deploy, "require_api_url", lambda: "http://127.0.0.1:4200/api")
    monkeypatch.setattr(flows.deploy, "serve_deployment", lambda spec: pytest.fail(f"served {spec.name!r}"))
    result = CliRunner().invoke(app, ["deploy", "--deployment", ""])
    assert result.exit_code == 2 and "deployment name must not be empty" in plain(result.output)


def test_deploy_to_a_work_pool_pins_relative_paths_to_absolute_ones(monkeypatch, tmp_path):
    # The worker runs the flow in the checkout (PROJECT_ROOT), not where `t2i deploy` ran.
    from flows.pipeline import PipelineParams

    (tmp_path / "my-preset.yaml").write_text("train:\n  steps: 700\n")
    (tmp_path / "images").mkdir()
    monkeypatch.chdir(tmp_path)
    spec = flows.deploy.build_deployment(
        PipelineParams(preset="my-preset.yaml", source="images"), work_pool="local"
    )
    params = spec.parameters["params"]
    assert params["preset"] == str(tmp_path / "my-preset.yaml") and params["source"] == str(tmp_path / "images")
    assert spec.name == "my-preset"
    # a preset named in configs/ stays a name (prefect.yaml's parameters say `preset: cpu-demo`)
    assert flows.deploy.build_deployment(PipelineParams(), work_pool="local").parameters == {"params": {"preset": "cpu-demo"}}


def test_evaluate_never_leaves_a_half_written_report(monkeypatch, tmp_path):
    import pathlib

    import flows.cli
    import tasks.evaluate
    from tasks.contracts import EvalReport

    report = EvalReport(grid_path="g.png", metrics={"m": 1.0}, primary_metric="m", threshold=0.0, passed=True, reason="ok")
    monkeypatch.setattr(flows.cli, "load_train_result", lambda run_dir: None)
    monkeypatch.setattr(tasks.ingest, "load_dataset_version", lambda root: None)
    monkeypatch.setattr(tasks.register, "champion_metrics", lambda name: None)
    monkeypatch.setattr(tasks.evaluate, "evaluate_model", lambda *a, **k: report)
    previous = tmp_path / "eval_report.json"
    previous.write_text(report.model_copy(update={"reason": "before"}).model_dump_json())

    real_write_text = pathlib.Path.write_text

    def disk_full(self, text, *args, **kwargs):
        real_write_text(self, text[:10], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path), "d"])
    monkeypatch.undo()
    assert result.exit_code != 0
    assert EvalReport.model_validate_json(previous.read_text()).reason == "before"
    assert [p.name for p in tmp_path.iterdir()] == ["eval_report.json"]


def test_a_bad_preset_value_is_one_line_naming_the_key_and_the_value():
    result = CliRunner().invoke(app, ["shapes", "--set", "shapes.n_images=abc"])
    assert result.exit_code == 2
    message = plain(result.output)
    assert "shapes.n_images: Input should be a valid integer" in message and "(got 'abc')" in message
    assert "errors.pydantic.dev" not in message and "validation error for" not in message


def test_sample_rejects_an_output_name_without_an_image_extension_before_sampling(monkeypatch, tmp_path):
    monkeypatch.setattr(tasks.register, "sample_images", lambda *a, **k: pytest.fail("sampled before checking --out"))
    for out in ("out", "grid.txt"):
        result = CliRunner().invoke(app, ["sample", "a red circle", "--out", str(tmp_path / out)])
        assert result.exit_code == 2 and "--out" in result.output and "e.g. --out out.png" in plain(result.output)


def test_shapes_refusing_its_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["shapes", "--out", str(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert "is not empty and is not a shapes set" in plain(result.output)


def test_an_s3_data_root_without_a_bucket_is_an_error(monkeypatch, tmp_path):
    # s3:/// used to pass, as the URI "s3:" cached in the folder every bucket's cache lives in
    monkeypatch.setenv("T2I_LOCAL_DATA_ROOT", str(tmp_path / "cache"))
    for root in ("s3:///", "s3:///prefix", "s3://"):
        monkeypatch.setenv("T2I_DATA_ROOT", root)
        result = CliRunner().invoke(app, ["shapes", "--set", "shapes.n_images=10"])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (root, result.exception)
        assert "a URI data root must be s3://bucket[/prefix]" in plain(result.output)


def test_help_names_the_data_root_where_it_says_where_data_goes():
    runner = CliRunner()
    for command in ("shapes", "ingest"):
        assert "T2I_DATA_ROOT" in plain(runner.invoke(app, [command, "--help"]).output), command
