"""What every optimizer of the pack shares, written once, and the traits the rest of the pack reads.

:class:`OptlabOptimizer` is a mixin placed before ``torch.optim.Optimizer`` (or before one of
torch's own optimizers) in a class's bases. It owns

* the step prologue: the closure under ``enable_grad``, the refusal of sparse gradients, and the
  screening of non-finite gradients by the group option ``nonfinite``:
  ``"skip"`` (the parameter and its state are left as they were, the skip is counted and
  reported), ``"raise"`` (:class:`NonFiniteGradientError` naming the parameter) or ``"ignore"``
  (no check, no device read). Skips are *reported*: :meth:`OptlabOptimizer.pop_nonfinite_skips`
  hands them to whoever watches the run (the Lightning ``NonFiniteGuard`` reads it after every
  step), so a skipped step is never silent;
* one sharding policy (:func:`sharding_problem`): an optimizer whose traits say it needs whole
  tensors refuses shards (sharded DTensors, FSDP1 flat parameters) and accepts replicated DTensors;
* float32 state for bfloat16/float16 parameters (:meth:`OptlabOptimizer.state_dtype`) and the
  ``load_state_dict`` that keeps it float32 (torch's loader casts state to the parameter's dtype);
* parameter naming (:func:`param_name`, from the groups' ``param_names``);
* per-group validation of every declared hyperparameter: each optimizer declares a kw-only
  :class:`HParams` dataclass whose ``__post_init__`` checks each field; every param group, those
  given to the constructor and those added later, is checked against it.

Traits (:class:`Traits`, the class attribute ``traits``) say what the configurator, μP, the
callbacks and the LightningModule need to know: the μP family and which group keys scale like
the gradient (ε), whether the method takes only matrices, whether its first step only
initializes, whether it needs whole tensors, whether it keeps float32 state, whether it replaces
the LR schedule, whether it has an evaluation mode (``eval()``/``train()``). Behaviour the others
call is a method with a no-op default: :meth:`~OptlabOptimizer.training_step_hook` (Sophia's
curvature estimate), :meth:`~OptlabOptimizer.effective_lr` and ``health()``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional

import torch
from torch import Tensor

from ._validate import (  # re-exported: the checks an optimizer's HParams.check uses
    check_beta,
    check_betas,
    check_eps,
    check_lr,
    check_positive_int,
    check_range,
    check_weight_decay,
    rollback_group,
)
from .distributed import DISTRIBUTE_MODES, Distributor, default_cost, is_sharded, world_info
from .health import named_params

__all__ = [
    "NONFINITE_POLICIES",
    "NonFiniteGradientError",
    "HParams",
    "call_closure",
    "Traits",
    "OptlabOptimizer",
    "check_beta",
    "check_betas",
    "check_bool",
    "check_choice",
    "check_eps",
    "check_lr",
    "check_positive_int",
    "check_range",
    "check_weight_decay",
    "iter_leaf_optimizers",
    "optimizer_traits",
    "param_name",
    "run_training_step_hooks",
    "sharding_problem",
    "looks_flattened",
]

#: values of the group option ``nonfinite``
NONFINITE_POLICIES = ("skip", "raise", "ignore")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


class NonFiniteGradientError(FloatingPointError, ValueError):
    """A gradient held a NaN or an Inf and its group's ``nonfinite`` option is ``"raise"``.

    A ``FloatingPointError`` and a ``ValueError``: code written for either keeps working.
    """


def call_closure(closure: Optional[Callable[[], Any]]) -> Any:
    """The step prologue's first part: the closure's loss, evaluated with gradients enabled (None without one)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def check_bool(name: str, value: Any) -> None:
    """``value`` is True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """``value`` is one of ``allowed``."""
    if not any(value == a and type(value) is type(a) for a in allowed):
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


@dataclass(kw_only=True)
class HParams:
    """Base of the per-optimizer hyperparameter dataclasses: fields are group keys, each with a
    one-line doc, checked in ``__post_init__`` (override :meth:`check`). ``nonfinite`` is shared."""

    #: non-finite gradient policy: "skip", "raise" or "ignore" (see the module docstring)
    nonfinite: str = "ignore"

    def __post_init__(self) -> None:
        check_choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        self.check()

    def check(self) -> None:
        """Reject bad values with the allowed range in the message (subclasses)."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The declared hyperparameters (group keys), the shared ``nonfinite`` last."""
        own = [f.name for f in dataclasses.fields(cls) if f.name != "nonfinite"]
        return (*own, "nonfinite")

    @classmethod
    def check_group(cls, group: Mapping[str, Any]) -> None:
        """Check the declared keys a param group holds."""
        cls(**{k: group[k] for k in cls.names() if k in group})


@dataclass(frozen=True, kw_only=True)
class Traits:
    """What the rest of the pack reads about an optimizer class (declared as ``traits = Traits(...)``)."""

    #: μP rule family (see :mod:`lightning_optlab.mup.rules`), None: no μP rule
    mup_family: Optional[str] = None
    #: group keys that are added to a square root of second moments (they scale like the gradient,
    #: so μP divides them by the fan-in multiplier as it does η)
    mup_eps_keys: tuple[str, ...] = ()
    #: takes 2-D hidden matrices only (route the other roles elsewhere through the per-role mix)
    matrix_only: bool = False
    #: its first step only initializes state (the parameters do not move)
    first_step_initializes: bool = False
    #: needs whole tensors on every rank (a shard would change the update): shards are refused
    whole_tensors: bool = False
    #: keeps float32 state for bfloat16/float16 parameters
    float32_state: bool = False
    #: replaces the LR schedule (only "constant" with warmup makes sense)
    replaces_schedule: bool = False
    #: has ``eval()``/``train()``: the weights to evaluate and checkpoint differ from the training ones
    eval_mode: bool = False
    #: the default of the ``nonfinite`` group option
    nonfinite: str = "ignore"
    #: non-finite skips are counted in the parameter's state (``state["nonfinite_skips"]``), not on the optimizer
    skips_in_state: bool = False
    #: sparse gradients are handled by the update itself (torch's SGD, Adagrad): not refused here
    sparse_ok: bool = False


def param_name(optimizer: torch.optim.Optimizer, p: Tensor) -> str:
    """The name of ``p`` in ``optimizer`` (its group's ``param_names``, else ``group{i}.param{j}``)."""
    for name, q, _ in named_params(optimizer):
        if q is p:
            return name
    return "an unknown parameter"


def _group_param_names(group: Mapping[str, Any], gi: int) -> Iterator[tuple[str, Any]]:
    """(name, param) of a param group as given (params may still be (name, tensor) pairs)."""
    names = group.get("param_names")
    for j, p in enumerate(group["params"]):
        if isinstance(p, tuple):
            yield p[0], p[1]
        else:
            yield (names[j] if names is not None and j < len(names) else f"group{gi}.param{j}"), p


def sharding_problem(p: Tensor) -> Optional[str]:
    """Why ``p`` is not a whole tensor on this rank, or None.

    A DTensor with any non-replicated placement (FSDP2, tensor parallelism) and FSDP1's flat
    parameters are shards; a DTensor replicated on every rank holds the whole tensor and is fine.
    """
    placements = getattr(p, "placements", None)  # torch.distributed.tensor.DTensor (duck-typed)
    if placements is not None and not all(getattr(pl, "is_replicate", lambda: False)() for pl in placements):
        return f"a DTensor with placements {tuple(placements)} (FSDP2 or tensor parallel)"
    if type(p).__name__ == "FlatParameter" or getattr(p, "_fsdp_flattened", False):
        return "an FSDP1 FlatParameter (FSDP with use_orig_params=False)"
    return None


def looks_flattened(p: Tensor) -> bool:
    """A 1-D tensor viewing a larger storage: what FSDP1 with use_orig_params=True hands the optimizer."""
    return p.dim() == 1 and p.untyped_storage().nbytes() > p.numel() * p.element_size()


def _finite_flags(grads: list[Tensor]) -> list[bool]:
    """Which gradients are finite, with one device read.

    Exact (no overflow): the min and max of a gradient are NaN or ±inf exactly when it has a
    non-finite entry; per-tensor ``aminmax`` on the CPU (there ~10x faster than the foreach
    norm's fallback), one multi-tensor max-abs norm on accelerators.
    """
    if grads[0].device.type == "cpu":
        extremes = [v.float() for g in grads for v in torch.aminmax(g)]
        return torch.isfinite(torch.stack(extremes).view(-1, 2)).all(1).tolist()
    norms = torch._foreach_norm(grads, math.inf)
    return torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).tolist()


class OptlabOptimizer(torch.optim.Optimizer):
    """The pack's optimizer base (a mixin before ``torch.optim.Optimizer`` or one of torch's optimizers).

    Subclasses declare ``hparams_class`` (an :class:`HParams` dataclass) and ``traits``, and
    implement :meth:`_update` (the step for every parameter whose ``.grad`` is not None), or,
    for torch's own optimizers, leave :meth:`_update` to call the torch step.
    """

    hparams_class: ClassVar[type[HParams]] = HParams
    traits: ClassVar[Traits] = Traits()

    # ------------------------------------------------------------------ groups and validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, then the declared checks on the new group and the sharding policy; a bad group is not kept."""
        param_group.setdefault("nonfinite", self._default_nonfinite())
        gi = len(self.param_groups)
        with rollback_group(self):
            super().add_param_group(param_group)
            group = self.param_groups[-1]
            try:
                self.hparams_class.check_group(group)
            except ValueError as err:
                raise ValueError(f"param group {gi}: {err}") from None
            if self.traits.whole_tensors:
                for name, p in _group_param_names(group, gi):
                    problem = sharding_problem(p)
                    if problem and not is_sharded(p):  # DTensor shards are gathered on owner ranks
                        raise ValueError(
                            f"{type(self).__name__} needs whole tensors, but parameter {name!r} is {problem}. "
                            "Use FSDP2 (torch.distributed.fsdp.fully_shard, Lightning's ModelParallelStrategy: its "
                            "DTensor shards are gathered on an owner rank) or DDP, or give these parameters to "
                            "AdamW through the per-role mix."
                        )

    def _default_nonfinite(self) -> str:
        # the constructor's value: in the defaults, or (torch's own optimizers build their defaults
        # themselves) set on the instance before torch's initializer runs
        return self.defaults.get("nonfinite", getattr(self, "_nonfinite_default", self.traits.nonfinite))

    #: constructor keywords that are not group keys (e.g. Adam-mini's n_heads, Muon's scale)
    constructor_options: ClassVar[tuple[str, ...]] = ()
    #: declared group keys the constructor does not take (set through another keyword or per group only)
    group_only: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def constructor_arguments(cls) -> tuple[str, ...]:
        """The keywords the constructor takes besides ``params``: what a spec's ``hparams`` may hold."""
        return tuple(k for k in cls.hparams_class.names() if k not in cls.group_only) + tuple(cls.constructor_options)

    @classmethod
    def hparam_defaults(cls) -> dict[str, Any]:
        """The declared hyperparameters' defaults (what a group gets when nothing is set)."""
        return {f.name: f.default for f in dataclasses.fields(cls.hparams_class) if f.default is not dataclasses.MISSING}

    @classmethod
    def mup_family_for(cls, hparams: Mapping[str, Any]) -> str:
        """The μP rule family for these settings; raises (naming the fix) where there is none."""
        if cls.traits.mup_family is None:
            raise ValueError(
                f"optimizer {cls.__name__} declares no μP rule (traits.mup_family); turn mup off for it, or route "
                "its roles to an optimizer with one through a mix part"
            )
        return cls.traits.mup_family

    # ---------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One optimization step for every parameter with a (finite, under ``"skip"``) gradient;
        ``closure`` re-evaluates the model and returns the loss."""
        loss = call_closure(closure)
        hidden = self._screen_gradients()
        try:
            distributor = self.distributor()
            if distributor is None:
                self._update()
            else:
                distributor.step(self._update)
        finally:
            for p, g in hidden:
                p.grad = g
        return loss

    def _update(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ distribution (owner ranks)
    #: ``"owner"``: under several ranks, each parameter's update is computed on one owner rank and
    #: shared (optimizers with the ``whole_tensors`` trait); ``"replicate"``: every rank computes
    #: every update (DDP only). See :mod:`lightning_optlab.optim.distributed`.
    distribute: str = "owner"

    def distributor(self) -> Optional[Distributor]:
        """The owner-rank step of this optimizer, or None (one process, no whole-tensor trait, or
        ``distribute="replicate"``, which refuses sharded parameters here, naming one)."""
        if not self.traits.whole_tensors:
            return None
        if self.distribute not in DISTRIBUTE_MODES:
            raise ValueError(f"{type(self).__name__}.distribute must be one of "
                             f"{', '.join(map(repr, DISTRIBUTE_MODES))}, got {self.distribute!r}")
        world = world_info()
        if self.distribute == "replicate" or world is None:
            sharded = next(((name, p) for name, p, _ in named_params(self) if is_sharded(p)), None)
            if sharded is None:
                return None
            world = world_info(min_world=1)  # a one-rank FSDP2 mesh: its shards are whole tensors
            if self.distribute == "replicate" or world is None:
                why = "distribute='replicate'" if world else "no process group is initialized"
                raise ValueError(
                    f"{type(self).__name__} got the shard {sharded[0]!r} (placements {tuple(sharded[1].placements)}) "
                    f"but would compute whole-tensor updates from local shards ({why}); use distribute='owner' "
                    "(the default) under FSDP2"
                )
        d = self.__dict__.get("_optlab_distributor")
        if d is None or (d.rank, d.world) != world:
            d = self.__dict__["_optlab_distributor"] = Distributor(self, *world)
        return d

    def distributed_cost(self, p: Tensor, group: Mapping[str, Any]) -> float:
        """The preconditioner work of ``p`` (its logical shape), which balances owner ranks.
        Default: one eigendecomposition per dimension up to the group's ``max_precond_dim``."""
        return default_cost(tuple(p.shape), group.get("max_precond_dim"))

    def _screen_gradients(self) -> list[tuple[Tensor, Tensor]]:
        """Refuse sparse gradients; apply each group's ``nonfinite`` policy. Returns the
        (parameter, gradient) pairs hidden from this step (``.grad`` set to None)."""
        checked: list[tuple[dict[str, Any], Tensor]] = []
        sparse_ok = self.traits.sparse_ok
        for group in self.param_groups:
            check = group["nonfinite"] != "ignore"
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if not sparse_ok and g.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if check and g.numel():
                    checked.append((group, p))
        if not checked:
            return []
        grads = [p.grad.to_local() if is_sharded(p.grad) else p.grad for _, p in checked]
        flags = _finite_flags(grads)
        if any(is_sharded(p.grad) for _, p in checked) and world_info() is not None:
            # each rank saw its shards only: a parameter is finite when it is finite on every rank
            agreed = torch.tensor(flags, dtype=torch.int32, device=grads[0].device)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
            flags = [bool(f) for f in agreed.tolist()]
        if all(flags):
            return []
        hidden = []
        for (group, p), ok in zip(checked, flags):
            if ok:
                continue
            name = param_name(self, p)
            if group["nonfinite"] == "raise":
                raise NonFiniteGradientError(
                    f"non-finite gradient in parameter {name!r} (shape {tuple(p.shape)}); lower the learning rate, "
                    "clip gradients or check the loss for overflow, or set the group option nonfinite='skip'"
                )
            self._count_skip(p)
            self._pending_skips.append(f"parameter {name}")
            hidden.append((p, p.grad))
            p.grad = None
        return hidden

    @property
    def _pending_skips(self) -> list[str]:
        if "_optlab_skips" not in self.__dict__:
            self.__dict__["_optlab_skips"] = []
        return self.__dict__["_optlab_skips"]

    def _count_skip(self, p: Tensor) -> None:
        if self.traits.skips_in_state:
            state = self.state[p]
            state["nonfinite_skips"] = state.get("nonfinite_skips", 0) + 1
        else:
            counts = self.__dict__.setdefault("_optlab_skip_counts", {})
            counts[id(p)] = counts.get(id(p), 0) + 1

    def report_nonfinite(self, what: str) -> None:
        """Report a non-finite value this optimizer skipped outside ``step`` (e.g. in an estimate)."""
        self._pending_skips.append(what)

    def pop_nonfinite_skips(self) -> list[str]:
        """What was skipped for non-finite values since the last call ("parameter <name>", or an estimate)."""
        out = list(self._pending_skips)
        self._pending_skips.clear()
        return out

    @property
    def nonfinite_skips(self) -> int:
        """Parameter updates skipped because their gradient was not finite (since construction or load)."""
        if self.traits.skips_in_state:
            return sum(int(s.get("nonfinite_skips", 0)) for s in self.state.values())
        return sum(self.__dict__.get("_optlab_skip_counts", {}).values())

    # ------------------------------------------------------------------------- state dtype
    @classmethod
    def state_dtype(cls, p: Tensor) -> torch.dtype:
        """float32 for a bfloat16/float16 parameter when the optimizer keeps float32 state, else its dtype."""
        return torch.float32 if cls.traits.float32_state and p.dtype in _LOW_PRECISION else p.dtype

    def state_dict(self) -> dict[str, Any]:
        """torch's; with owner ranks, the state of every owner (a collective: call it on every rank),
        so that the dict is the one a single process would save."""
        sd = super().state_dict()
        distributor = self.distributor()
        if distributor is not None:
            sd["state"] = distributor.gather_state(sd["state"])
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, keeping float32 state of low-precision parameters float32 (torch would cast it to the
        parameter's dtype), and filling group keys the saved groups lack with this optimizer's defaults.
        With owner ranks each rank keeps the state of the parameters it owns."""
        self._load_state_dict(state_dict)
        distributor = self.distributor()
        if distributor is not None:
            distributor.drop_unowned()

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, val in self.defaults.items():
                group.setdefault(key, val)
            group.setdefault("nonfinite", self._default_nonfinite())
        if not self.traits.float32_state:
            return
        saved = state_dict["state"]
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(saved_group["params"], group["params"]):
                if p.dtype in _LOW_PRECISION and pid in saved:
                    self.state[p] = _to_device(saved[pid], p.device)

    # ------------------------------------------------------------------- hooks (no-op defaults)
    @classmethod
    def training_step_hook(cls, optimizers: list["OptlabOptimizer"], *, logits: Optional[Tensor] = None,
                           loss: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> bool:
        """Work the training step does for these optimizers (of this class) between the forward pass
        and ``loss.backward()``; True when something was done. Default: nothing."""
        return False

    def effective_lr(self, p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Optional[Tensor]:
        """Per-coordinate effective learning rate of ``p`` where the method has one (diagonal methods), else None."""
        return None


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device=device, copy=True)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


# ------------------------------------------------------------------------- walking optimizers
def iter_leaf_optimizers(obj: Any) -> Iterator[torch.optim.Optimizer]:
    """The optimizers that do the work in ``obj``: itself, behind wrappers with an ``.optimizer``
    (Lightning's ``LightningOptimizer``), inside lists, and the ``children`` of a per-role mix."""
    stack = [obj]
    while stack:
        o = stack.pop(0)
        if isinstance(o, (list, tuple)):
            stack[:0] = list(o)
            continue
        inner = getattr(o, "optimizer", None)  # Lightning's wrapper (itself a subclass of the wrapped class)
        if inner is not None and inner is not o:
            stack.insert(0, inner)
            continue
        children = getattr(o, "children", None)
        if isinstance(children, (list, tuple)) and children and all(isinstance(c, torch.optim.Optimizer) for c in children):
            stack[:0] = list(children)
            continue
        if not isinstance(o, torch.optim.Optimizer):
            raise TypeError(f"expected an optimizer (or Lightning's wrapper of one), got {type(o).__name__}")
        yield o


def optimizer_traits(opt: Any) -> Traits:
    """The declared traits of an optimizer or optimizer class (defaults for one that declares none)."""
    traits = getattr(opt if isinstance(opt, type) else type(opt), "traits", None)
    return traits if isinstance(traits, Traits) else Traits()


def run_training_step_hooks(optimizer: Any, *, logits: Optional[Tensor] = None, loss: Optional[Tensor] = None,
                            generator: Optional[torch.Generator] = None) -> bool:
    """Run every leaf optimizer's :meth:`~OptlabOptimizer.training_step_hook` (once per class, over
    its instances): call between the forward pass and ``loss.backward()``. True when any acted."""
    by_class: dict[type, list[Any]] = {}
    for leaf in iter_leaf_optimizers(optimizer):
        hook = getattr(type(leaf), "training_step_hook", None)
        if hook is not None:
            by_class.setdefault(type(leaf), []).append(leaf)
    acted = False
    for cls, leaves in by_class.items():
        acted = bool(cls.training_step_hook(leaves, logits=logits, loss=loss, generator=generator)) or acted
    return acted
