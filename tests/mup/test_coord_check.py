"""Coordinate check over widths 32..256: flat under μP, growing under SP (AdamW, Lion, SOAP).

Thresholds from the measurement (llama-tiny, 2 layers, zero readout, batch 8 × 32 bytes, 3 steps):
the ratio RMS(width 256) / RMS(width 32) of every recorded activation (embedding, each block, its
attention and MLP branches, the logits) after 3 steps was within [0.72, 1.22] for AdamW (lr 1e-2),
[0.76, 1.02] for Lion (lr 1e-3) and [0.74, 1.13] for SOAP (lr 3e-3) under μP; the largest ratio
under SP was 77 (AdamW), 56 (Lion) and > 10 (SOAP). The test asks for every μP ratio in
(1/1.5, 1.5) and for some SP ratio above 4.
"""

from __future__ import annotations

import pytest
import torch

from lightning_optlab.mup.coord import coord_check, coord_ratios


@pytest.mark.parametrize("name,lr", [("adamw", 1e-2), ("lion", 1e-3), ("soap", 3e-3)])
def test_activations_are_flat_in_width_under_mup_and_grow_under_sp(name, lr):
    torch.set_num_threads(1)
    kw = dict(widths=(32, 64, 128, 256), steps=3, lr=lr, zero_readout=True)
    mup_ratios = coord_ratios(coord_check("llama-tiny", name, mup=True, **kw), t=3)
    sp_ratios = coord_ratios(coord_check("llama-tiny", name, mup=False, **kw), t=3)
    assert set(mup_ratios) >= {"wte", "blocks.0", "blocks.1.attn", "blocks.1.mlp", "logits"}
    for module, ratio in mup_ratios.items():
        assert 1 / 1.5 < ratio < 1.5, (module, ratio, mup_ratios)
    assert max(sp_ratios.values()) > 4, sp_ratios
