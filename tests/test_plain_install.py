"""A plain install (the wheel, no extras): every ``--help`` works, commands that need an extra say
in one line what to install, the recipes are package data and run by their bare name.

The test builds the wheel from this checkout and installs it (``--no-deps``, offline) into a fresh
virtual environment it creates. That environment sees the test environment's packages through a
``.pth`` file pointing at a folder of links to them, minus the extras (mup, lm-eval, datasets,
transformers) and minus this checkout: they are genuinely not installed there. The same with the
core dependencies installed from PyPI: ``bash scripts/plain_install_check.sh``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: what a plain install does not have: the extras, and the editable install of this checkout
MISSING = re.compile(r"^(mup|lm_eval|datasets|transformers|lightning_optlab|__editable__\.lightning_optlab|"
                     r"__editable___lightning_optlab)([-_.].*)?$", re.IGNORECASE)


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "lightning_optlab", src / "lightning_optlab", ignore=ignore)
    shutil.copytree(REPO / "recipes", src / "recipes", ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(root / "dist"), str(src)],
                   check=True, capture_output=True)
    (wheel,) = (root / "dist").glob("lightning_optlab-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    view = root / "core-deps"
    view.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not MISSING.match(entry.name) and entry.suffix != ".pth":
            (view / entry.name).symlink_to(entry)
    (_site_packages(venv) / "core-deps.pth").write_text(str(view) + "\n")
    subprocess.run(pip + ["--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, env=_clean_env())
    (root / "cwd").mkdir()
    return root, wheel


def _clean_env() -> dict[str, str]:
    """The environment without this checkout on the path (the tests export PYTHONPATH=<checkout>)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return env


def _run(installed, *args, timeout=300):
    root, _ = installed
    env = _clean_env()
    if args and args[0] == "-c":
        cmd = [str(root / "venv" / "bin" / "python"), *args]
    else:
        cmd = [str(root / "venv" / "bin" / "optlab"), *args]
    return subprocess.run(cmd, cwd=root / "cwd", env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_carries_the_recipes_and_every_subpackage(installed):
    _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("lightning_optlab/recipes/")}
    assert shipped == {p.name for p in (REPO / "recipes").glob("*.yaml")}
    packages = {str(p.parent.relative_to(REPO)) for p in (REPO / "lightning_optlab").rglob("__init__.py")}
    assert packages <= {str(Path(n).parent) for n in names}, "a subpackage is missing from pyproject's packages list"


def test_the_install_is_what_runs(installed):
    root, _ = installed
    out = _run(installed, "-c", "import lightning_optlab, importlib.util as u; print(lightning_optlab.__file__); "
               "print([m for m in ('mup', 'lm_eval', 'datasets', 'transformers') if u.find_spec(m)])")
    path, found = out.stdout.split("\n")[:2]
    assert path.startswith(str(root / "venv")), out
    assert found == "[]"


HELP_COMMANDS = ["fit", "validate", "test", "check", "sweep", "report", "recipes", "mup", "mup coord-check",
                 "mup transfer", "mup lr-find", "mup lr-transfer", "eval", "eval prepare", "export", "demo"]

HELP_LOOP = """
import contextlib, io, sys, traceback
from lightning_optlab.cli import main
for command in sys.argv[1:]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(command.split() + ["--help"])
        except SystemExit as exc:
            rc = exc.code
        except BaseException:
            rc = "raised: " + traceback.format_exc()
    print(f"{command}|{rc}|{'usage:' in out.getvalue()}|{'Traceback' in err.getvalue()}")
"""


def test_every_help_works_without_extras(installed):
    out = _run(installed, "-c", HELP_LOOP, *HELP_COMMANDS)
    rows = [line.split("|") for line in out.stdout.splitlines() if line.count("|") == 3]
    assert [r[0] for r in rows] == HELP_COMMANDS, out.stdout + out.stderr
    bad = [r for r in rows if r[1:] != ["0", "True", "False"]]
    assert not bad, bad


@pytest.mark.parametrize("args, hint", [
    ("mup coord-check --widths 16 32 --steps 1", "pip install --no-deps mup==1.0.0"),
    ("eval --ckpt nothing.ckpt --task-dir samples", "pip install 'lightning_optlab[eval]'"),
])
def test_a_missing_extra_is_one_line_saying_what_to_install(installed, args, hint):
    out = _run(installed, *args.split())
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert hint in out.stderr.strip().splitlines()[-1]


def test_mup_from_python_without_mup_says_how_to_install(installed):
    out = _run(installed, "-c", "import torch, lightning_optlab as lo; lo.configure(torch.nn.Linear(4, 4), 'adamw', mup=True)")
    assert "MissingExtraError" in out.stderr and "pip install --no-deps mup==1.0.0" in out.stderr
    assert "torchvision" in out.stderr  # and why --no-deps


def test_recipes_list_show_copy_from_the_install(installed):
    root, _ = installed
    listing = _run(installed, "recipes")
    assert listing.returncode == 0 and "lr_sweep" in listing.stdout
    assert str(root / "venv") in listing.stdout and "lightning_optlab/recipes" in listing.stdout
    shown = _run(installed, "recipes", "show", "lr_sweep")
    assert shown.stdout == (REPO / "recipes" / "lr_sweep.yaml").read_text()
    copied = _run(installed, "recipes", "copy", "lr_sweep", "--to", "mine")
    assert copied.returncode == 0 and (root / "cwd" / "mine" / "lr_sweep.yaml").is_file()
    again = _run(installed, "recipes", "copy", "lr_sweep", "--to", "mine")
    assert again.returncode == 2 and "--force" in again.stderr
    missing = _run(installed, "recipes", "show", "nope")
    assert missing.returncode == 2 and "lr_sweep" in missing.stderr


def test_a_shipped_recipe_sweeps_by_its_bare_name_and_the_demo_reports_without_lm_eval(installed):
    root, _ = installed
    sweep = _run(installed, "sweep", "lr_sweep", "--scale", "tiny", "--only", "adamw", "--set", "trainer.max_steps=2",
                 "--set", "trainer.val_check_interval=2", "--set", "data.val_batches=1", "--set", "optimizer.warmup_steps=0",
                 "--set", "sweep.checkpoint_every=1000", "--no-report", "--out", "sweep")
    assert sweep.returncode == 0, sweep.stdout[-2000:] + sweep.stderr[-2000:]
    assert (root / "cwd" / "sweep" / "results.csv").is_file()
    demo = _run(installed, "demo", "--steps", "2", "--optimizers", "adamw", "--out", "demo")
    assert demo.returncode == 0, demo.stderr[-2000:]
    report = (root / "cwd" / "demo" / "report.md").read_text()
    assert "zero-shot table skipped" in report and "pip install 'lightning_optlab[eval]'" in report
