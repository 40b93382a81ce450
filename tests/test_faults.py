"""benchmarks/faults.py at a small N: kills of `optlab fit` (a timer SIGKILL and one during a checkpoint
write), each resumed; every checkpoint readable weights-only, every resume exact, no temp file left."""

import importlib.util
import os
import re
from pathlib import Path


def _faults():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "faults.py"
    spec = importlib.util.spec_from_file_location("faults_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_killed_and_resumed_fit_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = _faults().run_faults(tmp_path, kills=2, steps=6, seed=1)
    assert result == {"kills": 2, "exact": 2, "unreadable": 0, "leftovers": 0,
                      "partial_after_kills": result["partial_after_kills"]}
    assert result["partial_after_kills"] >= 1  # the kill during a write left one; the resume removed it
    # one checkpoint per step; a kill right after a step file was renamed into place makes Lightning's
    # rerun of that step write ``step=N-v1.ckpt`` beside it (both intact), so steps are counted
    names = [p.name for p in (tmp_path / "faulty" / "checkpoints").glob("step=*.ckpt")]
    assert {re.match(r"step=(\d+)", n).group(1) for n in names} == {str(i) for i in range(1, 7)}
    assert os.path.getsize(tmp_path / "faulty" / "checkpoints" / "last.ckpt") > 0
