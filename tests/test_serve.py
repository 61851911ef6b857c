"""Pulling a registered model back out: pyfunc by alias, `sample_images`, `mlflow models serve`,
request validation and refusal of tampered weights."""

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # mlflow reads DO_NOT_TRACK only as "true"

import base64  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.parse  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from PIL import Image  # noqa: E402

from models.checkpoint import UnsafeCheckpointError  # noqa: E402
from models.mlflow_model import InvalidRequestError, parse_requests  # noqa: E402
from models.pipeline import TextToImage  # noqa: E402
from models.schedule import NoiseSchedule, ScheduleConfig  # noqa: E402
from models.text_encoder import TextEncoder, TextEncoderConfig  # noqa: E402
from models.unet import UNet, UNetConfig  # noqa: E402
from tasks.contracts import EvalReport, TrainResult  # noqa: E402
from tasks.register import RegisterConfig, register_model, sample_images  # noqa: E402
from tasks.settings import get_settings  # noqa: E402

NAME = "t2i-serve-test"
CHAMPION_URI = f"models:/{NAME}@champion"
PROMPTS = ["a red circle in the top left", "a blue square"]
RESOLUTION = 8

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # tiny tensors: threads cost more than they save


def _register(root: Path, tiny_clip: str) -> TrainResult:
    """A tiny trained model, registered as the champion of NAME in the store the settings name."""
    torch.manual_seed(0)
    encoder = TextEncoder(TextEncoderConfig(model_name=tiny_clip, allow_random_init=True, random_init_seed=3))
    unet = UNet(UNetConfig(channels=(16, 32), attention_levels=(False, True), layers_per_block=1, head_dim=8,
                           norm_groups=8, context_dim=encoder.width))
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe = TextToImage(unet, NoiseSchedule(ScheduleConfig(num_train_timesteps=100)), encoder, RESOLUTION,
                       extra={"step": 10, "dataset": "shapes@abc123"})
    pipe.save(root / "run" / "model")
    train = TrainResult(run_dir=str(root / "run"), checkpoint=str(root / "run" / "model"), step=10)
    report = EvalReport(grid_path="grid.png", metrics={"clip_score": 0.3}, primary_metric="clip_score",
                        threshold=0.1, passed=True, reason="test")
    assert "champion" in register_model(train, report, RegisterConfig(model_name=NAME)).aliases
    return train


def _store_env(root: Path) -> dict[str, str]:
    return {"T2I_MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
            "T2I_MLFLOW_ARTIFACT_ROOT": str(root / "mlartifacts"), "T2I_DATA_ROOT": str(root / "data")}


def _use_store(env: dict[str, str], monkeypatch) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(env["T2I_MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(env["T2I_MLFLOW_TRACKING_URI"])


@pytest.fixture(scope="module")
def _shared_store(tmp_path_factory, tiny_clip) -> tuple[dict[str, str], TrainResult]:
    """One registration for the read-only tests (a fresh SQLite store costs seconds of migrations)."""
    root = tmp_path_factory.mktemp("store")
    env = _store_env(root)
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        _use_store(env, mp)
        torch.set_num_threads(1)
        try:
            train = _register(root, tiny_clip)
        finally:
            torch.set_num_threads(threads)
    return env, train


@pytest.fixture
def registered(_shared_store, monkeypatch) -> TrainResult:
    """The shared store's champion; tests using it must not change the store."""
    env, train = _shared_store
    _use_store(env, monkeypatch)
    return train


def _request(prompts, seeds, steps=4) -> pd.DataFrame:
    return pd.DataFrame({"prompt": prompts, "seed": seeds, "steps": [steps] * len(prompts)})


def _pixels(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG" and image.size == (RESOLUTION, RESOLUTION) and image.mode == "RGB"
    return np.asarray(image)


def test_load_by_alias_generate_and_sample_images(registered):
    model = mlflow.pyfunc.load_model(CHAMPION_URI)
    out = model.predict(_request(PROMPTS, [5, 6]))
    assert len(out) == 2
    again = model.predict(_request(PROMPTS, [5, 6]))
    assert out == again  # same seed, identical PNG bytes
    assert out[0] != out[1]
    # An image depends on its own row only: batch composition and param grouping change nothing.
    alone = model.predict(_request(PROMPTS[1:], [6]))
    assert np.array_equal(_pixels(alone[0]), _pixels(out[1]))

    # The CLI's path: prompt i from seed + i, from a models:/ URI, a runs:/ URI or the saved dir.
    from_registry = sample_images(CHAMPION_URI, PROMPTS, seed=5, steps=4)
    from_dir = sample_images(registered.checkpoint, PROMPTS, seed=5, steps=4)
    uri = get_settings().mlflow_tracking_uri
    run_id = MlflowClient(uri, registry_uri=uri).get_model_version(NAME, "1").run_id
    from_run = sample_images(f"runs:/{run_id}/model", PROMPTS[:1], seed=5, steps=4)
    for i, b64 in enumerate(out):
        assert np.array_equal(np.asarray(from_registry[i]), _pixels(b64))
        assert np.array_equal(np.asarray(from_dir[i]), _pixels(b64))
    assert np.array_equal(np.asarray(from_run[0]), _pixels(out[0]))

    with pytest.raises(MlflowException, match="unknown sampler"):
        model.predict(pd.DataFrame({"prompt": ["x"], "sampler": ["euler"]}))
    # Steps this model's schedule cannot take (DPM-Solver++ needs fewer than its T): refused, before any image.
    T = model.unwrap_python_model().pipe.schedule.num_train_timesteps
    with pytest.raises(MlflowException, match=rf"row 1: num_inference_steps must be an integer in \[1, {T - 1}\]"):
        model.predict(pd.DataFrame({"prompt": ["x", "y"], "steps": [4, T], "sampler": ["ddim", "dpmpp_2m"]}))


@pytest.mark.parametrize(
    "rows, match",
    [
        ({"prompt": ["x"], "sampler": ["euler"]}, "row 0: unknown sampler 'euler'"),
        ({"prompt": ["x", "y"], "steps": [4, 0]}, r"row 1: steps must be an integer in \[1, 1000\]"),
        ({"prompt": ["x"], "steps": [2.5]}, "row 0: steps must be an integer, got 2.5"),
        ({"prompt": ["x"], "seed": [-1]}, "seed must be in"),
        ({"prompt": ["x"], "guidance_scale": [float("inf")]}, "guidance_scale"),
        ({"prompt": ["x"], "guidance": [3.0]}, "unknown columns \\['guidance'\\]"),
        ({"prompt": [None]}, "prompt must be a string"),
        # A gap makes the column float, which cannot hold every integer past 2**53: refused, not rounded.
        ({"prompt": ["x", "y"], "seed": [2**60 + 1, None]}, r"row 0: seed 1.152921504606847e\+18 .* beyond 2\*\*53"),
        ({"seed": [1]}, "needs a `prompt` column"),
    ],
)
def test_bad_requests_are_clear_errors(rows, match):
    with pytest.raises(InvalidRequestError, match=match):
        parse_requests(pd.DataFrame(rows))


def test_request_defaults():
    rows = parse_requests(pd.DataFrame({"prompt": ["a", "b"], "seed": [7.0, float("nan")]}))
    assert [(r.prompt, r.seed) for r in rows] == [("a", 7), ("b", 1)]  # missing seed: the row's position
    assert rows[0].params.steps == 50 and rows[0].params.sampler == "ddim" and rows[0].params.guidance_scale == 3.0


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_tampered_weights_in_the_registry_are_refused(tmp_path, tiny_clip, monkeypatch):
    _use_store(_store_env(tmp_path), monkeypatch)  # a store of its own: this test breaks it
    _register(tmp_path, tiny_clip)
    uri = get_settings().mlflow_tracking_uri
    client = MlflowClient(uri, registry_uri=uri)
    model_id = client.get_model_version(NAME, "1").source.removeprefix("models:/")
    # The store's own copy (a local file store here), not a download of it.
    stored = Path(urllib.parse.urlparse(client.get_logged_model(model_id).artifact_location).path)
    unet = stored / "artifacts" / "unet.safetensors"
    assert unet.is_file()
    marker = tmp_path / "pwned"
    unet.write_bytes(pickle.dumps({"w": _Payload(marker)}))

    with pytest.raises(UnsafeCheckpointError, match="safetensors"):
        sample_images(CHAMPION_URI, PROMPTS[:1], steps=2)
    with pytest.raises(Exception, match="safetensors") as info:
        mlflow.pyfunc.load_model(CHAMPION_URI)
    assert "UnsafeCheckpointError" in repr(info.value) or isinstance(info.value, UnsafeCheckpointError)
    assert not marker.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict, timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_mlflow_models_serve(registered, tmp_path):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    uri = get_settings().mlflow_tracking_uri
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": "",
           # mlflow execs `uvicorn` by name: the venv's bin must be on PATH even when it is not activated.
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    log_path = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", CHAMPION_URI, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with open(log_path, "wb") as log:
        # Its own session (process group), so the finally below ends the server and its workers only.
        server = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up after 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)

        records = [{"prompt": p, "seed": 0, "steps": 4} for p in PROMPTS]
        status, body = _post(f"{base}/invocations", {"dataframe_records": records})
        assert status == 200, body
        pngs = body["predictions"]
        assert len(pngs) == 2
        images = [_pixels(b) for b in pngs]  # decodes, and checks PNG at the trained resolution
        assert not np.array_equal(images[0], images[1])
        status, again = _post(f"{base}/invocations", {"dataframe_records": records})
        assert again["predictions"] == pngs  # same seed, identical bytes

        # The server's answer is the in-process model's answer.
        local = mlflow.pyfunc.load_model(CHAMPION_URI).predict(pd.DataFrame(records))
        assert [np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(local, pngs)] == [True, True]

        status, error = _post(f"{base}/invocations", {"dataframe_records": [{"prompt": "x", "sampler": "euler"}]})
        assert status == 400 and "unknown sampler" in error["message"]
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
