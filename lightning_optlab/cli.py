"""The ``optlab`` command.

* ``optlab fit|validate|test --config recipe.yaml [--scale tiny|small|paper] [--optimizer.name soap ...]``:
  a :class:`~lightning.pytorch.cli.LightningCLI` over :class:`~lightning_optlab.lit.CausalLMModule`
  and :class:`~lightning_optlab.lit.LMDataModule`, whose ``optimizer`` group is the pack's
  :class:`~lightning_optlab.configure.OptimizerSpec` (LightningCLI's own optimizer groups are off);
* ``optlab check --config recipe.yaml``: a dry run that builds data, model and every optimizer of
  the recipe (and of its sweep) without training;
* ``optlab sweep recipe.yaml`` / ``optlab report RUNS_DIR``: :mod:`lightning_optlab.sweep`;
* ``optlab mup ...`` / ``optlab eval ...``: the μP and zero-shot evaluation tools;
* ``optlab demo``, ``optlab optimizers``.

Lightning is imported only by the subcommands that need it, so ``optlab optimizers`` is instant.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
import types
from typing import Any, Literal, Optional

from .optim.registry import ALIASES, available_optimizers

__all__ = ["main", "optlab_cli_class", "build_cli", "resolve_config_args", "check_config", "LIGHTNING_SUBCOMMANDS"]

#: the subcommands handled by LightningCLI
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")

#: subcommands implemented by other modules of the pack: name -> (module, what it does)
_DELEGATED = {
    "mup": ("lightning_optlab.mup.cli", "μP: coordinate checks, proxy -> target transfer, LR finder, LR-transfer experiment"),
    "eval": ("lightning_optlab.eval.cli", "zero-shot evaluation (ARC, HellaSwag, MMLU) of a checkpoint through lm-eval"),
    "sweep": ("lightning_optlab.sweep.cli", "run a recipe's grid (optimizers x hyperparameters x seeds), locally or on SLURM"),
    "report": ("lightning_optlab.sweep.cli", "plots and tables of a sweep folder: loss vs LR, stability width"),
    "data": ("lightning_optlab.data.cli", "prepare SRC... --tokenizer T --out DIR: tokenize once into token shards"),
    "recipes": ("lightning_optlab.recipe_files", "list, show or copy the shipped recipes (optlab sweep lr_sweep runs one)"),
    "export": ("lightning_optlab.export", "a checkpoint as a Hugging Face model folder (LlamaForCausalLM / GPT2LMHeadModel)"),
}


def _top_help() -> str:
    names = ", ".join(available_optimizers())
    lines = [
        "usage: optlab {fit,validate,test,check,sweep,report,data,recipes,mup,eval,export,demo,optimizers} ...",
        "",
        "lightning_optlab: train language models with modern optimizers and compare them honestly.",
        "",
        "commands:",
        "  fit, validate, test   LightningCLI: optlab fit --config recipes/lr_sweep.yaml --scale tiny "
        "--optimizer.name soap --optimizer.lr 3e-3",
        "  check                 dry run: build data, model and every optimizer of a recipe, no training",
    ]
    lines += [f"  {k:<21} {v[1]}" for k, v in _DELEGATED.items() if k not in ("mup", "eval", "export")]
    lines += [f"  {k:<21} {v[1]}" for k, v in _DELEGATED.items() if k in ("mup", "eval", "export")]
    lines += [
        "  demo                  train a tiny LLaMA on an embedded corpus with several optimizers and report",
        "  optimizers            list the registered optimizers and their aliases",
        "",
        f"optimizers (--optimizer.name): {names}",
        f"aliases: {', '.join(f'{a}->{n}' for a, n in sorted(ALIASES.items()))}",
        "",
        "recipes take --scale tiny (a CPU core, minutes), --scale small (~10 tokens per parameter on a CPU, hours) "
        "or --scale paper (the studies' set-up); "
        "`optlab <command> --help` for a command's options.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- demo / optimizers
def _demo_parser() -> argparse.ArgumentParser:
    names = ", ".join(available_optimizers())
    parser = argparse.ArgumentParser(
        prog="optlab",
        description=f"lightning_optlab: train language models with modern optimizers. Optimizers: {names}.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a tiny LLaMA on an embedded corpus with several optimizers and report")
    demo.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    demo.add_argument("--batch-size", type=int, default=8)
    demo.add_argument("--seq-len", type=int, default=128)
    demo.add_argument("--preset", default="llama-tiny", help="model preset (default llama-tiny)")
    demo.add_argument("--optimizers", default="", help="comma-separated demo runs (default: a selection of 6-8)")
    demo.add_argument("--out", default="optlab_runs/demo", help="output folder (default optlab_runs/demo)")
    demo.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 leaves torch's default)")
    sub.add_parser("optimizers", help="list the registered optimizers and their aliases")
    return parser


def _demo_main(argv: list[str]) -> int:
    args = _demo_parser().parse_args(argv)
    if args.command == "optimizers":
        for name in available_optimizers():
            aliases = sorted(a for a, n in ALIASES.items() if n == name)
            print(name + (f"  (aliases: {', '.join(aliases)})" if aliases else ""))
        return 0
    from .demo import DemoConfig, run_demo

    try:
        cfg = DemoConfig(
            steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, preset=args.preset,
            optimizers=[o for o in args.optimizers.split(",") if o], out_dir=args.out, threads=args.threads,
            warmup_steps=min(20, max(0, args.steps // 10)), val_every=max(1, min(25, args.steps // 4)),
        )
    except ValueError as err:
        print(f"optlab demo: {err}", file=sys.stderr)
        return 2
    run_demo(cfg)
    return 0


# --------------------------------------------------------------------------- LightningCLI
def _spec_from_namespace(ns: Any) -> Any:
    """The linked value of ``model.optimizer``: the ``optimizer`` group as it was parsed."""
    return ns


@functools.lru_cache(maxsize=1)
def optlab_cli_class() -> type:
    """The LightningCLI subclass (built on first use, so that ``import lightning_optlab.cli`` stays light)."""
    from lightning.fabric.plugins import TorchCheckpointIO
    from lightning.pytorch.cli import LightningCLI

    from .configure import OptimizerSpec, check_constructor_arguments

    class OptlabCLI(LightningCLI):
        """LightningCLI with the pack's ``OptimizerSpec`` as the ``optimizer`` group.

        ``--optimizer.name soap --optimizer.lr 3e-3`` (or an ``optimizer:`` block in YAML) fills
        an :class:`OptimizerSpec`, validated right after parsing (a bad value is a parser error
        naming it), and linked into ``CausalLMModule(optimizer=...)``. When the schedule needs
        ``total_steps`` and none is given, it is ``trainer.max_steps``.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            from .lit import CausalLMModule, LMDataModule

            kwargs.setdefault("auto_configure_optimizers", False)
            kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # a resumed run rewrites its config
            kwargs.setdefault("parser_kwargs", {"prog": "optlab"})
            super().__init__(CausalLMModule, LMDataModule, *args, **kwargs)

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            # predict is left out: CausalLMModule has no predict_step
            return {k: v for k, v in LightningCLI.subcommands().items() if k in LIGHTNING_SUBCOMMANDS}

        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.add_class_arguments(OptimizerSpec, "optimizer", instantiate=False)
            parser.link_arguments("optimizer", "model.optimizer", compute_fn=_spec_from_namespace)
            parser.add_argument(
                "--resume_override", type=Optional[Literal["optimizer"]], default=None,
                help="with --ckpt_path: apply changed optimizer hyperparameters and schedule (lr, betas, eps, "
                     "weight_decay, hparams, schedule, warmup_steps, total_steps, ...) to the restored optimizer "
                     "and report them; without it a resume whose settings differ from the checkpoint's is refused")
            names = ", ".join(available_optimizers())
            parser.description = (f"Train a language model with the pack's optimizers (--optimizer.name: {names}). "
                                  "Recipes: recipes/*.yaml with --scale tiny|small|paper.")

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            """The Trainer; ``fit`` gets a ``NonFiniteGuard(action="raise")`` when the config has none,
            so that no checkpoint is written with NaN weights (the guard refuses it) and a diverged run
            ends with an error instead of training on at NaN (as the sweeps do)."""
            trainer = super().instantiate_trainer(**kwargs)
            self._check_processes(trainer)
            from .callbacks.nonfinite import NonFiniteGuard
            from .callbacks.resume import ResumeCheck, SafeCheckpointIO

            if self.subcommand in ("fit", None):
                config = self.config[self.subcommand] if self.subcommand else self.config
                if not any(isinstance(c, ResumeCheck) for c in trainer.callbacks):
                    trainer.callbacks.append(ResumeCheck(override_optimizer=config.get("resume_override") == "optimizer"))
                if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's own plugin
                    trainer.strategy.checkpoint_io = SafeCheckpointIO()

            if self.subcommand == "fit" and not any(isinstance(c, NonFiniteGuard) for c in trainer.callbacks):
                from lightning.pytorch.callbacks import Checkpoint

                first_ckpt = next((i for i, c in enumerate(trainer.callbacks) if isinstance(c, Checkpoint)),
                                  len(trainer.callbacks))
                # before the checkpoint callbacks, as Lightning orders them: the guard checks first
                trainer.callbacks.insert(first_ckpt, NonFiniteGuard(action="raise", check_state=False))
            return trainer

        def _check_processes(self, trainer: Any) -> None:
            """Refuse, before training, several devices with a strategy that runs one process
            (``--trainer.devices 2 --trainer.strategy single_device`` would train on one)."""
            from lightning.pytorch.strategies import SingleDeviceStrategy

            config = self.config[self.subcommand] if self.subcommand else self.config
            from .memory import parallel_layout

            _, world = parallel_layout(_plain(config.get("trainer")) or {})
            if world > 1 and isinstance(trainer.strategy, SingleDeviceStrategy):
                t = config["trainer"]
                parser = self._subcommand_parsers[self.subcommand] if self.subcommand else self.parser
                parser.error(f"--trainer.devices {t.get('devices')} (x --trainer.num_nodes {t.get('num_nodes', 1)}) "
                             f"with --trainer.strategy {t.get('strategy')!r} runs one process on one device; use "
                             "--trainer.strategy ddp (or ddp_spawn, or launch with torchrun/srun) for several "
                             "processes, or --trainer.devices 1")

        def _parse_ckpt_path(self) -> None:
            """Check that ``ckpt_path`` is a readable checkpoint (a damaged or unsafe one is named here,
            before anything is built). Unlike LightningCLI's own, the checkpoint's hyperparameters do
            not replace the config's: :class:`ResumeCheck` compares them and refuses differences."""
            if not self.config.get("subcommand"):
                return
            config = self.config[self.config.subcommand]
            ckpt_path = config.get("ckpt_path")
            if not ckpt_path or str(ckpt_path) in ("last", "best", "hpc", "registry") or "://" in str(ckpt_path):
                return
            from .checkpoint import load_checkpoint

            load_checkpoint(ckpt_path, trust=config.get("weights_only") is False, mmap=True,
                            trust_hint="--weights_only false")

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            opt = config["optimizer"]
            max_steps = config["trainer"].get("max_steps", -1) if config.get("trainer") else -1
            if max_steps == 0 or (isinstance(max_steps, int) and max_steps < -1):
                parser = self._subcommand_parsers[self.subcommand] if self.subcommand else self.parser
                parser.error(f"--trainer.max_steps must be ≥ 1 (or -1 to train by max_epochs), got {max_steps}")
            if opt.get("total_steps") is None and opt.get("schedule", "constant") != "constant" and max_steps and max_steps > 0:
                opt["total_steps"] = max_steps
            try:
                spec = OptimizerSpec(**_plain(opt))
                check_constructor_arguments(spec)  # a misspelled hparam is a parser error, not a traceback
            except (ValueError, TypeError) as err:
                parser = self._subcommand_parsers[self.subcommand] if self.subcommand else self.parser
                parser.error(f"--optimizer: {err}")  # usage and the message, exit status 2
            from .schedules import warn_schedule

            warn_schedule(spec.schedule, warmup_steps=spec.warmup_steps, total_steps=spec.total_steps,
                          max_steps=max_steps if isinstance(max_steps, int) and max_steps > 0 else None)
            config["model"]["optimizer"] = opt.clone()

    # a module-level name for pickle (``--trainer.strategy ddp_spawn`` pickles what refers to the
    # class): ``lightning_optlab.cli.OptlabCLI`` resolves, through the module's ``__getattr__``, to
    # this same cached class
    OptlabCLI.__module__ = __name__
    OptlabCLI.__qualname__ = "OptlabCLI"
    return OptlabCLI


def build_cli(args: list[str], **kwargs: Any) -> Any:
    """``OptlabCLI(args=args, **kwargs)`` from Python; returns the CLI object.

    While the CLI runs, ``sys.argv`` is ``[the entry point, *args]``: the command line that
    re-enters the same subcommand with the same (resolved) arguments. Lightning's subprocess
    launcher (``--trainer.strategy ddp`` with several devices) starts ranks 1..N-1 as
    ``python <sys.argv[0]> sys.argv[1:]`` (or ``python -m <__main__'s module> sys.argv[1:]``), so
    every rank parses exactly what rank 0 parsed. ``sys.argv`` is restored afterwards.
    """
    saved = sys.argv
    # LightningCLI parses sys.argv[1:] when args is None: the same list, and no "both args and
    # sys.argv given" warning
    sys.argv = [saved[0] if saved and saved[0] else "optlab", *args]
    try:
        return optlab_cli_class()(args=None, **kwargs)
    finally:
        sys.argv = saved


def _plain(ns: Any) -> Any:
    """A jsonargparse Namespace (nested) as plain dicts and lists."""
    if hasattr(ns, "as_dict"):
        return ns.as_dict()
    return ns


def __getattr__(name: str) -> Any:
    if name == "OptlabCLI":
        return optlab_cli_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_config_args(argv: list[str]) -> list[str]:
    """Replace each ``--config RECIPE`` with the recipe resolved at ``--scale`` (default tiny).

    A recipe (a config with ``scales:`` or ``sweep:``) becomes a plain LightningCLI config, passed
    on as a YAML string; ``--scale`` is removed from the arguments. Plain configs pass unchanged.
    """
    import yaml

    from .sweep.recipe import RecipeYAMLError, is_recipe, load_yaml, resolve_recipe

    args, scale = [], None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--scale" and i + 1 < len(argv):
            scale, i = argv[i + 1], i + 2
            continue
        if a.startswith("--scale="):
            scale, i = a.split("=", 1)[1], i + 1
            continue
        args.append(a)
        i += 1
    out = []
    i = 0
    while i < len(args):
        a = args[i]
        path = None
        if a in ("--config", "-c") and i + 1 < len(args):
            path, i = args[i + 1], i + 2
        elif a.startswith("--config="):
            path, i = a.split("=", 1)[1], i + 1
        else:
            out.append(a)
            i += 1
            continue
        try:
            data = load_yaml(path)
        except RecipeYAMLError:
            raise  # the file exists: its YAML error (file, line, column) is the message
        except (OSError, ValueError):
            out += ["--config", path]  # let jsonargparse report it (or take it as a YAML string)
            continue
        if is_recipe(data):
            if scale is not None and not data.get("scales"):
                raise ValueError(f"--scale {scale}: {path} has no `scales:` section, so there is nothing to select; "
                                 "drop --scale (or add the scale to the recipe)")
            config, _ = resolve_recipe(data, scale)
            out += ["--config", yaml.safe_dump(config, sort_keys=False)]
        else:
            if scale is not None:
                raise ValueError(f"--scale {scale}: {path} is a plain config without `scales:`, so there is nothing "
                                 "to select; drop --scale, or pass a recipe that defines it")
            out += ["--config", path]
    if scale is not None and not any(x in ("--config", "-c") or x.startswith("--config=") for x in args):
        raise ValueError("--scale selects a section of a recipe; give the recipe with --config")
    return out


def _lightning_main(argv: list[str]) -> int:
    try:
        args = resolve_config_args(argv)
    except ValueError as err:
        print(f"optlab {argv[0]}: {err}", file=sys.stderr)
        return 2
    from .callbacks.resume import ResumeMismatchError
    from .checkpoint import CheckpointError

    try:
        build_cli(args)
    except SystemExit as exc:  # argparse errors and --help
        return int(exc.code or 0) if isinstance(exc.code, (int, type(None))) else 2
    except (CheckpointError, ResumeMismatchError) as err:  # a damaged, unsafe or mismatched resume
        print(f"optlab {argv[0]}: {err}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------- check (dry run)
#: trainer settings a dry run replaces, so that a GPU-cluster config can be checked on any machine
_CPU_TRAINER = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
                "--trainer.strategy", "auto", "--trainer.precision", "32-true"]


def check_config(config: dict[str, Any], *, sweep: dict[str, Any] | None = None, data: bool = True,
                 cpu: bool = True) -> dict[str, Any]:
    """Build the data, the model and the optimizer of ``config`` (and of each sweep run) without training.

    With ``cpu`` (default) the trainer is built for one CPU process (accelerator, devices, nodes,
    strategy and precision replaced), so that a paper-scale config can be checked on a laptop.

    Returns ``{"params": N, "vocab_size": V, "optimizers": {label: class name}, "points": n}``.
    Raises ``ValueError`` (or jsonargparse's parser error as ``SystemExit``) on a bad config.
    """
    import torch
    import yaml

    from .configure import OptimizerSpec, configure
    from .memory import memory_per_rank, parallel_layout
    from .sweep.recipe import SweepSpec, expand_points, point_config

    configs = {"(recipe)": config}
    n_points = 0
    if sweep:
        spec = SweepSpec.from_dict(sweep)
        points = expand_points(spec)
        n_points = len(points)
        for run in spec.runs:
            first = next(p for p in points if p.label == run.label)
            configs[run.label] = point_config(config, spec, first)
    out: dict[str, Any] = {"optimizers": {}, "points": n_points}
    for label, cfg in configs.items():
        args = ["--config", yaml.safe_dump(cfg, sort_keys=False)] + (_CPU_TRAINER if cpu else [])
        cli = build_cli(args, run=False, save_config_callback=None)
        module, dm = cli.model, cli.datamodule
        if data:
            dm.prepare_data()  # cached after the first run: shards and tokenizer are written once
            dm.setup("fit")
            if "batch_shape" not in out:
                out["batch_shape"] = tuple(next(iter(dm.train_dataloader())).shape)
            out.setdefault("vocab_size", dm.vocab_size)
        if module.model is None:
            # configure_model (μP included) sizes the model from the trainer's datamodule; outside fit,
            # hand it a stand-in that has only that, then detach it again
            module._trainer = types.SimpleNamespace(datamodule=dm if data else None)
            try:
                # on the meta device: shapes only, so that a 2.7B target is checked in seconds
                with torch.device("meta"):
                    module.configure_model()
            finally:
                module._trainer = None
        assert isinstance(module.spec, OptimizerSpec)
        opt = configure(module, module.spec)["optimizer"]
        out["optimizers"][label] = type(opt).__name__
        out.setdefault("params", sum(p.numel() for p in module.parameters()))
        out.setdefault("max_steps", cli.trainer.max_steps)
        strategy, world = parallel_layout(cfg.get("trainer") or {})
        out.setdefault("memory", {})[label] = memory_per_rank(module.parameters(), opt, strategy=strategy,
                                                               world_size=world)
    return out


def _check_main(argv: list[str]) -> int:
    from .sweep.recipe import load_yaml, resolve_recipe

    parser = argparse.ArgumentParser(prog="optlab check", description="dry run: build data, model and every optimizer "
                                     "of a recipe (and of its sweep runs) without training")
    parser.add_argument("--config", "-c", required=True, help="recipe or LightningCLI config (YAML)")
    parser.add_argument("--scale", default=None, help="tiny (default), small or paper")
    parser.add_argument("--no-data", action="store_true", help="do not prepare the data (model and optimizers only)")
    args = parser.parse_args(argv)
    try:
        config, sweep = resolve_recipe(load_yaml(args.config), args.scale)
        info = check_config(config, sweep=sweep, data=not args.no_data)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"optlab check: {err}", file=sys.stderr)
        return 2
    vocab = info.get("vocab_size") or "of the preset (data not prepared)"
    print(f"{args.config}: {info['params']:,} parameters, vocab {vocab}, "
          f"max_steps {info['max_steps']}, sweep points {info['points']}")
    for label, cls_name in info["optimizers"].items():
        print(f"  {label}: {cls_name}")
    from .memory import format_memory_table

    print("memory per rank (estimate: weights, gradients and optimizer state in the model's dtype; activations "
          "not included; FSDP2 shards weights, gradients and element-wise state; the whole-tensor methods (SOAP, "
          "Shampoo, Muon, Adafactor, Adalayer, Adam-mini) keep each parameter's state and factors on its owner rank, "
          "under DDP too, balanced by cost, so about 1/world each):")
    print(format_memory_table(info["memory"]))
    sharded = [e for e in info["memory"].values() if e.strategy == "fsdp2" and e.world_size > 1]
    if sharded:
        worst = max(sharded, key=lambda e: e.total)
        print(f"  replicated (DDP) instead, a rank would hold ~{worst.total * worst.world_size / 2**30:.1f} GiB "
              "of the largest run")
    return 0


# --------------------------------------------------------------------------- dispatch
def _delegate(command: str, argv: list[str]) -> int:
    module_name = _DELEGATED[command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            print(f"optlab {command}: {module_name} is not available in this installation ({err}); "
                  f"`optlab {command}` needs it", file=sys.stderr)
            return 2
        raise
    entry = getattr(module, "main", None)
    if entry is None:
        print(f"optlab {command}: {module_name} has no main(argv)", file=sys.stderr)
        return 2
    if command in ("sweep", "report"):
        return int(entry([command, *argv]) or 0)
    return int(entry(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``optlab`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help())
        return 0 if argv else 2
    command = argv[0]
    try:
        return _dispatch(argv)
    except ModuleNotFoundError as err:
        from ._extras import missing_extra

        hint = missing_extra(err)
        if hint is None:
            raise
        print(f"optlab {command}: {hint}", file=sys.stderr)  # one line, no traceback
        return 2


def _dispatch(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    if command in ("demo", "optimizers"):
        return _demo_main(argv)
    if command in LIGHTNING_SUBCOMMANDS:
        return _lightning_main(argv)
    if command == "check":
        return _check_main(rest)
    if command in _DELEGATED:
        return _delegate(command, rest)
    print(_top_help(), file=sys.stderr)
    print(f"\noptlab: unknown command {command!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    # ``python -m lightning_optlab.cli``: run the imported module, not this ``__main__`` copy, so that
    # the CLI class has one identity (``lightning_optlab.cli.OptlabCLI``, what ddp_spawn pickles)
    from lightning_optlab.cli import main as _main

    sys.exit(_main())
