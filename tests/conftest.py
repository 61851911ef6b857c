import contextlib
import os
import signal
import subprocess
import time
import urllib.request

# Offline everywhere: no telemetry, no hub downloads.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path, monkeypatch):
    """Every test gets its own data root and MLflow store."""
    monkeypatch.setenv("T2I_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("T2I_MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("T2I_MLFLOW_ARTIFACT_ROOT", str(tmp_path / "mlartifacts"))


TINY_CLIP_NAME = "t2i-test-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """Register a tiny open_clip architecture (32-wide, 2 text layers) and return its name."""
    import json

    import open_clip

    cfg_dir = tmp_path_factory.mktemp("open_clip_cfg")
    (cfg_dir / f"{TINY_CLIP_NAME}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(cfg_dir)
    return TINY_CLIP_NAME


@pytest.fixture
def cpu_graphs(monkeypatch):
    """`cpu_graphs()`: every TextEncoder with `cuda_graphs` on then runs its prefix path through a
    `GraphCache` on the CPU, the GPU's static buffers replayed eagerly (`run_eagerly`);
    `cpu_graphs(failing=True)`: each capture fails, as one of an op that cannot be captured does."""
    from models.graphs import GraphCache, run_eagerly
    from models.text_encoder import TextEncoder

    def failing_capture(fn, device, pool, stream):
        raise RuntimeError("operation not permitted when stream is capturing")

    def use(failing: bool = False) -> None:
        capture = failing_capture if failing else run_eagerly

        def graph_cache(self, device):
            if self.cuda_graphs and self._graphs is None:
                self._graphs = GraphCache(device, capture=capture)
            return self._graphs if self.cuda_graphs else None

        monkeypatch.setattr(TextEncoder, "_graph_cache", graph_cache)

    return use


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect API (its own SQLite database) shared by the flow tests of a session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def tiny_pipeline_params(tiny_clip):
    """PipelineParams for the whole flow at toy size: 120 shapes at 8 px, 6 training steps
    (checkpoints at 3 and 6), a 2-step evaluation; gate threshold 0, so the model becomes champion."""
    from flows.pipeline import PipelineParams

    return PipelineParams(
        preset="cpu-demo",
        model_name="t2i-e2e",
        overrides=[
            "shapes.n_images=120",
            "shapes.resolution=16",
            "ingest.resolution=8",
            f"embed.encoder.model_name={tiny_clip}",
            "embed.encoder.allow_random_init=true",
            "embed.batch_size=64",
            "train.steps=6",
            "train.batch_size=8",
            "train.warmup_steps=1",
            "train.unet={channels: [16, 32], attention_levels: [false, true], layers_per_block: 1, norm_groups: 8, head_dim: 8}",
            "train.checkpoint_every=3",
            "train.sample_every=0",
            "train.sample_captions=2",
            "train.sample_steps=2",
            "evaluate.steps=2",
            "evaluate.seeds=[0]",
            "evaluate.n_val_captions=1",
            "evaluate.n_attribute_prompts=4",
            "evaluate.n_fd_samples=4",
            "evaluate.steps_table=false",
            "evaluate.threshold=0.0",
        ],
    )


# --- a private PostgreSQL cluster for the integration tests (tests/test_integration_pg.py) ------


def plain(text: str) -> str:
    """A CLI error message as one line: the words of a rich-boxed, wrapped error."""
    return " ".join(text.replace("│", " ").split())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bindir():
    """The directory holding initdb, pg_ctl and postgres: $T2I_TEST_PG_BINDIR, the PATH, or
    Debian's /usr/lib/postgresql/<major>/bin (not on the PATH), newest major first; else None."""
    import shutil
    from pathlib import Path

    candidates = [Path(os.environ["T2I_TEST_PG_BINDIR"])] if os.environ.get("T2I_TEST_PG_BINDIR") else []
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).resolve().parent)
    debian = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(debian, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


class PostgresCluster:
    """A running throw-away cluster: connection details and URLs of its databases."""

    def __init__(self, port: int, user: str, password: str):
        self.host, self.port, self.user, self.password = "127.0.0.1", port, user, password

    def url(self, database: str, driver: str = "postgresql", with_password: bool = True) -> str:
        auth = f"{self.user}:{self.password}" if with_password else self.user
        return f"{driver}://{auth}@{self.host}:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password, dbname=database)


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL cluster on 127.0.0.1 and a free port, with the databases `mlflow` and
    `prefect`, in a temporary directory removed afterwards.

    Skips when no PostgreSQL server binaries are installed (`.ci/run` installs them). initdb and
    postgres refuse to run as root, so under root they run as the `postgres` account, on a
    directory it owns. Password authentication (a random password, made now) even on 127.0.0.1:
    other local users cannot get in.
    """
    import pwd
    import secrets
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on the PATH, in "
            "/usr/lib/postgresql/*/bin or in $T2I_TEST_PG_BINDIR: apt-get install postgresql"
        )
    run_as: dict = {}
    # Not pytest's tmp_path: its tree is private to root (0700), where the postgres account cannot enter.
    root = Path(tempfile.mkdtemp(prefix="t2i-pg-"))
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.fail("running as root needs a `postgres` account to run PostgreSQL as (Debian's package creates it)")
        os.chown(root, account.pw_uid, account.pw_gid)
        run_as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}

    def run(*args: str) -> None:
        out = subprocess.run([str(bindir / args[0]), *args[1:]], cwd=root, capture_output=True, text=True, timeout=120,
                             **run_as)  # fmt: skip
        if out.returncode != 0:
            log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({out.returncode}):\n{out.stdout}{out.stderr}{log[-4000:]}")

    user, password, port = "t2i", secrets.token_urlsafe(24), free_port()
    pwfile = root / "pwfile"
    pwfile.write_text(password + "\n")
    if run_as:
        os.chown(pwfile, run_as["user"], run_as["group"])
    pwfile.chmod(0o600)
    data = root / "data"
    try:
        run("initdb", "-D", str(data), "-U", user, f"--pwfile={pwfile}", "--auth=scram-sha-256",
            "-E", "UTF8", "--locale=C", "--no-sync")  # fmt: skip
        pwfile.unlink()
        # durability off: a test cluster is thrown away, and fsyncs are most of its write time
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")  # fmt: skip
        run("pg_ctl", "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w", "-t", "60", "start")
        try:
            cluster = PostgresCluster(port, user, password)
            con = cluster.connect()
            con.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with con.cursor() as cur:
                for database in ("mlflow", "prefect"):
                    cur.execute(f"CREATE DATABASE {database}")
            con.close()
            yield cluster
        finally:
            run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def console_script(name: str) -> str:
    """A command this project's environment installs (mlflow, prefect, t2i): next to the running
    Python first (the venv's bin), else on the PATH."""
    import shutil
    import sys
    from pathlib import Path

    path = Path(sys.executable).parent / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found next to {sys.executable} or on the PATH: install the project (`make install`)")
    return found


def python_without(modules: tuple[str, ...], code: str) -> None:
    """Run `code` in a fresh Python at the repository root where importing any of `modules`
    raises ImportError (as on a machine without them); fail the test with its stderr if it fails."""
    import sys
    from pathlib import Path

    block = f"import sys\nfor name in {tuple(modules)!r}:\n    sys.modules[name] = None\n"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", block + code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture
def one_cpu_thread():
    """One intra-op thread for the test: with tiny tensors on a shared 2-core box a second thread
    mostly spins (seen 50x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def dask_cluster():
    """A real Dask `LocalCluster` (two worker processes on 127.0.0.1) standing in for a remote one."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        yield cluster


# --- servers the tests start (MLflow, Prefect, moto) ----------------------------------------------


@contextlib.contextmanager
def running_server(cmd: list[str], env: dict[str, str] | None, health_url: str, workdir, timeout_s: float = 180):
    """Run the server `cmd` in its own process group, output in `workdir`/server.log, until the
    block ends (then stop the group); wait for `health_url` to answer 200 first. Yields the log path."""
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
                try:
                    with urllib.request.urlopen(health_url, timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{health_url} not healthy after {timeout_s} s:\n{log_path.read_text()[-4000:]}")
                time.sleep(0.5)
            yield log_path
        finally:
            stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group `proc` leads (a server and the workers it started); SIGKILL after 30 s."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
