import os
import pickle
import stat
from pathlib import Path

import pytest
import torch

from models.checkpoint import (
    UnsafeCheckpointError,
    atomic_write,
    load_state,
    load_weights,
    save_state,
    save_weights,
    temp_dir,
    write_json_atomic,
)


class _Payload:
    """Unpickling this would create a marker file: the 'code in a pickle' attack."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_weights_round_trip_and_shared_storage(tmp_path):
    w = torch.randn(4, 3)
    state = {"a": w, "b": w[:2], "c": torch.arange(5)}  # b shares storage with a
    save_weights(state, tmp_path / "w.safetensors", metadata={"step": 7})
    loaded = load_weights(tmp_path / "w.safetensors")
    assert set(loaded) == {"a", "b", "c"}
    for k in state:
        assert torch.equal(loaded[k], state[k])


def test_pickle_where_weights_belong_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "unet.safetensors"
    bad.write_bytes(pickle.dumps({"w": _Payload(marker)}))
    with pytest.raises(UnsafeCheckpointError, match="safetensors"):
        load_weights(bad)
    assert not marker.exists()


def test_state_loader_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "state.pt"
    torch.save({"optimizer": _Payload(marker)}, bad)
    with pytest.raises(UnsafeCheckpointError):
        load_state(bad)
    assert not marker.exists()


def test_state_round_trip(tmp_path):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    state = {"step": 3, "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}
    save_state(state, tmp_path / "s.pt")
    loaded = load_state(tmp_path / "s.pt")
    assert loaded["step"] == 3
    assert torch.equal(loaded["rng"], state["rng"])


def test_atomic_write_keeps_old_file_when_writer_crashes(tmp_path):
    target = tmp_path / "w.safetensors"
    save_weights({"a": torch.zeros(2)}, target)

    def crashing_writer(tmp: Path) -> None:
        tmp.write_bytes(b"half a file")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, crashing_writer)
    assert torch.equal(load_weights(target)["a"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left behind


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_weights(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=oct)
def test_published_files_get_the_mode_a_plain_open_gives(tmp_path, umask):
    """Not mkstemp's 0600: a serving container under another uid must be able to read the model."""
    old = os.umask(umask)
    try:
        written = [
            save_weights({"a": torch.zeros(2)}, tmp_path / "w.safetensors"),
            save_state({"step": 1}, tmp_path / "s.pt"),
            write_json_atomic(tmp_path / "c.json", {"step": 1}),
        ]
        with open(tmp_path / "plain", "w") as f:
            f.write("x")
        building = temp_dir(tmp_path, ".tmp-v1-")  # a dataset or embedding set before its rename
        (tmp_path / "plain-dir").mkdir()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o666 & ~umask  # the oracle
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    assert building.name.startswith(".tmp-v1-") and building.parent == tmp_path
    assert stat.S_IMODE(building.stat().st_mode) == stat.S_IMODE((tmp_path / "plain-dir").stat().st_mode) == 0o777 & ~umask
