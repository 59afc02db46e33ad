"""GRPO with TRL's GRPOTrainer and a rule-based reward, its LM head and loss served by fastalign.

    python examples/grpo_trl.py --steps 5

A tiny Llama (random weights, built from a LlamaConfig) and a word-level tokenizer are made in
code, so this runs offline on a CPU in well under a minute. The reward is a plain Python
function of the completion text: +1 for every kind word, -1 for every unkind one, averaged over
the words. The only fastalign line is `fa_trl.patched()`: inside it, TRL's fused LM head runs
on `fastalign.linear_token_logprobs` and `GRPOTrainer`'s loss on `fastalign.grpo_loss`;
generation, rewards, advantages, the config and the logged metrics are TRL's own. Every logged
step is printed at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile

# Nothing here needs the hub; never wait on it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

import fastalign.integrations.trl as fa_trl  # noqa: E402

SUBJECTS = "the cat | a dog | the bird | my friend | the robot".split(" | ")
VERBS = "sat on | looked at | ran to | jumped over".split(" | ")
OBJECTS = "the mat | a tree | the roof | the river".split(" | ")
GOOD = "good nice great kind calm".split()
BAD = "bad awful rude loud cruel".split()
WORDS = sorted({w for phrase in SUBJECTS + VERBS + OBJECTS for w in phrase.split()} | set(GOOD) | set(BAD))
# Logged values that describe the run, not the training math; left out of the printout (as are
# the completions/* length statistics).
BOOKKEEPING = ("epoch", "step", "learning_rate", "grad_norm", "num_tokens", "step_time")


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_model(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def kindness_reward(completions: list[str], **kwargs) -> list[float]:
    """TRL calls this with the decoded completions (and the dataset's other columns as kwargs)."""
    rewards = []
    for text in completions:
        words = text.split()
        score = sum(w in GOOD for w in words) - sum(w in BAD for w in words)
        rewards.append(score / max(len(words), 1))
    return rewards


def prompt_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"} for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps (default 5)")
    args = parser.parse_args()

    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer))
    dataset = Dataset.from_list(prompt_rows(64))

    with tempfile.TemporaryDirectory() as output_dir, fa_trl.patched():
        config = GRPOConfig(
            output_dir=output_dir, report_to="none", use_cpu=True, save_strategy="no", seed=0,
            bf16=False,                    # TRL defaults to bf16 autocast; fp32 keeps the tiny run exact
            gradient_checkpointing=False,  # TRL turns it on by default; pointless for a 2-layer model
            per_device_train_batch_size=8, num_generations=4,  # 2 prompts x 4 completions per step
            max_completion_length=8, max_steps=args.steps, logging_steps=1, learning_rate=1e-3,
            loss_type="dapo", beta=0.0,    # beta > 0 would need a reference model loaded from a path
            disable_tqdm=True,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=kindness_reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # the metrics are printed below, one line per step
        # Patched at the class, so the trainer's own method resolves to fastalign's.
        print(f"GRPOTrainer._compute_loss is {type(trainer)._compute_loss.__module__}.compute_loss")
        trainer.train()

    print(f"GRPO with fastalign (fastalign.integrations.trl): {args.steps} steps")
    for entry in trainer.state.log_history:
        if "loss" not in entry:
            continue
        metrics = "  ".join(f"{k}={v:.4g}" for k, v in entry.items()
                            if k not in BOOKKEEPING and not k.startswith("completions/")
                            and isinstance(v, (int, float)))
        print(f"step {entry['step']}: {metrics}")


if __name__ == "__main__":
    main()
