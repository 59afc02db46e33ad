"""fastalign in a hand-written training loop, no trainer library: DPO, then GRPO, on a tiny causal LM.

    python examples/plain_pytorch.py --steps 10

Needs only torch and fastalign. Runs offline on a CPU in seconds: the model (two causal
self-attention blocks, built from torch.nn with random weights), the token ids, the preferences and
the rewards are all made here. Both losses take the model's last hidden states and its lm_head
weight, so the [batch, seq, vocab] logits are never materialized:

* DPO: `fastalign.linear_token_logprobs` gives the frozen reference's sequence log-probs;
  `fastalign.DPOLoss(hidden=, weight=)` the policy's loss and TRL's metrics. The chosen
  completions are made of one set of 16 tokens, the rejected ones of another, so the reward
  margin should grow.
* GRPO: completions are sampled from the policy, scored by a rule (the share of their tokens,
  up to the end-of-sequence token, among the first 100 ordinary ids: a tenth of the vocabulary),
  turned into group-relative advantages by `fastalign.group_advantages`, and trained for two
  PPO-style epochs per batch with `fastalign.grpo_loss(hidden=, weight=, labels=, old_logps=...)`.
  The mean reward drifts upwards (noisily: each step samples fresh prompts).
"""

from __future__ import annotations

import argparse
import copy

import torch

import fastalign

VOCAB = 1000
EOS = 2
FIRST_WORD = 4  # ids below are special tokens (pad, bos, eos, unk); data and rewards use the rest
MAX_LEN = 64


class TinyCausalLM(torch.nn.Module):
    """Token and position embeddings, pre-norm causal self-attention blocks, a final norm, an lm_head."""

    def __init__(self, vocab: int = VOCAB, hidden: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.position = torch.nn.Embedding(MAX_LEN, hidden)
        # No dropout: the policy (train mode) and its frozen copy (eval mode) must start out equal.
        block = torch.nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=2 * hidden, dropout=0.0,
                                                 batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(hidden)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)


def hidden_states(model: TinyCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """The last block's output after the final norm: what the lm_head would turn into logits."""
    length = input_ids.shape[1]
    x = model.embed(input_ids) + model.position(torch.arange(length, device=input_ids.device))
    causal = torch.nn.Transformer.generate_square_subsequent_mask(length, device=input_ids.device)
    return model.norm(model.blocks(x, mask=causal, is_causal=True))


# The preference DPO learns: completions made of these tokens are chosen over ones made of those.
CHOSEN_WORDS = torch.arange(FIRST_WORD, FIRST_WORD + 16)
REJECTED_WORDS = torch.arange(FIRST_WORD + 16, FIRST_WORD + 32)
# The GRPO reward: the share of a completion's tokens among the first LIKED_WORDS ordinary ids.
LIKED_WORDS = 100


def words(vocabulary: torch.Tensor, *shape: int) -> torch.Tensor:
    return vocabulary[torch.randint(0, len(vocabulary), shape)]


def train_dpo(policy, steps: int, batch: int = 8, prompt_len: int = 12, completion_len: int = 8) -> None:
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    loss_fn = fastalign.DPOLoss(beta=0.1)
    for step in range(1, steps + 1):
        prompts = torch.randint(FIRST_WORD, VOCAB, (batch, prompt_len))
        chosen = torch.cat([prompts, words(CHOSEN_WORDS, batch, completion_len)], dim=1)
        rejected = torch.cat([prompts, words(REJECTED_WORDS, batch, completion_len)], dim=1)
        input_ids = torch.cat([chosen, rejected])  # [2B, T]: the B chosen rows, then the B rejected ones
        completion_mask = torch.zeros_like(input_ids)
        completion_mask[:, prompt_len:] = 1
        # Position t predicts token t + 1: shift once here, then everything below is aligned.
        labels, label_mask = input_ids[:, 1:], completion_mask[:, 1:]

        with torch.no_grad():
            ref = fastalign.linear_token_logprobs(hidden_states(reference, input_ids)[:, :-1],
                                                  reference.lm_head.weight, labels, mask=label_mask)
            ref_chosen, ref_rejected = ref.logps.sum(-1).chunk(2)

        out = loss_fn(hidden=hidden_states(policy, input_ids)[:, :-1], weight=policy.lm_head.weight,
                      labels=labels, completion_mask=label_mask,
                      ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        m = out.metrics
        print(f"dpo step {step}: loss={out.loss.item():.4f}  rewards/margins={m['rewards/margins'].item():.4f}  "
              f"rewards/accuracies={m['rewards/accuracies'].item():.2f}")


@torch.no_grad()
def sample(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Ancestral sampling, one token at a time; only the last position is ever projected to logits."""
    ids = prompts
    for _ in range(new_tokens):
        logits = hidden_states(model, ids)[:, -1] @ model.lm_head.weight.t()
        ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, -1), 1)], dim=1)
    return ids[:, prompts.shape[1]:]


def train_grpo(policy, steps: int, prompts_per_step: int = 4, group: int = 4, prompt_len: int = 6,
               completion_len: int = 10, epochs: int = 2) -> None:
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    for step in range(1, steps + 1):
        # Each prompt is sampled `group` times; the group's rewards are the baseline of its advantages.
        prompts = torch.randint(FIRST_WORD, VOCAB, (prompts_per_step, prompt_len)).repeat_interleave(group, 0)
        completions = sample(policy, prompts, completion_len)
        is_eos = completions == EOS
        # Tokens up to and including the first EOS count; what was sampled after it does not.
        completion_mask = (is_eos.cumsum(1) - is_eos.long()) == 0
        liked = (completions >= FIRST_WORD) & (completions < FIRST_WORD + LIKED_WORDS)
        rewards = (liked & completion_mask).sum(1) / completion_mask.sum(1)
        advantages = fastalign.group_advantages(rewards, group_size=group)  # (r - mean) / (std + 1e-4) per group

        input_ids = torch.cat([prompts, completions], dim=1)

        def completion_hidden():
            # Position t predicts token t + 1, so the completion is predicted from prompt_len - 1 on.
            return hidden_states(policy, input_ids)[:, prompt_len - 1:-1]

        with torch.no_grad():
            old_logps = fastalign.linear_token_logprobs(completion_hidden(), policy.lm_head.weight, completions,
                                                        mask=completion_mask).logps
        for _ in range(epochs):  # later epochs are off-policy: the clipped ratio to old_logps matters there
            out = fastalign.grpo_loss(
                hidden=completion_hidden(), weight=policy.lm_head.weight, labels=completions,
                completion_mask=completion_mask, advantages=advantages, old_logps=old_logps,
                num_items_in_batch=completion_mask.sum(), loss_type="dapo", epsilon=0.2, epsilon_high=0.28,
            )
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
        print(f"grpo step {step}: reward={rewards.mean().item():.4f}  loss={out.loss.item():.4f}  "
              f"entropy={out.metrics['entropy'].item():.4f}  "
              f"clip_ratio/region_mean={out.metrics['clip_ratio/region_mean'].item():.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps of each phase (default 10)")
    args = parser.parse_args()
    torch.manual_seed(0)
    policy = TinyCausalLM().train()
    train_dpo(policy, args.steps)
    train_grpo(policy, args.steps)


if __name__ == "__main__":
    main()
