"""Small, deterministic training runs for μP checks: byte-level batches of the embedded corpus and a plain loop.

No Lightning, no tokenizer training, no network: tokens are the UTF-8 bytes of CPython's bundled
documentation (the pack's embedded corpus), so a model with ``vocab_size=256`` reads them directly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ..models import TransformerLM, build_model, resolve_config
from ..optim.base import iter_leaf_optimizers, optimizer_traits, run_training_step_hooks
from .shapes import build_mup_model

__all__ = ["corpus_tokens", "fixed_batches", "width_model", "train_run"]


def corpus_tokens(limit: int = 2_000_000) -> Tensor:
    """The embedded corpus as a 1-D uint8-valued long tensor of UTF-8 bytes (first ``limit`` bytes)."""
    from ..data.corpus import embedded_corpus

    data = "\n\n".join(text for _, text in embedded_corpus()).encode("utf-8")[:limit]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def fixed_batches(n: int, batch_size: int, seq_len: int, seed: int, offset: int = 0) -> list[Tensor]:
    """``n`` batches ``(batch_size, seq_len + 1)`` of random windows of the corpus (seeded).

    ``offset`` selects the region: windows start in the first 90% of the corpus for offset 0
    (training) and in the last 10% for offset 1 (held out).
    """
    tokens = corpus_tokens()
    split = int(0.9 * len(tokens))
    lo, hi = (0, split - seq_len - 1) if offset == 0 else (split, len(tokens) - seq_len - 1)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        starts = torch.randint(lo, hi, (batch_size,), generator=gen)
        out.append(torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()]))
    return out


def width_model(
    model: Any, width: int, *, mup: bool, base_width: int, seed: int, depth: int | None = None,
    base_depth: int | None = None, depth_rule: str = "none", head_dim: int | None = None, **overrides: Any,
) -> TransformerLM:
    """``model`` (preset/config/mapping) at ``width`` and ``depth`` layers (default the preset's), in μP
    relative to ``base_width`` (and, with a ``depth_rule``, to ``base_depth`` layers) or SP.

    The head count is kept (the head size grows with width), or with ``head_dim`` the head size is kept
    and the head count is ``width / head_dim`` at every width, the base included, as model families grow.
    """
    cfg = resolve_config(model, **overrides)
    if head_dim is not None:
        if width % head_dim or base_width % head_dim:
            raise ValueError(f"head_dim {head_dim} must divide the width {width} and the base width {base_width}")
        cfg = dataclasses.replace(cfg, n_head=width // head_dim, n_kv_head=None)
    if width % cfg.n_head:
        raise ValueError(f"width {width} is not divisible by n_head ({cfg.n_head}); pick widths that are")
    cfg = dataclasses.replace(cfg, n_embd=width, n_layer=cfg.n_layer if depth is None else depth)
    if depth_rule != "none" and not mup:
        raise ValueError(f"depth_rule={depth_rule!r} is a μP option: use it with mup=True")
    torch.manual_seed(seed)
    if not mup:
        return build_model(cfg)
    base: Any = base_width
    if head_dim is not None:  # the proxy itself as the base: its head count is base_width / head_dim
        base = dataclasses.replace(cfg, n_embd=base_width, n_head=base_width // head_dim,
                                   mlp_hidden=None if cfg.mlp_hidden is None else cfg.mlp_hidden * base_width // width)
    return build_mup_model(cfg, base=base, depth=depth_rule,
                           base_depth=(base_depth or cfg.n_layer) if depth_rule != "none" else None)


def train_run(
    model: nn.Module, make_optimizer: Callable[[nn.Module], Any], batches: Iterator[Tensor] | list[Tensor],
    steps: int, *, on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``steps`` steps on ``batches`` (cycled); return the training losses. Stops early on a non-finite loss.

    ``make_optimizer(model)`` returns an optimizer, or what ``configure`` returns (optimizer and LR
    scheduler, stepped after every optimizer step). Each optimizer's training-step hook runs between
    the forward pass and the backward, as in the LightningModule (Sophia's curvature estimate, its
    labels drawn from a generator seeded by the step); at the end, optimizers with an evaluation
    mode (Schedule-Free) are switched to it, so the model holds the weights to evaluate.
    """
    made = make_optimizer(model)
    opt, sched = (made["optimizer"], made["lr_scheduler"]["scheduler"]) if isinstance(made, dict) else (made, None)
    batches = list(batches)
    losses = []
    model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        logits = model(batch[:, :-1])
        loss = model.loss(logits, batch[:, 1:]) if hasattr(model, "loss") else nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        losses.append(float(loss.detach()))
        if not torch.isfinite(loss):
            break
        gen = torch.Generator(device=logits.device).manual_seed(step)
        run_training_step_hooks(opt, logits=logits, loss=loss, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if on_step is not None:
            on_step(step, losses[-1])
    for leaf in iter_leaf_optimizers(opt):
        if optimizer_traits(leaf).eval_mode:
            leaf.eval()
    return losses


@torch.no_grad()
def eval_loss(model: nn.Module, batches: list[Tensor]) -> float:
    """Mean cross-entropy over ``batches`` (no z-loss)."""
    model.eval()
    total = 0.0
    for batch in batches:
        logits = model(batch[:, :-1])
        total += float(nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten()))
    model.train()
    return total / len(batches)
