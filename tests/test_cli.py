"""The `t2i` command line: options reach the stage configs as given, none dropped or replaced.
The stage functions are replaced by recorders; nothing is ingested, embedded or deployed."""

from __future__ import annotations

import pytest
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
