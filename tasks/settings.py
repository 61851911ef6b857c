"""Environment-backed settings: paths and URIs, never hyperparameters.

Every field reads `T2I_<NAME>` from the environment (or a `.env` file), e.g.
`T2I_DATA_ROOT=/mnt/data`, `T2I_MLFLOW_TRACKING_URI=http://127.0.0.1:5000`,
`T2I_DASK_ADDRESS=tcp://scheduler:8786`, `T2I_DATA_ROOT=s3://bucket/prefix` (with
`T2I_S3_ENDPOINT_URL` for MinIO; see tasks/storage.py).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="T2I_", env_file=".env", extra="ignore")

    # A local path, or s3://bucket/prefix: then `data_uri` holds the URI and `data_root` becomes
    # the local cache `local_data_root` that tasks/storage.py mirrors to the bucket.
    data_root: Path = Path("data")
    data_uri: str | None = None
    local_data_root: Path | None = None
    s3_endpoint_url: str | None = None  # an S3-compatible store (MinIO): http://127.0.0.1:9000
    mlflow_tracking_uri: str = "sqlite:///mlflow.db"
    mlflow_artifact_root: str = "mlartifacts"
    # A Dask scheduler (e.g. tcp://10.0.0.5:8786) that ingest and embed run their shards on; None:
    # this machine. Its workers must see data_root at the same path.
    dask_address: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _remote_data_root(cls, values: dict) -> dict:
        root = str(values.get("data_root") or "")
        if "://" not in root:
            return values
        if not root.startswith("s3://") or not root[len("s3://") :].split("/")[0]:  # no bucket
            raise ValueError(f"T2I_DATA_ROOT={root!r}: a URI data root must be s3://bucket[/prefix]")
        local = values.get("local_data_root") or Path.home() / ".cache" / "t2i" / root[len("s3://") :].strip("/").replace("/", "_")
        return {**values, "data_uri": root.rstrip("/"), "data_root": Path(local)}

    @property
    def raw_dir(self) -> Path:
        return self.data_root / "raw"

    @property
    def datasets_dir(self) -> Path:
        return self.data_root / "datasets"

    @property
    def embeddings_dir(self) -> Path:
        return self.data_root / "embeddings"

    @property
    def runs_dir(self) -> Path:
        return self.data_root / "runs"


def get_settings() -> Settings:
    """Read settings now (not at import), so tests can point them at a tmp dir."""
    return Settings()
