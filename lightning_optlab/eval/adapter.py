"""An in-memory PyTorch language model as an lm-eval model (``lm_eval.api.model.TemplateLM``).

:class:`ModuleLM` wraps any ``nn.Module`` that maps token ids ``(B, T)`` to logits ``(B, T, V)``
(a plain tensor, or an output with ``.logits`` as Hugging Face models return) and a tokenizer with
``encode(text) -> list[int]``, ``decode(ids) -> str`` and an end-of-text id (``eos_id`` as
:class:`lightning_optlab.data.TextTokenizer` has it, or ``eos_token_id`` as ``transformers``
tokenizers have it). It scores requests the way lm-eval's Hugging Face wrapper ``HFLM`` does —
the same context/continuation split (lm-eval's ``TemplateLM._encode_pair``), left truncation to the
model's context, right padding — so the two give the same log-likelihoods on the same model
(checked in the tests), without a Hugging Face model, a checkpoint on disk or a model server.

Log-likelihood of a continuation c (tokens c_1..c_n) after a context x::

    log p(c | x) = Σ_i log softmax(f(x, c_<i))[c_i]

computed from one forward pass over ``(x + c)[-(L + 1):-1]`` when n ≤ L (L = the model's context
length: the context is cut from the left), and over chunks of at most L continuation tokens, each
seeing the L tokens before its last one, when n > L (lm-eval's rolling-window scheme for texts
longer than the model, Gao et al. 2021, "A framework for few-shot language model evaluation").

No Lightning import here (CONVENTIONS.md #1); the Lightning callback is
:class:`lightning_optlab.eval.ZeroShotEval`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Sequence

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["ModuleLM", "context_length_of", "eos_id_of", "chunk_requests"]


def eos_id_of(tokenizer: Any) -> int:
    """The end-of-text id of a tokenizer: ``eos_id`` (ours), ``eos_token_id`` (``transformers``)."""
    for name in ("eos_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"the tokenizer {type(tokenizer).__name__} has neither `eos_id` nor `eos_token_id`; "
                     "wrap it in an object that has one (lm-eval conditions empty contexts on that token)")


def context_length_of(model: nn.Module) -> int | None:
    """The model's context length from its config (``block_size``, ``n_positions``,
    ``max_position_embeddings``), looking also at ``model.model`` (a LightningModule's model)."""
    for obj in (model, getattr(model, "model", None)):
        config = getattr(obj, "config", None)
        for name in ("block_size", "n_positions", "max_position_embeddings"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def chunk_requests(context: Sequence[int], continuation: Sequence[int], max_length: int
                   ) -> list[tuple[list[int], int, list[int]]]:
    """Split one request into forward passes of at most ``max_length`` input tokens.

    Returns ``(inputs, first, targets)`` triples: the logits at positions ``first, first+1, ...``
    of ``inputs`` predict the continuation tokens ``targets``. One triple when the continuation
    fits (``inputs = (context + continuation)[-(L+1):-1]``, HFLM's truncation); one per chunk of L
    continuation tokens otherwise, each chunk conditioned on the L tokens before its last token.
    """
    if not context:
        raise ValueError("a request needs at least one context token (lm-eval puts the end-of-text "
                         "token before an empty context)")
    if not continuation:
        raise ValueError("a request needs at least one continuation token to score")
    whole = list(context) + list(continuation)
    start, end = len(context), len(whole)  # continuation tokens occupy whole[start:end]
    out = []
    a = start
    while a < end:
        # the first chunk takes the remainder so that every later chunk is a full L tokens
        b = min(end, a + ((end - a - 1) % max_length) + 1)
        s = max(0, b - 1 - max_length)
        inputs = whole[s:b - 1]
        out.append((inputs, a - 1 - s, whole[a:b]))
        a = b
    return out


class ModuleLM(TemplateLM):
    """lm-eval model over an ``nn.Module`` (ids → logits) and a tokenizer.

    Args:
        model: maps ``(B, T)`` token ids to ``(B, T, V)`` logits (or an output with ``.logits``).
        tokenizer: ``encode``/``decode`` and ``eos_id`` or ``eos_token_id`` (see module docstring).
        max_length: the context length L; default: from the model's config (see
            :func:`context_length_of`); required when the model has none.
        batch_size: sequences per forward pass (default 16).
        device: where the input ids go (default: the model's first parameter's device).
        rank, world_size: this process's place when lm-eval shards requests across processes;
            default: from ``torch.distributed`` when it is initialized, else 0 and 1.
        max_gen_toks: default cap of generated tokens for ``generate_until`` (default 256).

    Every call runs under ``torch.inference_mode`` in the model's dtype and device, with the model
    in ``eval()`` mode, and puts the model back into the mode it was in.

    Example:
        >>> lm = ModuleLM(model, tokenizer, batch_size=32)
        >>> lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"], num_fewshot=0)
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_length: int | None = None, batch_size: int = 16,
                 device: torch.device | str | None = None, rank: int | None = None, world_size: int | None = None,
                 max_gen_toks: int = 256) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module mapping token ids to logits, got {type(model).__name__}")
        for name in ("encode", "decode"):
            if not callable(getattr(tokenizer, name, None)):
                raise TypeError(f"the tokenizer {type(tokenizer).__name__} has no `{name}` method")
        self.model = model
        self.tokenizer = tokenizer
        self._eot = eos_id_of(tokenizer)
        # transformers' encode adds BOS/EOS unless told not to; lm-eval's HFLM tells it not to
        self._encode_kwargs = {"add_special_tokens": False} if _accepts(tokenizer.encode, "add_special_tokens") else {}
        max_length = max_length if max_length is not None else context_length_of(model)
        if max_length is None:
            raise ValueError("the model's context length is unknown (no config.block_size / n_positions / "
                             "max_position_embeddings): pass max_length=")
        if max_length < 1:
            raise ValueError(f"max_length must be ≥ 1, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if max_gen_toks < 1:
            raise ValueError(f"max_gen_toks must be ≥ 1, got {max_gen_toks}")
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        if device is None:
            param = next(iter(model.parameters()), None)
            device = param.device if param is not None else torch.device("cpu")
        self._device = torch.device(device)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self._rank = rank if rank is not None else (torch.distributed.get_rank() if dist else 0)
        self._world_size = world_size if world_size is not None else (torch.distributed.get_world_size() if dist else 1)

    # ------------------------------------------------------------------ lm-eval's interface
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tokenizer.encode(string, **self._encode_kwargs))

    def tok_decode(self, tokens: Iterable[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        return self.score_tokens([(ctx, cont) for _, ctx, cont in requests], disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts (perplexity tasks) in lm-eval's disjoint rolling windows."""
        pairs, owners = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            windows = get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
            for ctx, cont in map(make_disjoint_window, windows):
                pairs.append((ctx, cont))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owners, self.score_tokens(pairs, disable_tqdm=disable_tqdm,
                                                          desc="Running loglikelihood_rolling requests")):
            totals[i] += logp
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy generation until a stop string, the end-of-text token or ``max_gen_toks`` tokens."""
        out = []
        with self._eval_mode():
            for req in self._progress(requests, disable_tqdm, "Running generate_until requests"):
                context, gen_kwargs = req.args
                gen_kwargs = dict(gen_kwargs or {})
                if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0.0) or 0.0) > 0:
                    raise ValueError(f"ModuleLM generates greedily only; the task asks for sampling ({gen_kwargs}): "
                                     "set do_sample: false / temperature: 0 in its generation_kwargs")
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                out.append(self._greedy(context, until, int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))))
        return out

    # distributed primitives lm-eval's evaluator calls when world_size > 1
    def all_gather(self, tensor: Tensor) -> Tensor:
        if self._world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self._world_size == 1:
            return [obj]
        parts: list[Any] = [None] * self._world_size
        torch.distributed.all_gather_object(parts, obj)  # works with gloo and NCCL alike
        return parts if self._rank == dst else None

    def barrier(self) -> None:
        if self._world_size > 1:
            torch.distributed.barrier()

    # ------------------------------------------------------------------ scoring
    def score_tokens(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], disable_tqdm: bool = True,
                     desc: str = "Running loglikelihood requests") -> list[tuple[float, bool]]:
        """``(log p(continuation | context), greedy)`` for token-id pairs; see the module docstring.

        With ``disable_tqdm=False`` (what lm-eval's evaluator passes by default through
        ``loglikelihood``) a progress bar over the forward batches shows on rank 0, as lm-eval's HFLM does.

        Forward passes are batched longest first (so the batches pad little) and identical inputs
        run once (lm-eval's multiple-choice requests with one-token answers share their input).
        """
        jobs: dict[tuple[int, ...], list[tuple[int, int, list[int]]]] = defaultdict(list)
        for i, (ctx, cont) in enumerate(requests):
            for inputs, first, targets in chunk_requests(ctx, cont, self.max_length):
                jobs[tuple(inputs)].append((i, first, targets))
        logps = [0.0] * len(requests)
        greedy = [True] * len(requests)
        order = sorted(jobs, key=lambda k: (-len(k), k))
        with self._eval_mode():
            for b in self._progress(range(0, len(order), self.batch_size), disable_tqdm, desc):
                batch = order[b:b + self.batch_size]
                logits = self._forward(batch)
                owners, sums, hits = [], [], []
                for row, key in enumerate(batch):
                    for i, first, targets in jobs[key]:
                        # log-softmax only where a target is scored, in float32 at least (float64 stays)
                        scored = logits[row, first:first + len(targets)]
                        lp = F.log_softmax(scored.to(torch.promote_types(scored.dtype, torch.float32)), dim=-1)
                        tgt = torch.tensor(targets, device=lp.device)
                        owners.append(i)
                        sums.append(lp.gather(1, tgt[:, None]).sum())
                        hits.append((lp.argmax(-1) == tgt).all())
                # one device-to-host copy per batch rather than two per request
                for i, logp, hit in zip(owners, torch.stack(sums).tolist(), torch.stack(hits).tolist()):
                    logps[i] += logp
                    greedy[i] = greedy[i] and hit
        return list(zip(logps, greedy))

    def _forward(self, batch: list[tuple[int, ...]]) -> Tensor:
        width = max(len(k) for k in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for row, key in enumerate(batch):
            ids[row, :len(key)] = torch.tensor(key, dtype=torch.long)  # right padding: causal, harmless
        out = self.model(ids.to(self._device))
        out = getattr(out, "logits", out)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.dim() != 3 or out.shape[:2] != ids.shape:
            raise ValueError(f"the model must map ids {tuple(ids.shape)} to logits (B, T, V), got {tuple(out.shape)}")
        return out

    def _greedy(self, context: str, until: list[str], max_gen: int) -> str:
        ids = self.tok_encode(context) or [self.prefix_token_id]
        generated: list[int] = []
        text = ""
        for _ in range(max_gen):
            window = (ids + generated)[-self.max_length:]
            logits = self._forward([tuple(window)])
            nxt = int(logits[0, len(window) - 1].argmax())
            if nxt == self._eot:
                break
            generated.append(nxt)
            text = self.tok_decode(generated)
            if any(stop in text for stop in until):
                break
        for stop in until:
            text = text.split(stop)[0]
        return text

    def _progress(self, items: Any, disable_tqdm: bool, desc: str) -> Any:
        """``items`` under lm-eval's progress bar (tqdm), shown unless ``disable_tqdm`` or not rank 0."""
        return tqdm(items, desc=desc, disable=bool(disable_tqdm) or self._rank != 0)

    def _eval_mode(self) -> "_EvalMode":
        return _EvalMode(self.model)


def _accepts(fn: Any, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class _EvalMode:
    """``torch.inference_mode`` with the model in eval mode; the previous mode back on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._inference = torch.inference_mode()
        self._was_training = False

    def __enter__(self) -> None:
        self._was_training = self.model.training
        self.model.eval()
        self._inference.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._inference.__exit__(*exc)
        self.model.train(self._was_training)
