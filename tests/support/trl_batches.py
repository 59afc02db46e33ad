"""Batches shaped like the ones TRL's paired trainers (CPO, ORPO) build, for calling their code."""

from __future__ import annotations

import torch
from conftest import DEVICE


def paired_trainer_batch(pairs: int, vocab: int, length: int, dtype=torch.float64):
    """A CPO/ORPO-style batch (prompt of 2-3 tokens, right padding) and the model's [2B, length, V] logits."""
    batch = {}
    for side in ("chosen", "rejected"):
        ids = torch.randint(1, vocab, (pairs, length), device=DEVICE)
        attention = torch.ones(pairs, length, dtype=torch.long, device=DEVICE)
        attention[1, -2:] = 0
        ids[attention == 0] = 0
        labels = ids.masked_fill(attention == 0, -100)
        labels[:, : 2 if side == "chosen" else 3] = -100
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attention, f"{side}_labels": labels})
    logits = (torch.randn(2 * pairs, length, vocab, device=DEVICE) * 2).to(dtype)
    return batch, logits
