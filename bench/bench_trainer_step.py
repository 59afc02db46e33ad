"""One training step of TRL 1.16's DPOTrainer and GRPOTrainer, stock TRL vs fastalign: time and peak memory.

The model is a Llama built from a config (random weights, fp32): vocab 32,000, hidden 256, 2 layers,
so the LM head (policy and, for DPO, reference) is most of the work, as it is on real models at
their real sequence lengths. The tokenizer is word-level, one token per word, so the sequence
lengths are exact.

  dpo_train_step    shape [2B, T, V]: B preference pairs (chosen and rejected rows) of T tokens, a
                    T/2-token prompt and a T/2-token completion (its EOS included); an explicit
                    reference model, sigmoid loss, beta 0.1
  grpo_train_step   shape [B, T, V]: B completions (one prompt sampled B times) of T tokens, a
                    T/2-token prompt and T/2 generated tokens (EOS suppressed until then); loss_type
                    "dapo", beta 0, one step per generation (TRL's defaults)

A step is what the trainer does between two optimizer updates, minus data loading: on a fixed,
already collated batch, `trainer.compute_loss(model, inputs)` (the policy forward through TRL's
fused LM head, the reference forward for DPO, the loss and TRL's metrics), backward, and the
trainer's AdamW step. For GRPO the batch is generated and scored once, by a stock trainer, before
anything is timed, and both rows train on that same batch: generation is the same `model.generate`
with or without fastalign and would only add noise. The learning-rate scheduler is not stepped.

  trl      stock TRL: its fused LM head (`ChunkedLogProbFunction`, every position projected on CPU)
           and its loss
  native   the same trainer built and stepped under `fastalign.integrations.trl.patched(trainers=(...))`:
           the LM head through `fastalign.linear_token_logprobs` (only the completion tokens
           projected) and the trainer's loss through fastalign's

The two rows start from the same weights; after one step each, the loss and the logged entropy of
a second forward are compared (`max_err_loss`, flagged in the report if they disagree).
FASTALIGN_BENCH_QUICK=1 shortens the sequences from 512 to 128 tokens.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import tempfile

import pytest
import torch

from harness import DEVICE, not_run

VOCAB = 32000
WORDS = [f"w{i}" for i in range(VOCAB - 4)]  # ids 0-3 are <pad>, <s>, </s>, <unk>
DPO_PAIRS = 2
GRPO_COMPLETIONS = 4
# The trainer each op steps, as named by fastalign.integrations.trl.
TRAINERS = {"dpo_train_step": "dpo", "grpo_train_step": "grpo"}


def _cases() -> list[dict]:
    seq = 128 if os.environ.get("FASTALIGN_BENCH_QUICK") == "1" else 512
    cases = []
    for op, rows in (("dpo_train_step", 2 * DPO_PAIRS), ("grpo_train_step", GRPO_COMPLETIONS)):
        shape = [rows, seq, VOCAB]
        group = f"{op} float32 {'x'.join(map(str, shape))}"
        cases.append({"op": op, "pass": "step", "shape": shape, "dtype": "float32", "group": group})
    return cases


IMPLS = ["trl", "native"]
CASES = _cases()
PARAMS = [
    pytest.param(case, impl, id=f"{case['op']}-{'x'.join(map(str, case['shape']))}-{impl}")
    for case in CASES
    for impl in IMPLS
]

# Trainers want an output directory even when they save nothing.
_OUTPUT = tempfile.TemporaryDirectory(prefix="fastalign-bench-trainer-")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    ))


def _words(rng: torch.Generator, n: int) -> str:
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=rng).tolist())


def _common_args(rows: int) -> dict:
    return dict(
        output_dir=_OUTPUT.name, report_to="none", use_cpu=True, save_strategy="no", seed=0,
        bf16=False,                    # TRL's default is bf16 autocast; fp32 like the other CPU rows
        gradient_checkpointing=False,  # TRL turns it on; recomputation would blur what the LM head costs
        per_device_train_batch_size=rows, max_steps=1, learning_rate=1e-5, disable_tqdm=True,
    )


def _dpo_trainer(case: dict):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pairs, seq = case["shape"][0] // 2, case["shape"][1]
    prompt = seq // 2
    rng = torch.Generator().manual_seed(0)
    # TRL appends EOS to each completion: one word fewer makes prompt + completion exactly `seq` tokens.
    rows = [{"prompt": _words(rng, prompt), "chosen": " " + _words(rng, seq - prompt - 1),
             "rejected": " " + _words(rng, seq - prompt - 1)} for _ in range(pairs)]
    model = _model()
    ref_model = copy.deepcopy(model)  # before the trainer wraps model.forward
    args = DPOConfig(**_common_args(pairs), beta=0.1)
    return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=_tokenizer())


def _even_words(completions, **kwargs) -> list[float]:
    """A rule-based reward (the share of even-numbered words), so the advantages are not all zero."""
    return [sum(int(w[1:]) % 2 == 0 for w in c.split() if w[1:].isdigit()) / max(len(c.split()), 1)
            for c in completions]


def _grpo_trainer(case: dict):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    completions, seq = case["shape"][0], case["shape"][1]
    prompt, new_tokens = seq // 2, seq - seq // 2
    rng = torch.Generator().manual_seed(0)
    args = GRPOConfig(**_common_args(completions), num_generations=completions, max_completion_length=new_tokens,
                      generation_kwargs={"min_new_tokens": new_tokens}, loss_type="dapo", beta=0.0)
    return GRPOTrainer(model=_model(), reward_funcs=_even_words, args=args,
                       train_dataset=Dataset.from_list([{"prompt": _words(rng, prompt)} for _ in range(2)]),
                       processing_class=_tokenizer())


BUILD = {"dpo_train_step": _dpo_trainer, "grpo_train_step": _grpo_trainer}

_BATCHES: dict = {}
_CHECKS: dict = {}


def _batch(case: dict) -> dict:
    """The collated (GRPO: generated and scored) batch every row of the case trains on."""
    key = (case["op"], tuple(case["shape"]))
    if key not in _BATCHES:
        _BATCHES.clear()
        gc.collect()
        trainer = BUILD[case["op"]](case)
        trainer.model.train()  # GRPO generates (and buffers) only in training mode
        torch.manual_seed(0)
        batch = next(iter(trainer.get_train_dataloader()))
        inputs = trainer._prepare_inputs(batch)
        del trainer
        gc.collect()
        # The rows and sequence length the case names are what the trainer really got.
        tokens = inputs["input_ids"] if "input_ids" in inputs else torch.cat(
            [inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        got, want = list(tokens.shape), case["shape"][:2]
        assert got == want, f"{case['op']}: the trainer's batch is {got} tokens, the case says {want}"
        _BATCHES[key] = inputs
    return _BATCHES[key]


def _check_available(case: dict, impl: str) -> str:
    if DEVICE != "cpu":
        not_run(case, impl, "a CPU benchmark (FASTALIGN_BENCH_DEVICE=cpu runs it on this machine)")
    try:
        import trl  # noqa: F401
    except ImportError as exc:
        not_run(case, impl, f"trl not importable: {exc}")
    name = {"dpo_train_step": "DPOTrainer", "grpo_train_step": "GRPOTrainer"}[case["op"]]
    return f"TRL {name}" if impl == "trl" else f"fastalign-patched {name}"


@pytest.mark.parametrize("case,impl", PARAMS)
def bench_train_step(measure, case, impl):
    import fastalign.integrations.trl as fa_trl

    label = _check_available(case, impl)
    inputs = _batch(case)
    assert not fa_trl.is_patched(), "an earlier row left TRL patched"
    patch = fa_trl.patched(trainers=(TRAINERS[case["op"]],)) if impl == "native" else contextlib.nullcontext()
    with patch:
        trainer = BUILD[case["op"]](case)
        model = trainer.model
        model.train()
        trainer.create_optimizer()
        # Set by Trainer.train(); GRPO's loss normalizes by it.
        trainer.current_gradient_accumulation_steps = 1

        def step():
            loss = trainer.compute_loss(model, inputs)
            trainer.accelerator.backward(loss)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        # One step from the shared initial weights, then a forward: both rows must agree on it.
        step()
        with torch.no_grad():
            loss = trainer.compute_loss(model, inputs).item()
        check = {"loss": loss, "entropy": trainer._metrics["train"]["entropy"][-1]}
        checks = _CHECKS.setdefault((case["op"], tuple(case["shape"])), {})
        checks[impl] = check
        extra = {}
        if impl != "trl" and "trl" in checks:
            extra["max_err_loss"] = max(abs(check[k] - checks["trl"][k]) for k in check)
        measure(step, case=case, impl=impl, label=label, extra=extra)
