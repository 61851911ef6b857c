"""A Dask cluster for the data stages: `T2I_DASK_ADDRESS` / `--dask-address`.

Ingest stages its work units and embed encodes its caption shards on the cluster's workers
when an address is given; both write into the data root, which every worker must see at the
same path (a shared volume). Without an address both run on this machine.
"""

from __future__ import annotations

import importlib.util

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def require_distributed(address: str, stage: str, error: type[Exception] = RuntimeError) -> None:
    """Raise `error` (the stage's bad-input error: no retry helps), naming the fix, when
    dask.distributed is not installed."""
    if importlib.util.find_spec("distributed") is None:
        raise error(
            f"dask_address={address!r} needs dask.distributed: pip install 't2i-pipeline[dask]', "
            f"or unset T2I_DASK_ADDRESS to run {stage} on this machine"
        )


@contextmanager
def dask_client(address: str) -> Iterator[Any]:
    """A connected `distributed.Client` with at least one worker. Raises ConnectionError or
    TimeoutError when the scheduler cannot be reached or has no workers (a retry can fix those)."""
    from distributed import Client

    try:
        client = Client(address, set_as_default=False, timeout="30s")
    except OSError as exc:
        raise ConnectionError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc
    with client:
        if not client.nthreads():
            try:
                client.wait_for_workers(1, timeout=30)
            except TimeoutError:
                raise TimeoutError(f"the Dask cluster at {address} has had no workers for 30 s; start some") from None
        yield client
