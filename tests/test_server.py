"""Deployments against a real Prefect server (`prefect server start` in a subprocess).

- `t2i deploy` serves the pipeline; a flow run created through the REST API with edited
  parameters (what the UI's Run form sends) completes and registers a model under the edited
  name; the deployment lists its cron schedule and has scheduled runs at the cron's times;
  Ctrl-C on `t2i deploy` pauses the schedule.
- `prefect deploy` (prefect.yaml) and `t2i deploy --work-pool` create the same deployment;
  `t2i deploy` refuses a missing work pool and one that is not a `process` pool.
- Without a server: prefect.yaml names the flow's entrypoint, valid parameters and the
  schedule flows/deploy.py uses; `t2i deploy` rejects a bad cron, time zone or override.

    .venv/bin/python -m pytest -q -m server tests/test_server.py
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import time
import zoneinfo
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import console_script, free_port, plain, stop_group
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from flows.deploy import (
    DEFAULT_CRON,
    DEFAULT_TIMEZONE,
    FLOW_ENTRYPOINT,
    PROJECT_ROOT,
    TAGS,
    default_deployment_name,
    deployment_parameters,
)
from flows.pipeline import PipelineParams, text_to_image_pipeline
from tasks.settings import get_settings

PREFECT_YAML = PROJECT_ROOT / "prefect.yaml"
FLOW_NAME = text_to_image_pipeline.name
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
RETRY_STATUS = {429, 502, 503}
SERVER_START_S = 120
RUN_TIMEOUT_S = 300


# --- processes ------------------------------------------------------------------------------


class Proc:
    """A subprocess in its own process group, its output in a log file; `stop` ends the group."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None):
        self.log = log
        self._out = log.open("wb")
        self.popen = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def tail(self, n: int = 60) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return f"--- last {n} lines of {self.log.name} ---\n" + "\n".join(lines[-n:])

    def interrupt(self, timeout: float) -> int | None:
        """Ctrl-C to the main process only (a graceful shutdown); its exit code, None if still running."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        stop_group(self.popen)  # the group: flow-run children and server workers too
        self._out.close()


def _without_prefect_settings(env: dict[str, str]) -> dict[str, str]:
    # A developer's PREFECT_API_URL, profile or database must not leak into the test server or clients.
    return {k: v for k, v in env.items() if not k.startswith("PREFECT_")}


class Server:
    def __init__(self, api_url: str, client_env: dict[str, str], proc: Proc):
        self.api_url = api_url
        self.client_env = client_env  # what a client process needs on top of os.environ
        self.proc = proc
        self.http = httpx.Client(base_url=api_url, timeout=30)

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        # A busy SQLite database answers 503 ("database is locked"); retry as Prefect's own client does.
        for attempt in range(8):
            r = self.http.request(method, path, **kw)
            if r.status_code not in RETRY_STATUS:
                break
            time.sleep(0.5 * 2**attempt)
        return r

    def get(self, path: str, **kw) -> httpx.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return self.request("POST", path, **kw)

    def deployment(self, name: str) -> dict:
        r = self.get(f"/deployments/name/{FLOW_NAME}/{name}")
        r.raise_for_status()
        return r.json()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    common = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    server_env = {
        **_without_prefect_settings(dict(os.environ)),
        **common,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_UI_ENABLED": "false",  # the API is all the test needs; skips building the UI's assets
    }
    proc = Proc(
        [console_script("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        server_env,
        home / "server.log",
    )
    server = Server(api_url, {**common, "PREFECT_API_URL": api_url}, proc)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.popen.poll() is not None:
                pytest.fail(f"prefect server exited with {proc.popen.returncode}\n{proc.tail()}")
            try:
                if server.http.get("/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server not healthy after {SERVER_START_S} s\n{proc.tail()}")
            time.sleep(0.5)
        yield server
    finally:
        server.http.close()
        proc.stop()


def _client_env(server: Server, **extra: str) -> dict[str, str]:
    # os.environ carries conftest's per-test T2I_DATA_ROOT and MLflow store.
    return {**_without_prefect_settings(dict(os.environ)), **server.client_env, **extra}


def _wait_for(what: str, check, timeout: float, procs: list[Proc], interval: float = 1.0):
    """Poll `check()` until it returns something truthy; fail with the logs on timeout or a dead process."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        for p in procs:
            if p.popen.poll() is not None:
                pytest.fail(f"{what}: {p.log.name} process exited with {p.popen.returncode}\n{p.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout} s\n" + "\n".join(p.tail() for p in procs))
        time.sleep(interval)



def _flow_run_logs(server: Server, flow_run_id: str, n: int = 40) -> str:
    r = server.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC"})
    if r.status_code != 200:
        return f"(flow run logs unavailable: {r.status_code})"
    return "\n".join(f"{log['level']:>3} {log['message']}" for log in r.json()[-n:])


# --- the served deployment, a run from the API ----------------------------------------------


@pytest.fixture
def tiny_clip_everywhere(tiny_clip, tmp_path) -> dict[str, str]:
    """PYTHONPATH for child processes that registers the tiny open_clip architecture at start-up.

    `open_clip.add_model_config` lasts one process; served flow runs are spawned, fresh
    interpreters, so each one must register the test config itself (via sitecustomize).
    """
    import open_clip

    cfg_dir = tmp_path / "open_clip_cfg"
    cfg_dir.mkdir()
    (cfg_dir / f"{tiny_clip}.json").write_text(json.dumps(open_clip.get_model_config(tiny_clip)))
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "sitecustomize.py").write_text(
        "# written by tests/test_server.py: the tiny open_clip test architecture in every process\n"
        f"import open_clip\nopen_clip.add_model_config({str(cfg_dir)!r})\n"
    )
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(site_dir), os.environ.get("PYTHONPATH")) if p)}


@pytest.mark.server
@pytest.mark.slow
def test_served_deployment_runs_a_flow_run_created_through_the_api(
    prefect_server, tiny_pipeline_params, tiny_clip_everywhere, tmp_path
):
    server = prefect_server
    tiny = tiny_pipeline_params  # conftest: the end-to-end flow test's toy-size run
    cron, tz = "0 4 * * 1", "Europe/Berlin"  # not the defaults, so the options are seen to arrive
    cmd = [console_script("t2i"), "deploy", "--preset", tiny.preset, "--deployment", "e2e-served",
           "--cron", cron, "--timezone", tz]
    for override in tiny.overrides:
        cmd += ["--set", override]
    serve = Proc(
        cmd,
        _client_env(server, PREFECT_RUNNER_POLL_FREQUENCY="2", **tiny_clip_everywhere),
        tmp_path / "serve.log",
    )
    procs = [serve, server.proc]
    try:
        # the deployment, as `t2i deploy` created it
        def deployment_created():
            r = server.get(f"/deployments/name/{FLOW_NAME}/e2e-served")
            return r.json() if r.status_code == 200 else None

        dep = _wait_for("deployment e2e-served created", deployment_created, 120, procs)
        assert dep["parameters"] == {"params": {"preset": "cpu-demo", "overrides": tiny.overrides}}
        assert dep["tags"] == TAGS and dep["work_pool_name"] is None and dep["paused"] is False
        assert [(s["schedule"]["cron"], s["schedule"]["timezone"], s["active"]) for s in dep["schedules"]] == [
            (cron, tz, True)
        ]
        # what the UI's Run form does: start from the deployment's parameters, edit one, submit
        run_params = {"params": {**dep["parameters"]["params"], "model_name": "t2i-served"}}
        r = server.post(f"/deployments/{dep['id']}/create_flow_run", json={"parameters": run_params})
        assert r.status_code == 201, f"{r.status_code} {r.text}\n{server.proc.tail(30)}"
        flow_run_id = r.json()["id"]

        # the server's scheduler service (every few seconds for new deployments) schedules the
        # coming runs at the cron's times: Mondays 04:00 in Berlin
        def scheduled_runs():
            r = server.post("/flow_runs/filter", json={
                "flow_runs": {"deployment_id": {"any_": [dep["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}},
                "sort": "EXPECTED_START_TIME_ASC",
            })
            r.raise_for_status()
            return [run for run in r.json() if run["id"] != flow_run_id]

        runs = _wait_for("scheduled runs of e2e-served", scheduled_runs, 90, procs, interval=2)
        berlin = zoneinfo.ZoneInfo(tz)
        starts = [dt.datetime.fromisoformat(run["expected_start_time"]).astimezone(berlin) for run in runs]
        now = dt.datetime.now(dt.timezone.utc)
        assert all(s > now and (s.weekday(), s.hour, s.minute) == (0, 4, 0) for s in starts), starts

        def finished():
            run = server.get(f"/flow_runs/{flow_run_id}").json()
            return run if run["state_type"] in TERMINAL else None

        run = _wait_for(f"flow run {flow_run_id} finished", finished, RUN_TIMEOUT_S, procs, interval=2)
        if run["state_type"] != "COMPLETED":
            pytest.fail(
                f"flow run ended {run['state_type']}: {run['state']['message']}\n"
                f"--- flow run logs ---\n{_flow_run_logs(server, flow_run_id)}\n{serve.tail()}\n{server.proc.tail(30)}"
            )
        assert run["deployment_id"] == dep["id"] and run["parameters"] == run_params

        # the edited model name reached the registry, with this flow run's id on the version
        uri = get_settings().mlflow_tracking_uri
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # not MLflow's process-wide registry URI
        assert [m.name for m in client.search_registered_models()] == ["t2i-served"]
        version = client.get_model_version_by_alias("t2i-served", "candidate")
        assert version.tags["prefect_flow_run_id"] == flow_run_id

        # Ctrl-C stops serving and pauses the schedule, so no runs wait for a server that is gone
        code = serve.interrupt(timeout=60)
        assert code == 0, f"t2i deploy after SIGINT: exit code {code} (None: still running)\n{serve.tail()}"
        assert server.deployment("e2e-served")["paused"] is True, serve.tail()
    finally:
        serve.stop()


# --- prefect.yaml and `t2i deploy --work-pool` ----------------------------------------------


@pytest.mark.server
@pytest.mark.slow
def test_prefect_deploy_and_t2i_deploy_to_a_work_pool_agree(prefect_server, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    server = prefect_server
    pools = [
        {"name": "local", "type": "process", "base_job_template": ProcessWorker.get_default_base_job_template()},
        {"name": "k8s", "type": "kubernetes"},
    ]
    for pool in pools:
        r = server.post("/work_pools/", json=pool)
        assert r.status_code == 201, r.text

    # `prefect deploy` reads prefect.yaml in the repository root ...
    prefect_deploy = Proc(
        [console_script("prefect"), "--no-prompt", "deploy", "--name", "cpu-demo"],
        _client_env(server),
        tmp_path / "prefect-deploy.log",
        cwd=PROJECT_ROOT,
    )
    try:
        # ... while `t2i deploy` runs here, from another directory: it must still point at this checkout
        monkeypatch.chdir(tmp_path)
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            ok = CliRunner().invoke(app, ["deploy", "--work-pool", "local", "--deployment", "from-t2i"])
            # --no-schedule, as --help says, also takes the schedule off an existing deployment
            scheduled = CliRunner().invoke(app, ["deploy", "--work-pool", "local", "-d", "manual"])
            assert len(server.deployment("manual")["schedules"]) == 1, scheduled.output
            unscheduled = CliRunner().invoke(app, ["deploy", "--work-pool", "local", "-d", "manual", "--no-schedule"])
            missing = CliRunner().invoke(app, ["deploy", "--work-pool", "nope"])
            wrong_type = CliRunner().invoke(app, ["deploy", "--work-pool", "k8s"])
        for result in (ok, scheduled, unscheduled):
            assert result.exit_code == 0, result.output
        assert missing.exit_code == 2 and "prefect work-pool create nope --type process" in plain(missing.output)
        assert wrong_type.exit_code == 2 and "'k8s' is a 'kubernetes' pool" in plain(wrong_type.output)
        try:
            code = prefect_deploy.popen.wait(180)
        except subprocess.TimeoutExpired:
            pytest.fail(f"prefect deploy still running after 180 s\n{prefect_deploy.tail()}")
        assert code == 0, prefect_deploy.tail()
    finally:
        prefect_deploy.stop()

    ours, theirs = server.deployment("from-t2i"), server.deployment("cpu-demo")
    same = ("entrypoint", "pull_steps", "work_pool_name", "parameters", "tags", "parameter_openapi_schema",
            "enforce_parameter_schema", "job_variables")
    assert {k: ours[k] for k in same} == {k: theirs[k] for k in same}
    schedules = [[(s["schedule"], s["active"]) for s in d["schedules"]] for d in (ours, theirs)]
    weekly = {"cron": DEFAULT_CRON, "timezone": DEFAULT_TIMEZONE, "day_or": True}
    assert schedules[0] == schedules[1] == [(weekly, True)]
    assert ours["entrypoint"] == FLOW_ENTRYPOINT and ours["work_pool_name"] == "local"
    assert ours["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(PROJECT_ROOT)}}
    ]
    manual = server.deployment("manual")
    assert manual["schedules"] == [] and manual["parameters"] == ours["parameters"]


# --- without a server -----------------------------------------------------------------------


def test_prefect_yaml_describes_the_t2i_deploy_default():
    from prefect.flows import load_flow_from_entrypoint

    doc = yaml.safe_load(PREFECT_YAML.read_text())
    (dep,) = doc["deployments"]
    # the entrypoint is a file in the repository and names the pipeline flow
    assert dep["entrypoint"] == FLOW_ENTRYPOINT
    assert (PROJECT_ROOT / FLOW_ENTRYPOINT.partition(":")[0]).is_file()
    assert load_flow_from_entrypoint(str(PROJECT_ROOT / dep["entrypoint"])).name == FLOW_NAME

    # valid parameters: the flow accepts them and they make a valid preset
    text_to_image_pipeline.validate_parameters(dep["parameters"])
    PipelineParams.model_validate(dep["parameters"]["params"]).to_preset()

    # the same deployment `t2i deploy --work-pool` makes for the default preset
    params = PipelineParams()
    assert dep["name"] == default_deployment_name(params) == "cpu-demo"
    assert dep["parameters"] == deployment_parameters(params)
    assert dep["tags"] == TAGS
    assert dep["schedules"] == [{"cron": DEFAULT_CRON, "timezone": DEFAULT_TIMEZONE, "active": True}]
    assert dep["work_pool"]["name"]
    assert "pull" not in doc and "pull" not in dep  # so `prefect deploy` sets the working directory to the checkout

    # and the CLI's defaults are the module's
    import typer.main

    options = {p.name: p.default for p in typer.main.get_command(app).commands["deploy"].params}
    assert options["cron"] == DEFAULT_CRON and options["timezone"] == DEFAULT_TIMEZONE
    assert options["preset"] == params.preset and options["name"] == params.dataset_name


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cron", "every sunday"], "invalid cron expression 'every sunday'"),
        (["--timezone", "Mars/Olympus"], "unknown time zone 'Mars/Olympus'"),
        (["--set", "train.stepz=5"], "train.stepz"),
        (["--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
    ],
)
def test_deploy_rejects_bad_input_before_contacting_prefect(args, message):
    # each fails on its input with its own message, before the command asks Prefect anything
    result = CliRunner().invoke(app, ["deploy", *args])
    assert result.exit_code == 2, result.output
    assert message in plain(result.output)
