"""Reading and writing checkpoints: one loader that tells damage from danger, and atomic saves.

Every place of the pack that reads a checkpoint (``optlab eval``, the sweep runner, ``optlab fit``'s
resume through :class:`~lightning_optlab.callbacks.resume.SafeCheckpointIO`, the resume check) goes
through :func:`load_checkpoint`:

* it loads with ``torch.load(weights_only=True)`` (tensors and plain containers; no pickled code
  runs) unless the caller passes ``trust=True``, which only an explicit user option should set;
* when loading fails it says *why*, from the file's structure, without unpickling anything:
  missing, empty, not a torch checkpoint (random bytes, a plain pickle), truncated or corrupt
  (the file is damaged: use the previous checkpoint) — or, only when that is really the case,
  that it holds pickled objects (named) that need the trust option.

A *distributed checkpoint* (the folder Lightning's ``ModelParallelStrategy`` writes with
``save_distributed_checkpoint=True``: the shards and DCP's ``.metadata``, beside ``meta.pt`` with the
loops, callbacks and hyperparameters) loads through the same function: its ``meta.pt`` under the same
rules, and, unless only a cheap look is asked for (``mmap``), the whole tensors read from the shards
in this one process, in the layout of a one-file Lightning checkpoint (``state_dict``,
``optimizer_states`` keyed by position). A folder cut short while being written (no ``.metadata`` or
no ``meta.pt``) is reported as damaged.

Writes go to a temporary file in the checkpoint's own folder, are flushed to disk and renamed
over the target (:func:`save_checkpoint_atomic`): a process killed mid-write leaves the previous
checkpoint intact and at most a hidden ``.NAME.PID.tmp``, which the next save or resume in that
folder removes (:func:`remove_stale_temp_files`). Torch only, no Lightning.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "DamagedCheckpointError", "UntrustedCheckpointError", "load_checkpoint",
           "is_distributed_checkpoint", "to_distributed_checkpoint",
           "read_global_step", "verify_checkpoint", "save_checkpoint_atomic", "remove_stale_temp_files",
           "temp_path_for"]

#: the start of a pre-1.6 (non-zip) ``torch.save`` file: protocol 2, then the magic number as a LONG1
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_ZIP_MAGIC = b"PK\x03\x04"
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; ``kind`` says why (``missing``, ``empty``, ``not-torch``,
    ``damaged`` or ``untrusted``) and ``path`` which file."""

    def __init__(self, message: str, *, path: Path, kind: str) -> None:
        super().__init__(message)
        self.path, self.kind = Path(path), kind


class DamagedCheckpointError(CheckpointError):
    """The file is empty, truncated or corrupt (a write cut short, a bad copy): no option will load it."""


class UntrustedCheckpointError(CheckpointError):
    """An intact torch checkpoint holding pickled objects that loading without trust refuses."""


def _previous_hint(path: Path) -> str:
    """Which checkpoint to use instead: the newest other intact-looking ``*.ckpt``/``*.pt`` in the same folder."""
    try:
        others = [p for p in path.parent.iterdir() if p.suffix in (".ckpt", ".pt", ".pth") and p.name != path.name
                  and p.is_file() and _structure(p)[0] in ("zip", "legacy")]
    except OSError:
        others = []
    if not others:
        return "Use an earlier checkpoint of this run if you have one, or delete this file and start over"
    newest = max(others, key=lambda p: p.stat().st_mtime)
    return f"Use the previous checkpoint instead (the newest other in that folder is {newest}) or delete this file"


def _head(path: Path, n: int = 16) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _structure(path: Path) -> tuple[str, str]:
    """What the file is, from its bytes only (nothing unpickled): ``(kind, detail)`` with kind one of
    ``zip`` (an intact torch zip checkpoint), ``legacy``, ``empty``, ``truncated``, ``corrupt``, ``not-torch``."""
    size = path.stat().st_size
    if size == 0:
        return "empty", "it is empty (0 bytes)"
    head = _head(path)
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            return "truncated", (f"it is cut short ({size} bytes, no zip directory at the end): "
                                 "a write was probably interrupted")
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            return "corrupt", f"its zip directory is unreadable ({err})"
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "not-torch", "it is a zip archive without data.pkl, not a torch checkpoint"
        return "zip", ""
    if head.startswith(_LEGACY_MAGIC):
        return "legacy", ""
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "not-torch", "it is a plain pickle, not a torch checkpoint (loading it would run whatever it holds)"
    return "not-torch", f"it is not a torch checkpoint (starts with {head[:8]!r})"


def _weights_only_refusal(err: BaseException) -> bool:
    return isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err)


def _damaged(path: Path, detail: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(f"checkpoint {path} is damaged: {detail}. {_previous_hint(path)}.",
                                  path=path, kind="damaged")


def _diagnose(path: Path, err: BaseException, trust: bool, trust_hint: str) -> CheckpointError:
    """The error to raise for a checkpoint that failed to load, from its structure."""
    kind, detail = _structure(path)
    if kind == "empty":
        return DamagedCheckpointError(f"checkpoint {path} is damaged: {detail}. {_previous_hint(path)}.",
                                      path=path, kind="empty")
    if kind in ("truncated", "corrupt"):
        return _damaged(path, detail)
    if kind == "not-torch":
        return CheckpointError(f"{path} cannot be loaded: {detail}. Pass the .ckpt file a training run wrote.",
                               path=path, kind="not-torch")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if not trust and _weights_only_refusal(err):
        unsafe: list[str] = []
        if kind == "zip":
            try:
                unsafe = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
            except Exception as scan_err:  # noqa: BLE001 - an unreadable pickle is damage, not danger
                return _damaged(path, f"its pickled data cannot be parsed ({type(scan_err).__name__}: {scan_err})")
        if unsafe or kind == "legacy":
            what = f"pickled objects ({', '.join(unsafe)})" if unsafe else "data in the old (pre-1.6) torch format"
            return UntrustedCheckpointError(
                f"checkpoint {path} holds {what} that loading with weights_only=True refuses: loading it would "
                f"run code from the file. If you trust where this file comes from, rerun with {trust_hint}; "
                "otherwise do not load it.", path=path, kind="untrusted")
        return _damaged(path, f"its pickled data is invalid ({first})")
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as zip_err:
            bad = f"? ({zip_err})"
        if bad:
            return _damaged(path, f"the archive member {bad} fails its checksum")
    return _damaged(path, f"torch cannot read it ({type(err).__name__}: {first})")


def load_checkpoint(path: str | os.PathLike[str], *, trust: bool = False, map_location: Any = "cpu",
                    mmap: bool = False, trust_hint: str = "--trust-checkpoint") -> Any:
    """``torch.load`` a checkpoint, weights only unless ``trust``; a failure says what is wrong with the file.

    Args:
        path: the checkpoint file, or a distributed checkpoint's folder (see the module docstring).
        trust: load with full unpickling (runs code stored in the file). Only an explicit user option
            (``--trust-checkpoint``, ``--weights_only false``) may set it; even then a file that is not
            a torch checkpoint at all (random bytes, a plain pickle) is refused.
        map_location: as ``torch.load`` (default ``"cpu"``).
        mmap: map the tensors instead of reading them (a cheap look at the metadata: nothing but the
            small pickle is read until a tensor is touched). For a distributed checkpoint: its
            ``meta.pt`` only (no ``state_dict``, no optimizer state).
        trust_hint: the option named in the error of a file that needs trust.

    Raises:
        FileNotFoundError: no such file (the message names it).
        DamagedCheckpointError: empty, truncated or corrupt; names the file and the previous checkpoint.
        UntrustedCheckpointError: intact, but holds objects that need ``trust`` (named in the message).
        CheckpointError: not a torch checkpoint.
    """
    p = Path(path)
    if p.is_dir() and (_looks_distributed(p)):
        return _load_distributed(p, trust=trust, map_location=map_location, mmap=mmap, trust_hint=trust_hint)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}" + (" (a folder, not a file)" if p.is_dir() else ""))
    if trust:  # full unpickling runs code: refuse files that are not torch checkpoints before that
        kind, detail = _structure(p)
        if kind not in ("zip", "legacy"):
            raise _diagnose(p, EOFError(detail), trust, trust_hint)
    try:
        return torch.load(p, map_location=map_location, weights_only=not trust, mmap=mmap and _is_zip(p))
    except Exception as err:  # noqa: BLE001 - every failure is diagnosed from the file's structure
        raise _diagnose(p, err, trust, trust_hint) from err


_DCP_META, _LIGHTNING_META = ".metadata", "meta.pt"


def _looks_distributed(path: Path) -> bool:
    """A folder with any of a distributed checkpoint's files (complete or not)."""
    return (path / _DCP_META).exists() or (path / _LIGHTNING_META).exists() or any(path.glob("*.distcp"))


def is_distributed_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a complete distributed checkpoint folder (DCP's ``.metadata`` and Lightning's ``meta.pt``)."""
    p = Path(path)
    return p.is_dir() and (p / _DCP_META).is_file() and (p / _LIGHTNING_META).is_file()


def _load_distributed(p: Path, *, trust: bool, map_location: Any, mmap: bool, trust_hint: str) -> Any:
    if not is_distributed_checkpoint(p):
        missing = [n for n in (_DCP_META, _LIGHTNING_META) if not (p / n).is_file()]
        raise _damaged(p, f"a distributed checkpoint folder without {' and '.join(missing)}: its save was cut "
                          "short (a process killed or a rank failed while writing)")
    meta = load_checkpoint(p / _LIGHTNING_META, trust=trust, map_location=map_location, mmap=mmap,
                           trust_hint=trust_hint)
    if mmap or not isinstance(meta, dict):
        return meta
    try:
        tensors = _read_shards(p)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001 - a shard missing or unreadable (DCP's CheckpointException is a BaseException)
        raise _damaged(p, f"its shards cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
    meta["state_dict"] = tensors.pop("state_dict", {})
    count = sum(1 for k in tensors if re.fullmatch(r"optimizer_\d+", k))
    meta["optimizer_states"] = [_positional(tensors[f"optimizer_{i}"]) for i in range(count)]
    return meta


def to_distributed_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, trust: bool = False) -> Path:
    """Write a one-file Lightning checkpoint as a distributed checkpoint folder (DCP + ``meta.pt``).

    Lightning's ``ModelParallelStrategy`` resumes a one-file checkpoint by mapping the optimizer
    state's positions to the model's parameter order, which is not the optimizer's when the
    parameters are grouped by role; a distributed checkpoint keys the state by parameter name and
    resumes at any world size. The names come from ``optlab_param_names``, which
    :class:`~lightning_optlab.lit.CausalLMModule` saves in every checkpoint.
    Example: ``to_distributed_checkpoint("step=1000.ckpt", "step=1000.dcp")``, then
    ``trainer.fit(..., ckpt_path="step=1000.dcp")`` under ``ModelParallelStrategy``.
    """
    import torch.distributed.checkpoint as dcp

    src, dst = Path(src), Path(dst)
    ckpt = load_checkpoint(src, trust=trust)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{src} is not a Lightning training checkpoint (no state_dict)", path=src, kind="not-torch")
    optimizers = ckpt.pop("optimizer_states", [])
    names = ckpt.get("optlab_param_names")
    if optimizers and (not isinstance(names, list) or len(names) != len(optimizers)):
        raise CheckpointError(
            f"{src} does not say which parameter each optimizer state belongs to (no optlab_param_names: it was "
            "written by another LightningModule or an older version); resume it with the strategy that wrote it",
            path=src, kind="not-torch")
    state: dict[str, Any] = {"state_dict": ckpt.pop("state_dict")}
    for i, (opt, order) in enumerate(zip(optimizers, names or [])):
        state[f"optimizer_{i}"] = {
            "state": {order[k]: v for k, v in opt.get("state", {}).items()},
            "param_groups": [{**g, "params": [order[k] for k in g["params"]]} for g in opt.get("param_groups", [])],
        }
    dst.mkdir(parents=True, exist_ok=False)
    import warnings

    with warnings.catch_warnings():  # "torch.distributed is disabled ... save in a single process": as meant
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(dst), no_dist=True)
    torch.save(ckpt, dst / _LIGHTNING_META)
    return dst


def _read_shards(p: Path) -> dict[str, Any]:
    """Every tensor of a DCP folder, whole, in this process (no process group needed)."""
    import warnings

    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():  # "torch.distributed is unavailable or uninitialized ... single process"
        warnings.simplefilter("ignore", UserWarning)
        return _load_state_dict_from_keys(checkpoint_id=str(p))


def _positional(opt: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (``get_optimizer_state_dict``) keyed by position instead,
    as ``torch.optim.Optimizer.load_state_dict`` takes it: the i-th parameter listed in the groups is i."""
    groups = opt.get("param_groups", [])
    ids = {name: i for i, name in enumerate(n for g in groups for n in g["params"])}
    return {"state": {ids[k]: v for k, v in opt.get("state", {}).items() if k in ids},
            "param_groups": [{**g, "params": [ids[n] for n in g["params"]]} for g in groups]}


def _is_zip(path: Path) -> bool:
    try:
        return _head(path, 4) == _ZIP_MAGIC
    except OSError:
        return False


def read_global_step(path: str | os.PathLike[str]) -> int:
    """The ``global_step`` of a Lightning checkpoint, read without loading its tensors or running code.

    Loads with ``weights_only=True`` and ``mmap=True``: only the small pickle is read; the weights
    and the optimizer state stay on disk. Raises as :func:`load_checkpoint`.
    """
    ckpt = load_checkpoint(path, mmap=True)
    if not isinstance(ckpt, dict) or "global_step" not in ckpt:
        raise CheckpointError(f"{path} has no global_step: it is not a Lightning training checkpoint",
                              path=Path(path), kind="not-torch")
    return int(ckpt["global_step"])


def verify_checkpoint(path: str | os.PathLike[str]) -> None:
    """Check every byte of a checkpoint: loads (weights only) and verifies the zip's CRC-32 checksums.

    ``torch.load`` does not verify checksums, so a file damaged inside its tensor data loads with
    wrong weights; this reads the whole file once more. Raises as :func:`load_checkpoint`.
    """
    p = Path(path)
    if p.is_dir() and _looks_distributed(p):
        load_checkpoint(p)  # meta.pt, then every shard read whole
        verify_checkpoint(p / _LIGHTNING_META)
        return
    load_checkpoint(p, mmap=True)
    if _is_zip(p):
        with zipfile.ZipFile(p) as zf:
            bad = zf.testzip()
        if bad:
            raise _damaged(p, f"the archive member {bad} fails its checksum")


def temp_path_for(path: str | os.PathLike[str]) -> Path:
    """Where :func:`save_checkpoint_atomic` writes before the rename: ``.NAME.PID.tmp`` beside ``path``."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}.tmp")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the partial ``.NAME.PID.tmp`` files that killed writers left in ``folder``; returns them.

    Only files of that pattern whose process is gone are removed (a live writer's file is kept).
    """
    d = Path(folder)
    removed = []
    try:
        entries = list(d.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m and not _pid_alive(int(m["pid"])) and entry.is_file():
            try:
                entry.unlink()
                removed.append(entry)
            except FileNotFoundError:
                pass
    return removed


def save_checkpoint_atomic(checkpoint: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename it over ``path``.

    The rename is atomic within one folder: readers see the old file or the new one, never a
    partial one. Stale temporary files of killed writers in the folder are removed first.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(p.parent)
    tmp = temp_path_for(p)
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(p.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return p
