"""Environment-backed settings: paths and URIs, never hyperparameters.

Every field reads `T2I_<NAME>` from the environment (or a `.env` file), e.g.
`T2I_DATA_ROOT=/mnt/data`, `T2I_MLFLOW_TRACKING_URI=http://127.0.0.1:5000`,
`T2I_DASK_ADDRESS=tcp://scheduler:8786`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="T2I_", env_file=".env", extra="ignore")

    data_root: Path = Path("data")
    mlflow_tracking_uri: str = "sqlite:///mlflow.db"
    mlflow_artifact_root: str = "mlartifacts"
    # A Dask scheduler (e.g. tcp://10.0.0.5:8786) that ingest stages its shards on; None: a local
    # process pool. Its workers must see data_root at the same path.
    dask_address: str | None = None

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
