"""A tiny Llama and a word-level tokenizer built in code (no hub access), and the pieces the
end-to-end trainer tests share: stock TRL and fastalign-patched TRL are trained from the same seed
and their logs compared step by step."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

VOCAB = 1000
WORDS = [f"w{i}" for i in range(VOCAB - 4)]
# Logged values that are wall-clock or bookkeeping, not the training math.
NOT_MATH = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second",
            "epoch", "step", "learning_rate", "total_flos", "train_loss", "grad_norm")


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def _config(**overrides):
    from transformers import LlamaConfig

    values = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    values.update(overrides)
    return LlamaConfig(**values)


def causal_lm(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(_config(**overrides))


def saved_causal_lm(path, **overrides) -> str:
    """The tiny model and its tokenizer saved under `path`: GRPO and RLOO load their reference model
    (beta > 0) from the policy's path."""
    causal_lm(**overrides).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return str(path)


def sequence_classifier(seed: int = 0):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(_config(num_labels=1))


def sentence(rng, lo: int, hi: int) -> str:
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(torch.randint(lo, hi, (1,), generator=rng)),),
                                                       generator=rng))


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    rng = torch.Generator().manual_seed(seed)
    # Completions start with a space: TRL joins prompt and completion as strings.
    return [{"prompt": sentence(rng, 3, 7), "chosen": " " + sentence(rng, 2, 6), "rejected": " " + sentence(rng, 2, 6)}
            for _ in range(n)]


def prompt_rows(n: int, seed: int = 0) -> list[dict]:
    rng = torch.Generator().manual_seed(seed)
    return [{"prompt": sentence(rng, 3, 7)} for _ in range(n)]


# KTO's labels, batches of 4: mixed, all desirable (TRL then leaves the rejected group's metrics out), mixed.
KTO_LABELS = [True, False, True, False, True, True, True, True, False, True, False, False]


def kto_rows(n: int, seed: int = 0) -> list[dict]:
    rng = torch.Generator().manual_seed(seed)
    # Completions start with a space: TRL joins prompt and completion as strings.
    return [{"prompt": sentence(rng, 3, 7), "completion": " " + sentence(rng, 2, 6),
             "label": KTO_LABELS[i % len(KTO_LABELS)]} for i in range(n)]


def reward_rows(n: int, margin: bool, seed: int = 0) -> list[dict]:
    rows = preference_rows(n, seed)
    if margin:
        rng = torch.Generator().manual_seed(seed + 100)
        for row, value in zip(rows, torch.rand(n, generator=rng).tolist()):
            row["margin"] = 2 * value
    return rows


def chat_tokenizer():
    """`tokenizer()` with a plain chat template (the turns' texts one after another), for trainers
    that take conversations (GKD's ChatML collator finds the completion where the prompt ends)."""
    tok = tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tok


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """Conversations of one user turn and one assistant turn."""
    rng = torch.Generator().manual_seed(seed)
    return [{"messages": [{"role": "user", "content": sentence(rng, 3, 7)},
                          {"role": "assistant", "content": sentence(rng, 2, 6)}]} for _ in range(n)]


def length_reward(completions, **kwargs) -> list[float]:
    """A rule-based reward: how many times the completion says an even-numbered word, minus length / 4."""
    rewards = []
    for text in completions:
        words = text.split()
        even = sum(1 for w in words if w.startswith("w") and w[1:].isdigit() and int(w[1:]) % 2 == 0)
        rewards.append(float(even) - len(words) / 4)
    return rewards


def common_args(output_dir, **overrides) -> dict:
    values = dict(output_dir=str(output_dir), report_to="none", use_cpu=True, bf16=False,
                  gradient_checkpointing=False, per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                  save_strategy="no", disable_tqdm=True, seed=0, learning_rate=1e-3, dataloader_num_workers=0)
    values.update(overrides)
    return values


class Calls:
    """Counts the calls of a module-level function while active, so a parity test can also prove
    that fastalign's code ran (equal logs alone would also hold if the patch did nothing)."""

    def __init__(self, module, name: str):
        self.module, self.name, self.count = module, name, 0

    def __enter__(self):
        self.original = getattr(self.module, self.name)

        def counted(*args, **kwargs):
            self.count += 1
            return self.original(*args, **kwargs)

        setattr(self.module, self.name, counted)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.original)
        return False


def lm_head_calls() -> Calls:
    """Counts fastalign's fused LM head calls (TRL's `add_fused_lm_head` once patched)."""
    from fastalign.integrations.trl import lm_head

    return Calls(lm_head, "linear_token_logprobs")


def train_logs(make_trainer) -> list[dict]:
    """Trains the trainer `make_trainer()` builds and returns one dict of logged math per step."""
    trainer = make_trainer()
    trainer.train()
    return [{k: v for k, v in entry.items() if k not in NOT_MATH}
            for entry in trainer.state.log_history if "loss" in entry]


def assert_logs_match(stock: list[dict], ours: list[dict], rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Same steps, same logged names, every value within rtol * |value| + atol."""
    assert len(stock) == len(ours) and stock, f"{len(stock)} stock steps vs {len(ours)} fastalign steps"
    for step, (theirs, mine) in enumerate(zip(stock, ours)):
        assert set(theirs) == set(mine), f"step {step}: logged names differ: {sorted(set(theirs) ^ set(mine))}"
        for name, value in theirs.items():
            got = mine[name]
            if isinstance(value, float) and math.isnan(value):
                assert isinstance(got, float) and math.isnan(got), f"step {step} {name}: {got} vs NaN"
                continue
            assert abs(got - value) <= rtol * abs(value) + atol, f"step {step} {name}: fastalign {got} vs TRL {value}"
