"""One optimizer that runs a different algorithm per parameter role.

The studies' hybrids (SGD everywhere but Adalayer on the readout and norms; Muon on hidden
matrices with AdamW elsewhere) need several algorithms, while Lightning's automatic
optimization, LR schedulers and checkpoints want a single ``torch.optim.Optimizer`` with one
``state_dict``. :class:`OptimizerMix` is that optimizer: it owns child optimizers over disjoint
parameter sets and exposes their param groups (the same dict objects, so an LR scheduler that
edits ``group["lr"]`` drives the children) and a merged state.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch

from .base import call_closure, iter_leaf_optimizers
from .health import torch_optimizer_health

__all__ = ["OptimizerMix"]


class OptimizerMix(torch.optim.Optimizer):
    """A single optimizer over several child optimizers with disjoint parameters.

    Args:
        children: the child optimizers, already built (each over its own parameters).
        names: optional labels for the children (e.g. their algorithm names), used in errors and
            in :meth:`health`.

    ``step(closure)`` evaluates the closure once and steps every child. ``state_dict()`` has the
    standard layout (parameters numbered across the children in order), so Lightning's
    checkpointing and device moves work unchanged; ``load_state_dict`` splits it back.

    Example:
        >>> sgd = SGD(other_params, lr=0.1, momentum=0.98)
        >>> ada = Adalayer([{"params": head.parameters(), "role": "readout"}], lr=3e-3)
        >>> opt = OptimizerMix([sgd, ada], names=["sgd", "adalayer"])
    """

    def __init__(self, children: Sequence[torch.optim.Optimizer], names: Sequence[str] | None = None) -> None:
        children = list(children)
        if not children:
            raise ValueError("OptimizerMix needs at least one child optimizer, got none")
        names = list(names) if names is not None else [type(c).__name__.lower() for c in children]
        if len(names) != len(children):
            raise ValueError(f"got {len(names)} names for {len(children)} child optimizers")
        seen: dict[int, str] = {}
        for name, child in zip(names, children):
            if not isinstance(child, torch.optim.Optimizer):
                raise TypeError(f"child {name!r} is not a torch.optim.Optimizer: {type(child).__name__}")
            for group in child.param_groups:
                for p in group["params"]:
                    if id(p) in seen:
                        raise ValueError(
                            f"a parameter of shape {tuple(p.shape)} is given to both {seen[id(p)]!r} and {name!r}; "
                            "each parameter (role) must have exactly one algorithm"
                        )
                    seen[id(p)] = name
        # The base initializer sets hooks and defaults; it is given a throwaway copy of the
        # groups and then pointed at the children's own group dicts.
        all_params = [p for c in children for g in c.param_groups for p in g["params"]]
        super().__init__([{"params": all_params}], defaults={"lr": children[0].param_groups[0]["lr"]})
        self.children = children
        self.child_names = names
        self.param_groups = [g for c in children for g in c.param_groups]

    # ``state`` is a merged view of the children's states (inner dicts shared, so Lightning's
    # in-place device moves reach the children); assignments by the base class are ignored.
    @property
    def state(self) -> dict[torch.Tensor, Any]:  # type: ignore[override]
        merged: dict[torch.Tensor, Any] = {}
        for child in getattr(self, "children", []):
            merged.update(child.state)
        return merged

    @state.setter
    def state(self, value: Any) -> None:
        pass

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Evaluate ``closure`` once (if given), then step every child."""
        loss = call_closure(closure)
        for child in self.children:
            child.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for child in self.children:
            child.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "children"):  # called by the base initializer
            return super().add_param_group(param_group)
        raise RuntimeError("add a param group to one of OptimizerMix.children instead of the mix")

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for child in self.children:
            sd = child.state_dict()
            n = sum(len(g["params"]) for g in sd["param_groups"])
            for g in sd["param_groups"]:
                g = dict(g)
                g["params"] = [i + offset for i in g["params"]]
                groups.append(g)
            for i, s in sd["state"].items():
                state[i + offset] = s
            offset += n
        return {"state": state, "param_groups": groups, "mix_sizes": [len(c.param_groups) for c in self.children]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        sizes = state_dict.get("mix_sizes", [len(c.param_groups) for c in self.children])
        expected = [len(c.param_groups) for c in self.children]
        if list(sizes) != expected or len(groups) != sum(expected):
            raise ValueError(
                f"state_dict has param groups per child {list(sizes)}, this OptimizerMix has {expected}; "
                "was it saved from a mix with the same roles and algorithms?"
            )
        start = 0
        for child, n_groups in zip(self.children, expected):
            # torch's loader pairs saved ids with parameters by position, so the ids are kept as
            # they are: integers from state_dict(), parameter names from torch's distributed
            # checkpoint (set_optimizer_state_dict)
            sub_groups = [copy.copy(g) for g in groups[start : start + n_groups]]
            ids = {i for g in sub_groups for i in g["params"]}
            sub_state = {i: s for i, s in state_dict["state"].items() if i in ids}
            child.load_state_dict({"state": sub_state, "param_groups": sub_groups})
            start += n_groups
        self.param_groups = [g for c in self.children for g in c.param_groups]

    def health(self) -> dict[str, float]:
        """The children's health statistics, merged.

        Parameter names (``param_names`` in the groups, as the configurator sets) are unique across
        children; unnamed parameters are prefixed with their child's label to keep them apart.
        """
        out: dict[str, float] = {}
        for name, child in zip(self.child_names, self.children):
            stats = child.health() if hasattr(child, "health") else torch_optimizer_health(child)
            if not all("param_names" in g for g in child.param_groups):
                stats = {f"{name}:{k}": v for k, v in stats.items()}
            out.update(stats)
        return out

    def pop_nonfinite_skips(self) -> list[str]:
        """The children's non-finite skips since the last call (see ``OptlabOptimizer.pop_nonfinite_skips``)."""
        return [name for leaf in iter_leaf_optimizers(self.children) if hasattr(leaf, "pop_nonfinite_skips")
                for name in leaf.pop_nonfinite_skips()]

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}: {type(c).__name__}" for n, c in zip(self.child_names, self.children))
        return f"OptimizerMix({inner})"
