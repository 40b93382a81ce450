"""AdamMini: agreement with the adam-mini package, a float64 re-derivation, validation, state, health."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_optlab.optim.adam_mini import AdamMini

D, N_HEADS, N_KV, VOCAB = 8, 4, 2, 11
HEAD_DIM = D // N_HEADS


def _llama_shapes() -> dict[str, tuple[int, ...]]:
    """A LLaMA-style block with grouped-query attention, named as the package expects."""
    return {
        "embed.weight": (VOCAB, D),
        "layers.0.attn_norm.weight": (D,),
        "layers.0.attn.q_proj.weight": (N_HEADS * HEAD_DIM, D),
        "layers.0.attn.k_proj.weight": (N_KV * HEAD_DIM, D),
        "layers.0.attn.v_proj.weight": (N_KV * HEAD_DIM, D),
        "layers.0.attn.o_proj.weight": (D, D),
        "layers.0.ffn_norm.weight": (D,),
        "layers.0.mlp.fc1.weight": (2 * D, D),
        "layers.0.mlp.fc1.bias": (2 * D,),
        "layers.0.mlp.fc2.weight": (D, 2 * D),
        "layers.0.mlp.fc2.bias": (D,),
        "norm.weight": (D,),
        "lm_head.weight": (VOCAB, D),
    }


def _gpt2_shapes() -> dict[str, tuple[int, ...]]:
    """GPT-2 naming (nn.Linear layout): fused c_attn, c_proj, c_fc; where our rule departs from the package."""
    return {
        "transformer.wte.weight": (VOCAB, D),
        "transformer.wpe.weight": (5, D),
        "transformer.h.0.ln_1.weight": (D,),
        "transformer.h.0.ln_1.bias": (D,),
        "transformer.h.0.attn.c_attn.weight": ((N_HEADS + 2 * N_KV) * HEAD_DIM, D),
        "transformer.h.0.attn.c_attn.bias": ((N_HEADS + 2 * N_KV) * HEAD_DIM,),
        "transformer.h.0.attn.c_proj.weight": (D, D),
        "transformer.h.0.mlp.c_fc.weight": (2 * D, D),
        "transformer.h.0.mlp.c_proj.weight": (D, 2 * D),
        "transformer.h.0.moe.w.weight": (2, 3, D),  # a 3-D tensor: one block per index of dim 0
        "transformer.h.0.attn.scale": (),
        "transformer.ln_f.weight": (D,),
        "lm_head.weight": (VOCAB, D),
    }


def _make(shapes: dict[str, tuple[int, ...]], dtype=torch.float64, seed: int = 0) -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for n, s in shapes.items()}


def _grads(params: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """Random gradients whose scale varies by row, so the block rule matters."""
    g = torch.Generator().manual_seed(1000 + step)
    out = {}
    for n, p in params.items():
        scale = torch.rand(p.shape[:1] if p.dim() else (), generator=g, dtype=p.dtype).mul(3).exp()
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        out[n] = noise * scale.view(-1, *([1] * (p.dim() - 1))) if p.dim() else noise * scale
    return out


def _set_grads(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
    for n, p in params.items():
        p.grad = grads[n].clone()


def _no_decay(name: str) -> bool:  # the package's own rule, mirrored in the groups we give ours
    return "norm" in name or "ln" in name or "bias" in name


def _groups(params: dict[str, torch.Tensor], wd: float) -> list[dict]:
    decay = [(n, p) for n, p in params.items() if not _no_decay(n)]
    other = [(n, p) for n, p in params.items() if _no_decay(n)]
    return [{"params": decay, "weight_decay": wd}, {"params": other, "weight_decay": 0.0}]


def test_matches_adam_mini_package():
    adam_mini = pytest.importorskip("adam_mini")
    ours = _make(_llama_shapes())
    theirs = {n: torch.nn.Parameter(p.detach().clone()) for n, p in ours.items()}
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    opt = AdamMini(_groups(ours, 0.1), **hp, n_heads=N_HEADS, n_kv_heads=N_KV)
    ref = adam_mini.Adam_mini(
        list(theirs.items()), **hp, weight_decay=0.1, dim=D, n_heads=N_HEADS, n_kv_heads=N_KV, verbose=False
    )
    for step in range(25):
        grads = _grads(ours, step)
        _set_grads(ours, grads)
        _set_grads(theirs, grads)
        opt.step()
        ref.step()
    for n in ours:
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-12, atol=1e-13, msg=lambda m, n=n: f"{n}: {m}")


# ---- float64 re-derivation: the block of every coordinate spelled out by hand --------------------

_GPT2_RULES = {
    "transformer.wte.weight": "row",
    "transformer.wpe.weight": "row",
    "transformer.h.0.ln_1.weight": "tensor",
    "transformer.h.0.ln_1.bias": "coordinate",
    "transformer.h.0.attn.c_attn.weight": "qkv",
    "transformer.h.0.attn.c_attn.bias": "coordinate",
    "transformer.h.0.attn.c_proj.weight": "row",
    "transformer.h.0.mlp.c_fc.weight": "row",
    "transformer.h.0.mlp.c_proj.weight": "row",
    "transformer.h.0.moe.w.weight": "row",
    "transformer.h.0.attn.scale": "tensor",
    "transformer.ln_f.weight": "tensor",
    "lm_head.weight": "row",
}


def _block_ids(rule: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The block index of every coordinate (flattened), for the rule's own reading of the paper."""
    numel = int(torch.tensor(shape).prod()) if shape else 1
    if rule == "coordinate":
        return torch.arange(numel)
    if rule == "tensor":
        return torch.zeros(numel, dtype=torch.long)
    rows = shape[0]
    r = torch.arange(rows)
    if rule == "row":
        ids = r
    elif rule.startswith("heads"):
        ids = r // (rows // int(rule.split(":")[1]))
    elif rule == "qkv":
        hd = rows // (N_HEADS + 2 * N_KV)
        qk_rows = (N_HEADS + N_KV) * hd
        ids = torch.where(r < qk_rows, r // hd, (N_HEADS + N_KV) + r - qk_rows)
    elif rule == "neox_qkv":  # rows [q_1; k_1; v_1; q_2; ...], n_kv_heads = n_heads
        hd = rows // (3 * N_HEADS)
        head, within = r // (3 * hd), r % (3 * hd)
        # per head: q one block, k one block, v one block per row (ids in row order)
        ids = head * (2 + hd) + torch.where(within < 2 * hd, within // hd, 2 + within - 2 * hd)
    else:
        raise AssertionError(rule)
    return ids.repeat_interleave(numel // rows)


class _Reference:
    """Adam-mini re-derived in float64 with index_add over explicit block ids."""

    def __init__(self, params, rules, groups_hp, betas, eps):
        self.params, self.rules, self.groups_hp, self.betas, self.eps = params, rules, groups_hp, betas, eps
        self.m = {n: torch.zeros_like(p) for n, p in params.items()}
        self.ids = {n: _block_ids(rules[n], tuple(p.shape)) for n, p in params.items()}
        self.v = {n: torch.zeros(int(self.ids[n].max()) + 1, dtype=p.dtype) for n, p in params.items()}
        self.t = 0

    @torch.no_grad()
    def step(self, grads):
        b1, b2 = self.betas
        self.t += 1
        for n, p in self.params.items():
            lr, wd = self.groups_hp[n]
            g, ids = grads[n].reshape(-1), self.ids[n]
            self.m[n] = b1 * self.m[n] + (1 - b1) * grads[n]
            counts = torch.zeros_like(self.v[n]).index_add_(0, ids, torch.ones_like(g))
            mean_sq = torch.zeros_like(self.v[n]).index_add_(0, ids, g * g) / counts
            self.v[n] = b2 * self.v[n] + (1 - b2) * mean_sq
            denom = (self.v[n] / (1 - b2**self.t)).sqrt()[ids].view(p.shape) + self.eps
            p.copy_(p - lr * wd * p - lr * (self.m[n] / (1 - b1**self.t)) / denom)


def _run_both(ours, ref_params, opt, ref, steps):
    """``steps`` steps of ours and of the re-derivation on the same gradients; equal parameters."""
    for step in range(steps):
        grads = _grads(ours, step)
        _set_grads(ours, grads)
        opt.step()
        ref.step(grads)
    for n in ours:
        torch.testing.assert_close(ours[n], ref_params[n], rtol=1e-12, atol=1e-13, msg=lambda m, n=n: f"{n}: {m}")


def test_matches_float64_rederivation_gpt2_naming():
    ours = _make(_gpt2_shapes())
    ref_params = {n: p.detach().clone() for n, p in ours.items()}
    mats = [(n, p) for n, p in ours.items() if p.dim() >= 2]
    vecs = [(n, p) for n, p in ours.items() if p.dim() < 2]
    groups = [{"params": mats, "lr": 3e-3, "weight_decay": 0.1}, {"params": vecs, "lr": 1e-2, "weight_decay": 0.0}]
    hp = {n: ((3e-3, 0.1) if p.dim() >= 2 else (1e-2, 0.0)) for n, p in ours.items()}
    opt = AdamMini(groups, betas=(0.9, 0.95), eps=1e-8, n_heads=N_HEADS, n_kv_heads=N_KV)
    ref = _Reference(ref_params, _GPT2_RULES, hp, (0.9, 0.95), 1e-8)
    _run_both(ours, ref_params, opt, ref, steps=25)


def test_neox_interleaved_qkv_matches_float64_rederivation():
    """GPT-NeoX's query_key_value (per-head [q; k; v] rows) is not a query weight: q and k of each
    head are a block each, every value row its own block (the paper's rule for values)."""
    shapes = {
        "gpt_neox.embed_in.weight": (VOCAB, D),
        "gpt_neox.layers.0.attention.query_key_value.weight": (3 * N_HEADS * HEAD_DIM, D),
        "gpt_neox.layers.0.attention.dense.weight": (D, D),
        "embed_out.weight": (VOCAB, D),
    }
    rules = {n: "row" for n in shapes}
    rules["gpt_neox.layers.0.attention.query_key_value.weight"] = "neox_qkv"
    ours = _make(shapes)
    ref_params = {n: p.detach().clone() for n, p in ours.items()}
    opt = AdamMini(list(ours.items()), lr=3e-3, weight_decay=0.1, n_heads=N_HEADS,
                   readout_pattern=r"(?:^|[._])(?:lm_head|embed_out)(?:[._]|$)")
    ref = _Reference(ref_params, rules, {n: (3e-3, 0.1) for n in shapes}, (0.9, 0.95), 1e-8)
    _run_both(ours, ref_params, opt, ref, steps=15)
    qkv = ours["gpt_neox.layers.0.attention.query_key_value.weight"]
    assert opt.state[qkv]["block_exp_avg_sq"].numel() == N_HEADS * (2 + HEAD_DIM)
    with pytest.raises(ValueError, match="n_kv_heads = n_heads"):
        AdamMini([("attention.query_key_value.weight", torch.nn.Parameter(torch.randn(24, 8)))], n_heads=4, n_kv_heads=2)


def test_llama_rules_match_rederivation_and_health():
    ours = _make(_llama_shapes(), seed=3)
    ref_params = {n: p.detach().clone() for n, p in ours.items()}
    rules = {n: ("coordinate" if "bias" in n else "tensor" if len(s) == 1 else "row") for n, s in _llama_shapes().items()}
    rules["layers.0.attn.q_proj.weight"] = f"heads:{N_HEADS}"
    rules["layers.0.attn.k_proj.weight"] = f"heads:{N_KV}"
    opt = AdamMini(list(ours.items()), lr=2e-3, weight_decay=0.05, n_heads=N_HEADS, n_kv_heads=N_KV)
    ref = _Reference(ref_params, rules, {n: (2e-3, 0.05) for n in ours}, (0.9, 0.95), 1e-8)
    _run_both(ours, ref_params, opt, ref, steps=20)
    health = opt.health()
    expected_blocks = {
        "layers.0.attn.q_proj.weight": N_HEADS,
        "layers.0.attn.k_proj.weight": N_KV,
        "layers.0.attn.v_proj.weight": N_KV * HEAD_DIM,
        "embed.weight": VOCAB,
        "lm_head.weight": VOCAB,
        "norm.weight": 1,
        "layers.0.mlp.fc1.bias": 2 * D,
    }
    for n, nb in expected_blocks.items():
        assert health[f"{n}/n_blocks"] == nb
    assert all(torch.isfinite(torch.tensor(v)) for v in health.values())
    for n in ours:
        assert health[f"{n}/eff_lr_min"] <= health[f"{n}/eff_lr_q50"] <= health[f"{n}/eff_lr_max"]
        assert health[f"{n}/block_eff_lr_min"] == pytest.approx(health[f"{n}/eff_lr_min"])
        assert health[f"{n}/update_rms"] > 0
    assert health["norm.weight/block_eff_lr_min"] == health["norm.weight/block_eff_lr_max"]


def test_unnamed_params_use_roles_and_rows():
    g = torch.Generator().manual_seed(5)
    mat, vec_bias, vec_norm, emb = (torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in ((6, 4), (6,), (4,), (7, 4)))
    groups = [
        {"params": [mat], "role": "hidden", "weight_decay": 0.1},
        {"params": [vec_bias], "role": "bias"},
        {"params": [vec_norm], "role": "norm", "lr": 3e-3},
        {"params": [emb], "role": "embedding"},
    ]
    opt = AdamMini(groups, lr=1e-2)
    named = {"mat": mat, "bias": vec_bias, "norm": vec_norm, "emb": emb}
    rules = {"mat": "row", "bias": "coordinate", "norm": "tensor", "emb": "row"}
    hp = {"mat": (1e-2, 0.1), "bias": (1e-2, 0.0), "norm": (3e-3, 0.0), "emb": (1e-2, 0.0)}
    ref_params = {n: p.detach().clone() for n, p in named.items()}
    ref = _Reference(ref_params, rules, hp, (0.9, 0.95), 1e-8)
    for step in range(20):
        grads = _grads(named, step)
        _set_grads(named, grads)
        opt.step()
        ref.step(grads)
    for n in named:
        torch.testing.assert_close(named[n], ref_params[n], rtol=1e-12, atol=1e-13)
    assert [opt.state[p]["block_exp_avg_sq"].numel() for p in (mat, vec_bias, vec_norm, emb)] == [6, 6, 1, 7]


# ---- validation, state, closure --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(lr=-1.0), "-1.0"),
        (dict(betas=(0.9, 1.0)), "1.0"),
        (dict(eps=0.0), "eps"),
        (dict(weight_decay=-0.1), "-0.1"),
        (dict(n_heads=0), "n_heads"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads=3"),
        (dict(n_heads=4, query_pattern="(unclosed"), "(unclosed"),
    ],
)
def test_bad_hyperparameters(kwargs, fragment):
    with pytest.raises(ValueError, match=__import__("re").escape(fragment)):
        AdamMini([("w", torch.nn.Parameter(torch.randn(4, 4)))], **kwargs)


def test_bad_head_configuration():
    q = ("attn.q_proj.weight", torch.nn.Parameter(torch.randn(6, 8)))
    with pytest.raises(ValueError, match="n_heads"):
        AdamMini([q])  # a query weight needs n_heads
    with pytest.raises(ValueError, match="6 rows"):
        AdamMini([q], n_heads=4)
    qkv = ("attn.c_attn.weight", torch.nn.Parameter(torch.randn(20, 8)))
    with pytest.raises(ValueError, match="n_heads=4"):
        AdamMini([qkv], n_heads=4)


def test_state_dict_round_trip_is_bit_identical():
    torch.manual_seed(0)
    params = _make(_gpt2_shapes(), dtype=torch.float32)
    opt = AdamMini(list(params.items()), lr=1e-2, weight_decay=0.1, n_heads=N_HEADS, n_kv_heads=N_KV)
    for step in range(4):
        _set_grads(params, _grads(params, step))
        opt.step()
    clone = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    opt2 = AdamMini(list(clone.items()), lr=0.5, n_heads=N_HEADS, n_kv_heads=N_KV)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for step in range(4, 9):
        grads = _grads(params, step)
        _set_grads(params, grads)
        _set_grads(clone, grads)
        opt.step()
        opt2.step()
    for n in params:
        assert torch.equal(params[n], clone[n]), n


def test_closure_and_missing_grads():
    w = torch.nn.Parameter(torch.randn(3, 2))
    unused = torch.nn.Parameter(torch.randn(3))
    opt = AdamMini([("w", w), ("unused", unused)])
    before = unused.detach().clone()

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and loss.item() > 0
    assert torch.equal(unused, before) and not opt.state[unused]
    assert opt.health() and all(k.startswith("w/") for k in opt.health())
