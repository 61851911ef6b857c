"""The MLflow pyfunc form of `TextToImage`: what the registry stores and `mlflow models serve` runs.

A registered version carries, as named MLflow artifacts (see `ARTIFACT_FILES`):

    unet              unet.safetensors              EMA UNet weights
    model_config      model_config.json             rebuilds UNet, schedule and text encoder (TextToImage's config;
                                                    for a seeded random encoder also its seed and fingerprint)
    text_encoder      text_encoder.safetensors      the encoder's weights (absent for a seeded random encoder)
    open_clip_config  open_clip_config.json         the encoder's identity: open_clip model name and architecture,
                                                    so a server needs no custom config registered beforehand
    uncond_embedding  uncond_embedding.safetensors  the empty caption's token states; loading checks that the
                                                    rebuilt encoder reproduces them

plus this `models` package as code, and is logged "from code" (`write_model_code`), so no pickle is
ever loaded: weights go through safetensors only, configs through JSON.

Request: a DataFrame, one row per image, with `prompt` (str) and optional `seed` (int, default the
row's position), `steps` (int), `guidance_scale` (float), `sampler` (str). An optional column, once
given, needs a value in every row: the signature types `seed` and `steps` as integers, which a
gap cannot be. Over HTTP, MLflow's server first casts each column to its signature type (pandas
`astype`), so there a fractional `seed` or `steps` arrives truncated; in process it is an error.
MLflow drops request `params` with a warning (the signature declares none): put them in the rows.
Response: one base64 PNG string per row. Served over HTTP:

    curl -s http://127.0.0.1:5000/invocations -H 'Content-Type: application/json' \
         -d '{"dataframe_records": [{"prompt": "a red circle in the top left", "seed": 0}]}'
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import ColSpec, Schema
from PIL import Image

from models.checkpoint import load_weights, save_weights, write_json_atomic
from models.pipeline import CONFIG_FILE, TEXT_ENCODER_FILE, UNET_FILE, GenerationParams, TextToImage, to_pil
from models.text_encoder import _safe_id  # the same id TextEncoder.identity_id is made of

OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
UNCOND_FILE = "uncond_embedding.safetensors"
ARTIFACT_FILES = {
    "unet": UNET_FILE,
    "model_config": CONFIG_FILE,
    "text_encoder": TEXT_ENCODER_FILE,  # optional: only when the encoder has weights of its own
    "open_clip_config": OPEN_CLIP_CONFIG_FILE,
    "uncond_embedding": UNCOND_FILE,
}
MODEL_CODE_FILE = "t2i_model_code.py"
# MLflow executes this file to build the model ("models from code"): no cloudpickle in the model.
MODEL_CODE = '''"""MLflow models-from-code entry point of a t2i-pipeline model (written by models/mlflow_model.py)."""
import mlflow

from models.mlflow_model import TextToImageModel

mlflow.models.set_model(TextToImageModel())
'''

REQUEST_COLUMNS = ("prompt", "seed", "steps", "guidance_scale", "sampler")
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit seed
MAX_EXACT_FLOAT = 2**53  # past it a float (an integer column with gaps is float) no longer holds every integer
MAX_BATCH = 16  # rows per UNet batch; a row's image depends on its own seed only, so chunking is invisible
# Rebuilt vs stored empty-caption states: identical on the same device; TF32/reduced precision on a
# GPU moves them by ~1e-3, a different encoder by O(1).
UNCOND_TOLERANCE = 1e-2


class InvalidRequestError(MlflowException, ValueError):
    """A request row that cannot be generated (bad prompt, seed, steps, guidance or sampler).
    An MlflowException with INVALID_PARAMETER_VALUE, so the scoring server answers 400 with this message."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


# ---- logging side: what goes into a registered version ------------------------------------------


def stage_artifacts(pipe: TextToImage, checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, str]:
    """Artifact name -> local file for `mlflow.pyfunc.log_model(artifacts=...)`.

    Weights and config are taken as saved in `checkpoint_dir` (a `TextToImage.save` dir, which
    `pipe` was loaded from); the encoder identity and the empty-caption embedding are written to `out_dir`.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts = {"unet": str(checkpoint_dir / UNET_FILE), "model_config": str(checkpoint_dir / CONFIG_FILE)}
    if (checkpoint_dir / TEXT_ENCODER_FILE).is_file():
        artifacts["text_encoder"] = str(checkpoint_dir / TEXT_ENCODER_FILE)
    model_name = pipe.text_encoder.config.model_name
    identity, identity_id = encoder_identity(checkpoint_dir)
    write_json_atomic(
        out_dir / OPEN_CLIP_CONFIG_FILE,
        {"model_name": model_name, "config": open_clip.get_model_config(model_name),
         "identity": identity, "identity_id": identity_id},
    )
    artifacts["open_clip_config"] = str(out_dir / OPEN_CLIP_CONFIG_FILE)
    uncond = pipe.text_encoder.encode([""])
    save_weights({"tokens": uncond.tokens[0], "mask": uncond.mask[0]}, out_dir / UNCOND_FILE)  # (L, D), (L,)
    artifacts["uncond_embedding"] = str(out_dir / UNCOND_FILE)
    missing = [p for p in artifacts.values() if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{checkpoint_dir} is not a complete saved TextToImage: missing {missing}")
    return artifacts


def encoder_identity(checkpoint_dir: str | os.PathLike) -> tuple[dict, str]:
    """The text encoder's identity as it was at training time (model, weights id, layer) and its id,
    the one embedding sets are keyed by. Read from the saved config: once reloaded from the copied
    `text_encoder.safetensors`, a pretrained tag would identify as a file hash instead."""
    config = json.loads((Path(checkpoint_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    identity = config["text_encoder_identity"]
    return identity, _safe_id(f"{identity['model_name']}__{identity['weights']}__{identity['layer']}")


def write_model_code(directory: str | os.PathLike) -> Path:
    """Write the models-from-code entry file that `log_model(python_model=...)` takes."""
    path = Path(directory) / MODEL_CODE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(MODEL_CODE, encoding="utf-8")
    return path


def signature() -> ModelSignature:
    inputs = Schema([
        ColSpec("string", "prompt"),
        ColSpec("long", "seed", required=False),
        ColSpec("long", "steps", required=False),
        ColSpec("double", "guidance_scale", required=False),
        ColSpec("string", "sampler", required=False),
    ])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string")]))  # base64 PNG per row


def input_example(steps: int = 20) -> pd.DataFrame:
    return pd.DataFrame({
        "prompt": ["a red circle in the top left"],
        "seed": [0],
        "steps": [steps],
        "guidance_scale": [3.0],
        "sampler": ["ddim"],
    })


# ---- loading side ---------------------------------------------------------------------------------


def load_pipeline(artifacts: Mapping[str, str], device: str | torch.device | None = None) -> TextToImage:
    """Rebuild the `TextToImage` from the artifact files of a logged model (name -> local path)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    required = [k for k in ARTIFACT_FILES if k != "text_encoder"]
    missing = [k for k in required if k not in artifacts]
    if missing:
        raise MlflowException(f"the logged model lacks artifacts {missing}; is it a t2i-pipeline model?")
    identity = json.loads(Path(artifacts["open_clip_config"]).read_text(encoding="utf-8"))
    ensure_open_clip_config(identity["model_name"], identity["config"])

    with _as_saved_dir(artifacts) as directory:
        pipe = TextToImage.load(directory, device=device)
    _check_uncond(pipe, load_weights(artifacts["uncond_embedding"]))
    return pipe


def load_pipeline_from_model_dir(model_dir: str | os.PathLike, device: str | torch.device | None = None) -> TextToImage:
    """The `TextToImage` of a downloaded MLflow model directory (the one holding `MLmodel`),
    read from its artifacts only: the model's code is not executed."""
    from mlflow.models import Model

    model_dir = Path(model_dir)
    flavor = Model.load(str(model_dir)).flavors.get("python_function", {})
    entries = flavor.get("artifacts") or {}
    if not entries:
        raise MlflowException(f"{model_dir} is an MLflow model without artifacts; is it a t2i-pipeline model?")
    return load_pipeline({name: str(model_dir / e["path"]) for name, e in entries.items()}, device)


def ensure_open_clip_config(model_name: str, config: dict) -> None:
    """Make `model_name` known to open_clip with exactly `config` (the one the model was trained with)."""
    known = open_clip.get_model_config(model_name)
    if known is None:
        if not model_name or "/" in model_name or "\\" in model_name or model_name.startswith("."):
            raise ValueError(f"text encoder model_name {model_name!r} cannot be registered with open_clip")
        with tempfile.TemporaryDirectory(prefix="t2i-open-clip-") as tmp:
            path = Path(tmp) / f"{model_name}.json"
            path.write_text(json.dumps(config), encoding="utf-8")
            # open_clip keeps the parsed config after the file is gone.
            open_clip.add_model_config(path)
    elif known != config:
        raise ValueError(
            f"open_clip's config for {model_name!r} differs from the one this model was trained with; the "
            "installed open_clip_torch version defines the architecture differently. Install the version "
            "pinned in the model's requirements."
        )


@contextlib.contextmanager
def _as_saved_dir(artifacts: Mapping[str, str]) -> Iterator[Path]:
    """A directory holding the weight/config artifacts under TextToImage's file names: their own
    directory when MLflow laid them out so (it does), else a temporary one of symlinks."""
    files = {ARTIFACT_FILES[k]: Path(p) for k, p in artifacts.items() if k in ("unet", "model_config", "text_encoder")}
    parents = {p.parent for p in files.values()}
    if len(parents) == 1 and all(p.name == name for name, p in files.items()):
        yield parents.pop()
        return
    with tempfile.TemporaryDirectory(prefix="t2i-model-") as tmp:
        for name, src in files.items():
            try:
                os.symlink(src.resolve(), Path(tmp) / name)
            except OSError:  # no symlinks on this filesystem
                shutil.copyfile(src, Path(tmp) / name)
        yield Path(tmp)


def _check_uncond(pipe: TextToImage, stored: dict[str, torch.Tensor]) -> None:
    found = pipe.text_encoder.encode([""])
    tokens, mask = found.tokens[0].float().cpu(), found.mask[0].cpu()  # (L, D), (L,)
    # Real tokens only: past the end the UNet never looks, and models registered before the
    # encoder zeroed those positions hold the padding tokens' states there.
    same = (
        tokens.shape == stored["tokens"].shape
        and torch.equal(mask, stored["mask"].bool())
        and torch.allclose(tokens[mask], stored["tokens"][mask].float(), rtol=UNCOND_TOLERANCE, atol=UNCOND_TOLERANCE)
    )
    if not same:
        raise MlflowException(
            f"the rebuilt text encoder {pipe.text_encoder.identity_id} does not reproduce the stored empty-caption "
            "embedding: the encoder weights or the open_clip/torch version differ from the ones the model was "
            "registered with"
        )


# ---- requests ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    prompt: str
    seed: int
    params: GenerationParams


def parse_requests(model_input: pd.DataFrame) -> list[Request]:
    """Validate a request DataFrame row by row; every problem names its row and column."""
    if not isinstance(model_input, pd.DataFrame):
        raise InvalidRequestError(
            f"expected a DataFrame with columns {list(REQUEST_COLUMNS)}, got {type(model_input).__name__}"
        )
    unknown = [c for c in model_input.columns if c not in REQUEST_COLUMNS]
    if unknown:
        raise InvalidRequestError(f"unknown columns {unknown}; valid columns are {list(REQUEST_COLUMNS)}")
    if "prompt" not in model_input.columns or len(model_input) == 0:
        raise InvalidRequestError("the request needs a `prompt` column and at least one row")
    defaults = GenerationParams()
    requests = []
    for i, row in enumerate(model_input.to_dict(orient="records")):
        prompt = row["prompt"]
        if not isinstance(prompt, str):
            raise InvalidRequestError(f"row {i}: prompt must be a string, got {prompt!r}")
        seed = _integer(row.get("seed"), "seed", i, default=i)
        if not 0 <= seed <= MAX_SEED:
            raise InvalidRequestError(f"row {i}: seed must be in [0, 2**63 - 1], got {seed}")
        steps = _integer(row.get("steps"), "steps", i, default=defaults.steps)
        guidance = _number(row.get("guidance_scale"), "guidance_scale", i, default=defaults.guidance_scale)
        sampler = row.get("sampler")
        sampler = defaults.sampler if _missing(sampler) else sampler
        if not isinstance(sampler, str):
            raise InvalidRequestError(f"row {i}: sampler must be a string, got {sampler!r}")
        try:
            params = GenerationParams(steps=steps, guidance_scale=guidance, sampler=sampler)
        except ValueError as exc:
            raise InvalidRequestError(f"row {i}: {exc}") from exc
        requests.append(Request(prompt, seed, params))
    return requests


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _integer(value, column: str, row: int, default: int) -> int:
    if _missing(value):
        return default
    # A JSON number may arrive as 7.0 (a column with gaps is float); a fraction is an error, never rounded.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidRequestError(f"row {row}: {column} must be an integer, got {value!r}")
    if not float(value).is_integer():
        raise InvalidRequestError(f"row {row}: {column} must be an integer, got {value!r}")
    if isinstance(value, (float, np.floating)) and MAX_EXACT_FLOAT < abs(value) <= MAX_SEED:  # larger: out of range
        raise InvalidRequestError(
            f"row {row}: {column} {value!r} arrived as a float, which is inexact beyond 2**53 (a column with "
            f"gaps is float); give {column} in every row"
        )
    return int(value)


def _number(value, column: str, row: int, default: float) -> float:
    if _missing(value):
        return default
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidRequestError(f"row {row}: {column} must be a number, got {value!r}")
    return float(value)


def encode_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def generate_pngs(pipe: TextToImage, requests: list[Request]) -> list[str]:
    """One base64 PNG per request, in order; rows sharing generation params share UNet batches."""
    out: list[str | None] = [None] * len(requests)
    groups: dict[GenerationParams, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.params, []).append(i)
    for params, rows in groups.items():
        for start in range(0, len(rows), MAX_BATCH):
            chunk = rows[start : start + MAX_BATCH]
            images = pipe.generate(
                [requests[i].prompt for i in chunk], seeds=[requests[i].seed for i in chunk], params=params
            )  # (b, 3, H, W)
            for i, image in zip(chunk, to_pil(images)):
                out[i] = encode_png(image)
    return out


class TextToImageModel(PythonModel):
    """pyfunc wrapper: `load_context` rebuilds the pipeline from the artifacts, `predict` generates."""

    def load_context(self, context) -> None:
        self.pipe = load_pipeline(context.artifacts)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        if params:
            raise InvalidRequestError(
                f"this model takes no params ({sorted(params)}); put steps, guidance_scale, sampler in the rows"
            )
        requests = parse_requests(model_input)
        for i, request in enumerate(requests):
            try:
                self.pipe.sampler(request.params)  # steps that this model's schedule cannot take, before any work
            except ValueError as exc:
                raise InvalidRequestError(f"row {i}: {exc}") from exc
        return generate_pngs(self.pipe, requests)
