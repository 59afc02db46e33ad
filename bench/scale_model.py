"""Per-rank memory and communication of the log-prob + entropy stage (forward and backward) under
tensor parallelism, projected for a 70B model: `python bench/scale_model.py [--tp 8 ...]`.

A model of the bytes each way allocates and sends, written out below, not a measurement. The
measured counterpart at CPU scale is `bench/scaling.py` (TP = 1, 2, 4 with gloo): the bytes its
collectives send are these formulas' (tests/project/test_scale_model.py checks it), and its logits
way's peak memory is the modelled gradient of the slice.

Bytes sent count ring collectives: an all-gather sends a rank's part to the R - 1 others, an
all-reduce 2 (R - 1) / R of its buffer, a reduce-scatter (R - 1) / R.

Counted, for the lm_head and the loss together: the memory they add on one rank beyond the hidden
states (for the logits ways the model's bf16 logits slice [N, V/TP] too), and the bytes one rank
sends per step in their collectives (for the logits ways the ColwiseParallel lm_head's backward
all-reduce of grad_hidden [N, H] too). Not counted: per-token vectors of N values.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

MIB = 2**20


@dataclass(frozen=True)
class Setup:
    hidden: int = 8192          # Llama-3.1-70B
    vocab: int = 128256         # Llama-3 tokenizer
    tokens: int = 8192          # per rank
    tp: int = 8
    act_bytes: int = 2          # bf16 activations and weights
    block_elements: int = 128 * 2**20  # fastalign's blocks from hidden states (fastalign/_triton.py)

    @property
    def local_vocab(self) -> int:
        return -(-self.vocab // self.tp)

    @property
    def local_logits(self) -> int:
        return self.tokens * self.local_vocab


def lm_head_slice(s: Setup) -> tuple[int, float]:
    """A ColwiseParallel lm_head feeding a logits-level loss: its bf16 logits slice [N, V/TP] and
    its weight's gradient [V/TP, H]; its backward's all-reduce of grad_hidden [N, H]."""
    sent = 2 * (s.tp - 1) / s.tp * s.tokens * s.hidden * s.act_bytes
    return (s.local_logits + s.local_vocab * s.hidden) * s.act_bytes, sent


def fastalign_logits(s: Setup) -> dict:
    """Vocabulary-parallel token_logprobs on the model's logits slice (fastalign/vocab_parallel.py):
    the kernel reads the slice in place; backward writes its gradient once, in the logits' dtype.
    One all-gather of 8 fp32 per token (the slice's shift, log-sum, label log-prob, ownership,
    entropy, log sum p^2, mean, top-1)."""
    head_memory, head_sent = lm_head_slice(s)
    memory = head_memory + s.local_logits * s.act_bytes     # the slice and its gradient
    sent = head_sent + (s.tp - 1) * s.tokens * 8 * 4        # ring all-gather: its part to R - 1 ranks
    return {"memory": memory, "sent": sent, "collectives": 2 if s.tp > 1 else 0}


def fastalign_hidden(s: Setup) -> dict:
    """linear_token_logprobs(process_group=) on hidden [N, H] and the lm_head's rows [V/TP, H]:
    blocks of logits (block_elements values; logits and their gradient), the fp32 weight-gradient
    accumulator [V/TP, H]; the same all-gather, and backward's all-reduce of grad_hidden [N, H]
    (which replaces the model's ColwiseParallel one)."""
    rows = min(s.tokens, max(256, s.block_elements // s.local_vocab))
    memory = 2 * rows * s.local_vocab * s.act_bytes + s.local_vocab * s.hidden * 4
    sent = (s.tp - 1) * s.tokens * 8 * 4 + 2 * (s.tp - 1) / s.tp * s.tokens * s.hidden * s.act_bytes
    return {"memory": memory, "sent": sent, "collectives": 2 if s.tp > 1 else 0}


def verl_megatron(s: Setup) -> dict:
    """verl's Megatron actor: Megatron-Core's vocab_parallel_cross_entropy for the log-probs (an
    fp32 copy of the slice, exponentiated in place and kept for backward; all-reduces of the row
    max, the label's logit and the sum of exponentials) and verl's _VocabParallelEntropy
    (verl/utils/megatron/tensor_parallel.py: logits - max into a new buffer, exponentiated and
    normalized in place and kept for backward, with the slice; all-reduces of the max, the sum and
    sum p * z). Backward: each returns an fp32 gradient of the slice, summed into the logits'."""
    head_memory, head_sent = lm_head_slice(s)
    fp32_slice = s.local_logits * 4
    memory = head_memory + 2 * fp32_slice + 2 * fp32_slice  # two saved softmaxes, two backward gradients
    sent = head_sent + 6 * s.tokens * 4 * 2 * (s.tp - 1) / s.tp  # ring all-reduce: 2 (R-1)/R
    return {"memory": memory, "sent": sent, "collectives": 7 if s.tp > 1 else 0}


def liger_fused_linear(s: Setup) -> dict:
    """Liger's fused linear losses take the whole lm_head: under TP it is all-gathered ([V, H] in
    bf16) and its gradient ([V, H], accumulated in the weight's dtype) reduce-scattered back; with
    the whole weight each rank's grad_hidden is complete (no all-reduce)."""
    weight = s.vocab * s.hidden * s.act_bytes
    chunk = s.tokens // max(1, -(-s.vocab // s.hidden)) * s.vocab * 4  # Liger's chunk of fp32 logits
    memory = 2 * weight + chunk
    sent = 2 * weight * (s.tp - 1) / s.tp if s.tp > 1 else 0  # all-gather + reduce-scatter
    return {"memory": memory, "sent": sent, "collectives": 2 if s.tp > 1 else 0}


WAYS = {
    "fastalign, from the logits slice": fastalign_logits,
    "fastalign, from hidden states (lm_head rows)": fastalign_hidden,
    "verl Megatron (vocab-parallel CE + entropy)": verl_megatron,
    "Liger fused linear (whole lm_head)": liger_fused_linear,
}


def table(setup: Setup) -> str:
    lines = [f"TP = {setup.tp}, H = {setup.hidden}, V = {setup.vocab:,}, {setup.tokens:,} tokens per rank, "
             f"bf16; per rank, log-probs + entropy, forward + backward (a model, not a measurement)", "",
             "| way | extra memory MiB | sent per step MiB | collectives |", "|---|---:|---:|---:|"]
    for name, way in WAYS.items():
        r = way(setup)
        lines.append(f"| {name} | {r['memory'] / MIB:,.0f} | {r['sent'] / MIB:,.2f} | {r['collectives']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args(argv)
    print(table(Setup(hidden=args.hidden, vocab=args.vocab, tokens=args.tokens, tp=args.tp)))


if __name__ == "__main__":
    main()
