"""The recipes shipped with the package, and ``optlab recipes list | show NAME | copy NAME [DEST]``.

In a git checkout the recipes are the repository's ``recipes/*.yaml``; an installed wheel carries
the same files as package data in ``lightning_optlab/recipes/`` (``pyproject.toml`` maps the folder
there). A bare recipe name (``lr_sweep``, ``lr_sweep.yaml``, or ``recipes/lr_sweep.yaml`` outside a
checkout) resolves to the shipped file wherever the command runs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

__all__ = ["recipes_dir", "available_recipes", "find_recipe", "main"]


def recipes_dir() -> Path:
    """The folder of the shipped recipes: the package data of a wheel, else the checkout's ``recipes/``."""
    here = Path(__file__).resolve().parent
    for folder in (here / "recipes", here.parent / "recipes"):
        if folder.is_dir() and any(folder.glob("*.yaml")):
            return folder
    raise FileNotFoundError(f"no shipped recipes found (looked in {here / 'recipes'} and {here.parent / 'recipes'}); "
                            "reinstall the package (pip install lightning_optlab) or pass a recipe path")


def available_recipes() -> list[str]:
    """Names of the shipped recipes (file stems), sorted."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def find_recipe(name_or_path: str | Path) -> Path:
    """``name_or_path`` if it is a file, else the shipped recipe it names (``lr_sweep``, ``lr_sweep.yaml``,
    ``recipes/lr_sweep.yaml``). Raises ``FileNotFoundError`` listing the shipped names."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    parts = path.parts
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == "recipes"):
        stem = parts[-1][:-5] if parts[-1].endswith(".yaml") else parts[-1]
        try:
            candidate = recipes_dir() / f"{stem}.yaml"
        except FileNotFoundError:
            candidate = None
        if candidate is not None and candidate.is_file():
            return candidate
    try:
        names = ", ".join(available_recipes())
    except FileNotFoundError:
        names = "(none found)"
    raise FileNotFoundError(f"recipe/config file {str(name_or_path)!r} does not exist and is not a shipped recipe; "
                            f"shipped recipes: {names} (`optlab recipes` lists them)")


def _summary(path: Path) -> str:
    """The first comment line of a recipe (its one-line description)."""
    for line in path.read_text().splitlines():
        text = line.lstrip("# ").strip()
        if line.startswith("#") and text:
            return text
    return ""


def main(argv: list[str] | None = None) -> int:
    """``optlab recipes [list] | show NAME | copy NAME... [--to DIR] | copy --all [--to DIR]``."""
    parser = argparse.ArgumentParser(prog="optlab recipes", description="the recipes shipped with the package")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("list", help="names and one-line descriptions (the default)")
    show = sub.add_parser("show", help="print a recipe")
    show.add_argument("name")
    copy = sub.add_parser("copy", help="copy recipes into a folder, to edit them")
    copy.add_argument("names", nargs="*", help="recipe names (or --all)")
    copy.add_argument("--all", action="store_true", help="copy every shipped recipe")
    copy.add_argument("--to", default=".", help="destination folder (default: the current folder)")
    copy.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command in (None, "list"):
            folder = recipes_dir()
            for name in available_recipes():
                print(f"{name:<30} {_summary(folder / f'{name}.yaml')}")
            print(f"\n({folder}; `optlab sweep NAME --scale tiny` runs one, `optlab recipes copy NAME` copies it)")
            return 0
        if args.command == "show":
            print(find_recipe(args.name).read_text(), end="")
            return 0
        names = available_recipes() if args.all else args.names
        if not names:
            parser.error("copy: name at least one recipe, or pass --all")
        dest = Path(args.to).expanduser()
        sources = [find_recipe(n) for n in names]  # every name checked before anything is written
        dest.mkdir(parents=True, exist_ok=True)
        for src in sources:
            target = dest / src.name
            if target.exists() and not args.force:
                raise FileExistsError(f"{target} exists; pass --force to overwrite it")
            shutil.copyfile(src, target)
            print(f"copied {src.name} -> {target}")
        return 0
    except (FileNotFoundError, FileExistsError) as err:
        print(f"optlab recipes: {err}", file=sys.stderr)
        return 2
