"""GRPOConfig(use_adaptive_entropy=True) through fastalign's GRPO drop-in: TRL 1.16's adaptive
entropy controller (Skywork-OR1, arXiv 2505.22312; `GRPOTrainer._compute_loss`: the coefficient
gated on `_last_world_entropy`, the window's entropy sum and token count in
`_entropy_window_stats`, reduced over processes at `sync_gradients`, the coefficient moved by
`entropy_coef_delta` within [entropy_coef_min, entropy_coef_max]) on TRL's own trainer state.
Checked against stock TRL call by call on a stand-in trainer, across two processes (threads) with
different token counts, and over a tiny training run with checkpoints."""

from __future__ import annotations

import json
import math
import os

import grpo_cases
import pytest
import tiny_trl
import torch
from threaded_accelerator import run_as_processes

from fastalign import reference as fastalign_reference

trl = pytest.importorskip("trl")

from fastalign.integrations import trl as fa_trl  # noqa: E402
from fastalign.integrations.trl import grpo as fa_grpo  # noqa: E402

B, T = grpo_cases.B, grpo_cases.T
TARGET = 1.0
CONTROLLER = dict(use_adaptive_entropy=True, entropy_coef=0.1, entropy_coef_delta=0.05, entropy_coef_max=0.12,
                  entropy_target=TARGET)
# Micro-batches: counted tokens per row and the entropy level of those tokens. A window of many
# low-entropy tokens and few high-entropy ones has a token-weighted mean below the target while
# the mean of its two micro-batch means is above it (and the reverse): the controller must weigh
# tokens, not micro-batches.
MANY_LOW, FEW_HIGH = ((7, 7, 6, 5), 0.7), ((1, 1, 1, 1), 1.9)
MANY_HIGH, FEW_LOW = ((7, 7, 6, 5), 1.4), ((1, 1, 1, 1), 0.3)


def _micro_batch(spec, config, seed):
    """(logits, labels, entropies, inputs) of one micro-batch: rows of the given lengths whose
    counted tokens have entropies near the given level."""
    lengths, level = spec
    torch.manual_seed(seed)
    logits, labels, _, advantages, old, ref = grpo_cases.make_batch()
    mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).long().to(labels.device)
    entropies = (level + 0.1 * torch.rand(B, T, dtype=torch.float64)).to(labels.device)
    options, extras = grpo_cases.split_config(config)
    inputs, _ = grpo_cases.loss_inputs(options, extras, labels, mask, advantages, old, ref, mask.sum())
    inputs = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
    return logits, labels, entropies, inputs


def _call(trainer, batch, compute_loss, training=True):
    """One `_compute_loss` call: (loss, d loss / d logits, d loss / d entropies)."""
    logits, labels, entropies, inputs = batch
    trainer.model.training = training
    leaf, ent = logits.clone().requires_grad_(), entropies.clone().requires_grad_()
    logps = fastalign_reference.token_logprobs(leaf, labels, temperature=grpo_cases.TEMPERATURE).logps
    loss = grpo_cases.run_compute_loss(trainer, logps, ent, inputs, compute_loss)
    grads = torch.autograd.grad(loss, (leaf, ent), allow_unused=True)
    return loss.detach(), [torch.zeros_like(x) if g is None else g for g, x in zip(grads, (leaf, ent))]


def _controller_state(trainer):
    window = trainer._entropy_window_stats
    return trainer.entropy_coef, trainer._last_world_entropy, None if window is None else window.tolist()


def _assert_same_metrics(ours: dict, theirs: dict, where: str = "") -> None:
    """Every logged value, call by call (the trainer's metric lists)."""
    assert set(ours) == set(theirs), f"{where}: {sorted(set(ours) ^ set(theirs))}"
    for name, values in theirs.items():
        assert ours[name] == pytest.approx(values, rel=1e-5, abs=1e-7), f"{where} {name}"


def _assert_same_state(ours, theirs):
    assert ours[0] == pytest.approx(theirs[0], abs=1e-12)
    assert ours[1] == pytest.approx(theirs[1], rel=1e-9) or (math.isinf(ours[1]) and math.isinf(theirs[1]))
    assert (ours[2] is None) == (theirs[2] is None)
    if ours[2] is not None:
        assert ours[2] == pytest.approx(theirs[2], rel=1e-9)


# (micro-batch, training) in call order; gradient accumulation 2: an optimizer step every second
# training call. The evaluation call in between applies the gate but must leave the controller alone.
SCHEDULE = [(MANY_LOW, True), (FEW_HIGH, True), (MANY_LOW, False), (MANY_HIGH, True), (FEW_LOW, True),
            (MANY_LOW, True), (FEW_HIGH, True)]


@pytest.mark.parametrize("config", [
    dict(loss_type="dapo", beta=0.04),
    dict(loss_type="grpo", top_entropy_quantile=0.5),
    dict(loss_type="vespo", is_ratio="token"),
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_controller_equals_trl_call_by_call(config):
    """Every call: the loss, its gradients, the controller state after it; at the end every logged
    value (policy_loss with the bonus gated off and on, entropy_coef once per optimizer step)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    config = dict(config, gradient_accumulation_steps=2, **CONTROLLER)
    options, _ = grpo_cases.split_config(config)
    batches = [_micro_batch(spec, config, seed) for seed, (spec, _) in enumerate(SCHEDULE)]
    runs = []
    for compute_loss in (GRPOTrainer._compute_loss, fa_grpo.compute_loss):
        trainer = grpo_cases.stand_in_trainer(options, use_vllm="is_ratio" in config)
        trace, training_calls = [], 0
        for batch, (_, training) in zip(batches, SCHEDULE):
            training_calls += training
            trainer.accelerator.sync_gradients = not training or training_calls % 2 == 0
            loss, grads = _call(trainer, batch, compute_loss, training)
            trace.append((loss, grads, _controller_state(trainer)))
        runs.append((trace, {mode: dict(values) for mode, values in trainer._metrics.items()}))
    (theirs, their_metrics), (ours, our_metrics) = runs
    for step, ((loss, grads, state), (their_loss, their_grads, their_state)) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(loss, their_loss, rtol=1e-6, atol=1e-9, msg=f"call {step}: loss")
        for name, g, t in zip(("logits", "entropies"), grads, their_grads):
            torch.testing.assert_close(g, t, rtol=1e-6, atol=1e-9, msg=f"call {step}: grad {name}")
        _assert_same_state(state, their_state)
    for mode in ("train", "eval"):
        _assert_same_metrics(our_metrics[mode], their_metrics[mode], mode)
    # Up (capped at entropy_coef_max), down, up: one value per optimizer step.
    assert their_metrics["train"]["entropy_coef"] == pytest.approx([0.12, 0.07, 0.12], abs=1e-12)
    # The evaluation call neither moved the coefficient nor added to the window.
    assert theirs[2][2] == theirs[1][2]


def test_two_processes_reduce_the_window_to_the_global_token_mean():
    """Processes with different token counts: the controller reads the global token-weighted mean
    entropy (sums and counts reduced over processes), not the mean of the processes' means."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    config = dict(loss_type="vespo", beta=0.04, **CONTROLLER)
    options, _ = grpo_cases.split_config(config)
    # Per optimizer step (no accumulation), each process's micro-batch; built here, as the threads
    # share one random generator.
    steps = [(MANY_LOW, FEW_HIGH), (MANY_HIGH, FEW_LOW)]
    batches = [[_micro_batch(spec, config, seed=10 * step + rank) for rank, spec in enumerate(specs)]
               for step, specs in enumerate(steps)]

    def run(compute_loss):
        def on_process(accelerator):
            trainer = grpo_cases.stand_in_trainer(options, accelerator=accelerator)
            trace = []
            for per_process in batches:
                loss, grads = _call(trainer, per_process[accelerator.rank], compute_loss)
                trace.append((loss, grads, _controller_state(trainer)))
            return trace, {name: list(values) for name, values in trainer._metrics["train"].items()}
        return on_process

    stock = run_as_processes(run(GRPOTrainer._compute_loss))
    ours = run_as_processes(run(fa_grpo.compute_loss))
    for (trace, metrics), (their_trace, their_metrics) in zip(ours, stock):
        for (loss, grads, state), (their_loss, their_grads, their_state) in zip(trace, their_trace):
            torch.testing.assert_close(loss, their_loss, rtol=1e-6, atol=1e-9)
            for g, t in zip(grads, their_grads):
                torch.testing.assert_close(g, t, rtol=1e-6, atol=1e-9)
            _assert_same_state(state, their_state)
        _assert_same_metrics(metrics, their_metrics)
    for step, per_process in enumerate(batches):
        sums = counts = 0.0
        for _, _, entropies, inputs in per_process:
            sums += float((entropies * inputs["completion_mask"]).sum())
            counts += float(inputs["completion_mask"].sum())
        for trace, _ in ours:  # every process holds the same, global, value
            assert trace[step][2][1] == pytest.approx(sums / counts, rel=1e-12)
    # Up then down (the mean of the processes' means would have gone down then up).
    assert [state[0] for _, _, state in ours[0][0]] == pytest.approx([0.12, 0.07], abs=1e-12)


def _training_run(model_dir, output_dir, recorder):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    # The tiny model's initial logits are peaked enough (initializer_range 0.5) for the window
    # entropy to cross the target both ways within four steps.
    args = GRPOConfig(**tiny_trl.common_args(output_dir, max_steps=4, gradient_accumulation_steps=2,
                                             save_strategy="steps", save_steps=2),
                      num_generations=4, max_completion_length=8, temperature=1.0, loss_type="dapo",
                      use_adaptive_entropy=True, entropy_coef=0.1, entropy_coef_delta=0.05, entropy_target=2.4)
    torch.manual_seed(0)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=tiny_trl.length_reward, args=args,
                          train_dataset=Dataset.from_list(tiny_trl.prompt_rows(16)),
                          processing_class=tiny_trl.tokenizer())
    recorder.trainer = trainer
    trainer.add_callback(recorder)
    return trainer


def _controller_recorder():
    from transformers import TrainerCallback

    class ControllerRecorder(TrainerCallback):
        """The controller's state after each optimizer step."""

        def __init__(self):
            self.trainer, self.states = None, []

        def on_step_end(self, args, state, control, **kwargs):
            self.states.append((self.trainer.entropy_coef, self.trainer._last_world_entropy))

    return ControllerRecorder()


def test_training_with_adaptive_entropy_matches_stock_trl(tmp_path_factory):
    model_dir = tiny_trl.saved_causal_lm(tmp_path_factory.mktemp("tiny-llama-peaked"), initializer_range=0.5)
    runs = []
    for name in ("stock", "fastalign"):
        recorder, output_dir = _controller_recorder(), tmp_path_factory.mktemp(name)
        if name == "stock":
            logs = tiny_trl.train_logs(lambda: _training_run(model_dir, output_dir, recorder))
        else:
            with fa_trl.patched(trainers=("grpo",)), tiny_trl.Calls(fa_grpo, "grpo_loss") as losses:
                logs = tiny_trl.train_logs(lambda: _training_run(model_dir, output_dir, recorder))
            assert losses.count > 0
        with open(os.path.join(output_dir, "checkpoint-2", "entropy_ctrl_state.json")) as f:
            saved = json.load(f)
        params = {k: v.detach().clone() for k, v in recorder.trainer.model.named_parameters()}
        runs.append((logs, recorder.states, saved, params))
    (stock_logs, stock_states, stock_saved, stock_params), (logs, states, saved, params) = runs
    tiny_trl.assert_logs_match(stock_logs, logs)
    assert [c for c, _ in states] == pytest.approx([c for c, _ in stock_states], abs=1e-12)
    assert [e for _, e in states] == pytest.approx([e for _, e in stock_states], rel=1e-5)
    coefs = [c for c, _ in stock_states]
    assert any(b > a for a, b in zip(coefs, coefs[1:])) and any(b < a for a, b in zip(coefs, coefs[1:]))
    # TRL's checkpoint holds the controller's state as the drop-in left it on the trainer.
    assert saved["entropy_coef"] == pytest.approx(states[1][0], abs=1e-12)
    assert saved["last_world_entropy"] == pytest.approx(states[1][1], rel=1e-12)
    assert saved["entropy_coef"] == pytest.approx(stock_saved["entropy_coef"], abs=1e-12)
    # Adam divides by the root of the squared gradients' average: on an entry whose gradient is at
    # rounding level the runs' last-bit differences become visible steps, so the parameters agree
    # to a small fraction of one update (the learning rate, 1e-3), not to rounding.
    for name, value in stock_params.items():
        torch.testing.assert_close(params[name], value, rtol=0, atol=1e-4, msg=name)
