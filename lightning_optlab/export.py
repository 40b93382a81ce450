"""``optlab export --ckpt PATH --out DIR``: a checkpoint of the pack's reference models as a Hugging Face folder.

The LLaMA family (RMSNorm, SwiGLU, rotary positions) becomes a ``transformers.LlamaForCausalLM``, the
GPT-2 family (LayerNorm, GELU, learned positions) a ``GPT2LMHeadModel``; the folder
(``config.json``, ``model.safetensors``, the tokenizer files) loads with
``AutoModelForCausalLM.from_pretrained(DIR)`` and ``lm_eval --model hf --model_args pretrained=DIR``.

μP's multipliers are folded into the weights: a non-standard attention scale s into the query
projection (q·k·s = (s·√d·q)·k/√d, exact because rotary positions and the softmax see q linearly),
the readout multiplier into the readout weight. Where the architecture does not allow it (a tied
readout with a multiplier, q/k normalization, a layout the target class lacks) the export refuses
with the reason. ``export_model`` does the same for a model in memory.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["export_model", "export_checkpoint", "load_pack_checkpoint", "main"]


class ExportError(ValueError):
    """The model has no exact Hugging Face equivalent; the message says which setting and why."""


def _family(cfg: Any) -> str:
    llama = (cfg.norm, cfg.mlp, cfg.positions) == ("rmsnorm", "swiglu", "rope")
    gpt2 = (cfg.norm, cfg.mlp, cfg.positions) == ("layernorm", "gelu", "learned")
    if not (llama or gpt2):
        raise ExportError(
            f"norm={cfg.norm!r}, mlp={cfg.mlp!r}, positions={cfg.positions!r} is neither LLaMA's (rmsnorm, swiglu, rope) "
            "nor GPT-2's (layernorm, gelu, learned) layout; only those two export to LlamaForCausalLM / GPT2LMHeadModel")
    if cfg.qk_layernorm:
        raise ExportError("qk_layernorm=True has no equivalent in LlamaForCausalLM / GPT2LMHeadModel (they do not "
                          "normalize queries and keys); train with qk_layernorm=False to export")
    return "llama" if llama else "gpt2"


def _q_factor(cfg: Any) -> float:
    """The query multiplier that turns HF's 1/sqrt(d_head) attention scale into the model's."""
    return cfg.softmax_scale * math.sqrt(cfg.head_dim)


def _readout(model: nn.Module, cfg: Any) -> torch.Tensor | None:
    """The readout weight with the logit multiplier folded in, or None when it is tied to the embedding."""
    if cfg.tie_embeddings:
        if cfg.logit_scale != 1.0:
            raise ExportError(
                f"the readout is tied to the token embedding and multiplied by logit_scale={cfg.logit_scale:g} (μP's "
                "output multiplier): folding it into the weight would also scale the embedding. Train μP models with "
                "untied embeddings (tie_embeddings=False) to export them")
        return None
    return model.lm_head.weight.detach() * cfg.logit_scale


def _llama_state(model: nn.Module, cfg: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.bias,
        mlp_bias=cfg.bias, hidden_act="silu", torch_dtype="float32",
    )
    q = _q_factor(cfg)
    sd = {"model.embed_tokens.weight": model.wte.weight, "model.norm.weight": model.ln_f.weight}
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = block.ln_1.weight
        sd[p + "post_attention_layernorm.weight"] = block.ln_2.weight
        r = cfg.residual_scale  # the branch multiplier (depth rules), folded into the branches' last layers
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(block.attn, name)
            scale = q if name == "q_proj" else r if name == "o_proj" else 1.0
            sd[p + f"self_attn.{name}.weight"] = lin.weight * scale
            if lin.bias is not None:
                sd[p + f"self_attn.{name}.bias"] = lin.bias * scale
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(block.mlp, name)
            scale = r if name == "down_proj" else 1.0
            sd[p + f"mlp.{name}.weight"] = lin.weight * scale
            if lin.bias is not None:
                sd[p + f"mlp.{name}.bias"] = lin.bias * scale
    readout = _readout(model, cfg)
    if readout is not None:
        sd["lm_head.weight"] = readout
    return hf_cfg, sd


def _gpt2_state(model: nn.Module, cfg: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    import transformers

    if cfg.kv_heads != cfg.n_head:
        raise ExportError(f"n_kv_head={cfg.n_kv_head} (grouped-query attention) has no GPT2LMHeadModel equivalent; "
                          "GPT-2 has one key/value head per query head")
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=cfg.hidden_dim, activation_function="gelu", layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        torch_dtype="float32",
    )
    d = cfg.n_embd

    def bias(module: nn.Module, n: int) -> torch.Tensor:  # GPT-2 always has biases: a bias-free layer exports zeros
        b = getattr(module, "bias", None)
        return b if b is not None else torch.zeros(n, dtype=module.weight.dtype)

    q = _q_factor(cfg)
    sd = {"transformer.wte.weight": model.wte.weight, "transformer.wpe.weight": model.wpe.weight,
          "transformer.ln_f.weight": model.ln_f.weight, "transformer.ln_f.bias": bias(model.ln_f, d)}
    for i, block in enumerate(model.blocks):
        p = f"transformer.h.{i}."
        a, m = block.attn, block.mlp
        for hf, ours in (("ln_1", block.ln_1), ("ln_2", block.ln_2)):
            sd[p + f"{hf}.weight"], sd[p + f"{hf}.bias"] = ours.weight, bias(ours, d)
        # HF's Conv1D stores weights as (in_features, out_features): ours transposed; Q, K, V fused along out
        sd[p + "attn.c_attn.weight"] = torch.cat([a.q_proj.weight * q, a.k_proj.weight, a.v_proj.weight]).T
        sd[p + "attn.c_attn.bias"] = torch.cat([bias(a.q_proj, d) * q, bias(a.k_proj, d), bias(a.v_proj, d)])
        r = cfg.residual_scale  # the branch multiplier (depth rules), folded into the branches' last layers
        sd[p + "attn.c_proj.weight"], sd[p + "attn.c_proj.bias"] = a.o_proj.weight.T * r, bias(a.o_proj, d) * r
        sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = m.up_proj.weight.T, bias(m.up_proj, cfg.hidden_dim)
        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = m.down_proj.weight.T * r, bias(m.down_proj, d) * r
    readout = _readout(model, cfg)
    if readout is not None:
        sd["lm_head.weight"] = readout
    return hf_cfg, sd


def export_model(model: nn.Module, out_dir: str | Path | None = None, tokenizer: Any = None) -> nn.Module:
    """The Hugging Face model equal to ``model`` (a :class:`~lightning_optlab.models.TransformerLM`); with
    ``out_dir`` also saved there (``save_pretrained``), with ``tokenizer`` (a ``transformers`` tokenizer or a
    ``tokenizer.json`` path) beside it. Raises :class:`ExportError` when no exact equivalent exists."""
    from ._extras import require
    from .models import TransformerLM

    transformers = require("transformers")
    if not isinstance(model, TransformerLM):
        raise ExportError(f"export takes the pack's reference models (TransformerLM), got {type(model).__name__}; a "
                          "Hugging Face model trained through CausalLMModule is saved with model.save_pretrained(DIR)")
    cfg = model.config
    family = _family(cfg)
    with torch.no_grad():
        hf_cfg, sd = (_llama_state if family == "llama" else _gpt2_state)(model, cfg)
        cls = transformers.LlamaForCausalLM if family == "llama" else transformers.GPT2LMHeadModel
        hf = cls(hf_cfg).float().eval()
        own = hf.state_dict()
        missing = sorted(k for k in own if k not in sd and not (k == "lm_head.weight" and cfg.tie_embeddings)
                         and not k.endswith(".attn.bias") and not k.endswith(".attn.masked_bias"))
        if missing:
            raise ExportError(f"no weights for {missing[:3]} in the export of a {family} model")
        hf.load_state_dict({k: v.detach().float().contiguous() for k, v in sd.items()}, strict=False)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tok = _hf_tokenizer(tokenizer, hf.config) if tokenizer is not None else None  # sets the config's eos id
        hf.save_pretrained(out)
        if tok is not None:
            tok.save_pretrained(out)
    return hf


def _hf_tokenizer(tokenizer: Any, hf_cfg: Any) -> Any:
    import transformers

    if isinstance(tokenizer, (str, Path)):
        from .data.tokenizer import EOS_TOKEN

        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer), eos_token=EOS_TOKEN)
        tokenizer.model_max_length = int(getattr(hf_cfg, "max_position_embeddings", None) or hf_cfg.n_positions)
    eos = tokenizer.eos_token_id
    if eos is not None:
        hf_cfg.eos_token_id = hf_cfg.bos_token_id = int(eos)
    return tokenizer


def load_pack_checkpoint(path: str | Path, *, trust: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The reference model of a ``CausalLMModule`` checkpoint, μP included (built with the saved base)."""
    from .eval.cli import _load
    from .models import build_model

    ckpt = _load(Path(path), trust)
    hp = ckpt.get("hyper_parameters") or {}
    spec, state = hp.get("model"), ckpt.get("state_dict")
    if not isinstance(state, dict) or not isinstance(spec, (str, dict)):
        raise ExportError(f"{path} is not a CausalLMModule checkpoint of a preset or config-mapping model "
                          "(hyper_parameters['model'] and state_dict); a Hugging Face model trained through "
                          "CausalLMModule is saved with module.model.save_pretrained(DIR)")
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    overrides = {"vocab_size": weights["wte.weight"].shape[0]} if "wte.weight" in weights else {}
    base = (hp.get("mup") or {}).get("base") if isinstance(hp.get("mup"), dict) else None
    if base is not None:
        from .mup import build_mup_model

        model = build_mup_model(spec, base=base, **overrides)
    else:
        model = build_model(spec, **overrides)
    model.load_state_dict(weights)
    return model.eval(), ckpt


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, tokenizer: str | Path | None = None,
                      *, trust: bool = False) -> nn.Module:
    """``optlab export``: the checkpoint's model and tokenizer (``tokenizer.json`` beside the run by default)."""
    from .eval.cli import find_tokenizer

    model, _ = load_pack_checkpoint(ckpt, trust=trust)
    tok = Path(tokenizer) if tokenizer is not None else find_tokenizer(Path(ckpt))
    return export_model(model, out_dir, tokenizer=tok)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optlab export", description="write a checkpoint as a Hugging Face model "
                                     "folder (LlamaForCausalLM or GPT2LMHeadModel, with its tokenizer)")
    parser.add_argument("--ckpt", required=True, help="a Lightning checkpoint of CausalLMModule")
    parser.add_argument("--out", required=True, help="the folder to write (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one beside the checkpoint)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load with full unpickling (runs code stored in the file: only for files you trust)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from .eval.cli import CheckpointError

    try:
        hf = export_checkpoint(args.ckpt, args.out, args.tokenizer, trust=args.trust_checkpoint)
    except (ExportError, CheckpointError, FileNotFoundError) as err:
        print(f"optlab export: {err}", file=sys.stderr)
        return 2
    print(f"wrote {type(hf).__name__} to {args.out} (AutoModelForCausalLM.from_pretrained({args.out!r}))")
    return 0
