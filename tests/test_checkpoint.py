"""lightning_optlab.checkpoint: one loader that tells damage from danger, atomic saves, stale temp files."""

import os
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch

from lightning_optlab.checkpoint import (
    CheckpointError,
    DamagedCheckpointError,
    UntrustedCheckpointError,
    load_checkpoint,
    read_global_step,
    remove_stale_temp_files,
    save_checkpoint_atomic,
    temp_path_for,
    verify_checkpoint,
)


class Boom:
    """Unpickling this writes a marker file: what a malicious checkpoint would do with os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _good(tmp_path, name="good.ckpt", step=7):
    ckpt = {"global_step": step, "state_dict": {"w": torch.arange(1000.0)},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(1000)}}, "param_groups": []}]}
    torch.save(ckpt, tmp_path / name)
    return tmp_path / name


def test_intact_checkpoint_loads_weights_only_and_step_reads_without_tensors(tmp_path):
    path = _good(tmp_path)
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.arange(1000.0))
    assert read_global_step(path) == 7
    verify_checkpoint(path)


@pytest.mark.parametrize("trust", [False, True])
def test_empty_random_and_truncated_files_are_called_damaged_or_not_a_checkpoint(tmp_path, trust):
    good = _good(tmp_path, "step=3.ckpt")
    data = good.read_bytes()
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "random.ckpt").write_bytes(os.urandom(4096))
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    for name, cls, words in [("empty.ckpt", DamagedCheckpointError, "is empty"),
                             ("cut.ckpt", DamagedCheckpointError, "cut short"),
                             ("random.ckpt", CheckpointError, "not a torch checkpoint")]:
        with pytest.raises(cls) as info:
            load_checkpoint(tmp_path / name, trust=trust)
        msg = str(info.value)
        assert str(tmp_path / name) in msg and words in msg, msg
        assert "--trust-checkpoint" not in msg  # trust would not help: never advised
        assert not isinstance(info.value, UntrustedCheckpointError)
        if cls is DamagedCheckpointError:
            assert "damaged" in msg and str(good) in msg  # names the previous checkpoint to use


def test_code_in_a_checkpoint_needs_trust_and_never_runs_without_it(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"global_step": 3, "x": Boom(marker)}, tmp_path / "evil.ckpt")
    for reader in (lambda p: load_checkpoint(p), read_global_step):
        with pytest.raises(UntrustedCheckpointError) as info:
            reader(tmp_path / "evil.ckpt")
        assert "io.open" in str(info.value) and "--trust-checkpoint" in str(info.value)
    assert not marker.exists()
    load_checkpoint(tmp_path / "evil.ckpt", trust=True)  # the explicit opt-in does run it
    assert marker.exists()


def test_a_plain_pickle_is_refused_even_with_trust(tmp_path):
    marker = tmp_path / "ran"
    with open(tmp_path / "plain.ckpt", "wb") as f:
        pickle.dump({"x": Boom(marker)}, f)
    for trust in (False, True):
        with pytest.raises(CheckpointError, match="plain pickle, not a torch checkpoint"):
            load_checkpoint(tmp_path / "plain.ckpt", trust=trust)
    assert not marker.exists()


def test_verify_finds_damage_inside_tensor_data_that_torch_load_misses(tmp_path):
    path = _good(tmp_path)
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size >= 4000)
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 100
    data[start:start + 16] = bytes(16)
    path.write_bytes(bytes(data))
    load_checkpoint(path)  # torch does not check the CRC
    with pytest.raises(DamagedCheckpointError, match="fails its checksum"):
        verify_checkpoint(path)


def test_atomic_save_replaces_and_removes_stale_temp_files_of_dead_writers(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".last.ckpt.{pid}.tmp"
    stale.write_bytes(b"PK\x03\x04partial")
    live = tmp_path / f".last.ckpt.{os.getppid()}.tmp"  # a live process's file is kept
    live.write_bytes(b"x")
    save_checkpoint_atomic({"global_step": 1}, tmp_path / "last.ckpt")
    assert not stale.exists() and live.exists()
    assert read_global_step(tmp_path / "last.ckpt") == 1
    assert not temp_path_for(tmp_path / "last.ckpt").exists()
    save_checkpoint_atomic({"global_step": 2}, tmp_path / "last.ckpt")
    assert read_global_step(tmp_path / "last.ckpt") == 2
    assert remove_stale_temp_files(tmp_path) == []
