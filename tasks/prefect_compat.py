"""Prefect's `task` decorator and helpers where Prefect is installed, pass-throughs where it is not.

Each stage module is a plain function plus a small `@task` wrapper. The GPU benchmark box has
torch but neither Prefect nor MLflow; it imports the same stage modules and calls the plain
functions (`benchmarks/quality.py`), so the wrappers must not need Prefect to be defined.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    from prefect import task
    from prefect.cache_policies import NO_CACHE
    from prefect.tasks import exponential_backoff
except ImportError:
    NO_CACHE = None

    def task(**_options: Any) -> Callable[[Callable], Callable]:
        return lambda fn: fn

    def exponential_backoff(backoff_factor: float) -> None:
        return None


__all__ = ["NO_CACHE", "exponential_backoff", "task"]
