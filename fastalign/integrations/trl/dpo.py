"""`DPOTrainer._compute_loss` through fastalign's DPO math.

TRL's forward passes stay: the policy's fused LM head (served by fastalign once patched) and the
reference log-probs, from the precomputed columns, `ref_model`, or the PEFT model with its adapter
disabled (or set to "ref"), as TRL chooses them. The reduction to per-sequence sums (LD-DPO
included), every loss type with its weight, WPO, the f-divergences, and the metrics fastalign's DPO
defines (rewards/*, logps/*, logits/*) come from `fastalign.dpo`, reduced across processes as TRL
reduces them. The bookkeeping TRL logs besides (entropy, num_tokens, mean_token_accuracy, aux_loss)
is TRL's own code, in TRL's order. Every DPOConfig option maps one to one onto `dpo_options`."""

from __future__ import annotations

import warnings

import torch

from ...dpo import dpo_from_sequences, dpo_options, pairs_from_tokens
from ...types import TokenLogprobs

# Batch keys that are not model inputs (TRL's `_non_model_keys`).
_NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")


def _options(trainer):
    # Read from the trainer's attributes, as TRL's loss reads them, so a callback changing e.g.
    # `trainer.beta` mid-training acts the same on both.
    try:
        return dpo_options(
            beta=trainer.beta, loss_type=trainer.loss_types, loss_weights=trainer.loss_weights,
            label_smoothing=trainer.label_smoothing, f_divergence_type=trainer.f_divergence_type,
            f_alpha_divergence_coef=trainer.f_alpha_divergence_coef, use_weighting=trainer.use_weighting,
            ld_alpha=trainer.ld_alpha, discopop_tau=trainer.args.discopop_tau,
        )
    except (TypeError, ValueError) as error:
        # dpo_options names the option ("beta: expected ..."); say which config it lives in.
        raise ValueError(
            f"DPOConfig.{error}; unpatch fastalign.integrations.trl to train with TRL's own loss"
        ) from error


def check(trainer) -> None:
    """The DPOConfig options fastalign's DPO loss cannot serve, named. fastalign refuses some values
    TRL 1.16 accepts: beta <= 0, ld_alpha outside [0, 1], discopop_tau <= 0, and a label_smoothing
    that no chosen loss type uses (TRL silently ignores it)."""
    _options(trainer)


def _reference_token_logps(self, model_kwargs, labels):
    """The reference's per-token log-probs, from the model TRL would run (TRL's _compute_loss)."""
    from trl.trainer import dpo_trainer as trl_dpo

    # The frozen reference needs no router logits (TRL drops them too).
    kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
    with torch.no_grad(), trl_dpo.disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
        if trl_dpo.is_peft_model(self.model) and self.ref_model is None:
            # A new adapter: the base model (adapters disabled); a re-trained one: its initial copy "ref".
            unwrapped = self.accelerator.unwrap_model(self.model)
            with trl_dpo.use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                return self.model(**kwargs, labels=labels, fused_lm_head=True).log_probs
        return self.ref_model(**kwargs, labels=labels, fused_lm_head=True).log_probs


def compute_loss(self, model, inputs, return_outputs=False):
    from . import gather_for

    options = _options(self)
    mode = "train" if self.model.training else "eval"
    model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
    model_kwargs["use_cache"] = False
    if self.aux_loss_enabled:
        # VLM wrappers honour this only as a forward kwarg, not from the config.
        model_kwargs["output_router_logits"] = True
    completion_mask = inputs["completion_mask"]
    shift_mask = completion_mask[..., 1:]
    labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
    outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)

    # Prompt-learning PEFT prepends virtual tokens to the outputs: the real positions are the last ones.
    seq_len = shift_mask.size(1)

    def real(x):
        return None if x is None else x[:, -seq_len:]

    token = TokenLogprobs(real(outputs.log_probs), real(outputs.entropy), real(outputs.log_sum_sq_probs),
                          real(outputs.mean_logits), real(outputs.is_top1))
    ref_token_logps = None if self.precompute_ref_logps else real(_reference_token_logps(self, model_kwargs, labels))
    counted = shift_mask.bool()  # where the fused head scored a label (every field is 0 elsewhere)
    gather = gather_for(self.accelerator)
    pairs, logits_metrics = pairs_from_tokens(token, counted, options, ref_token_logps, gather)
    if self.precompute_ref_logps:
        pairs = pairs._replace(ref_chosen_logps=inputs["ref_chosen_logps"],
                               ref_rejected_logps=inputs["ref_rejected_logps"])
    # TRL's ipo and sigmoid_norm divide by the unshifted completion mask's count (see DPOPairs.chosen_length).
    chosen_length, rejected_length = completion_mask.sum(dim=1).chunk(2)
    pairs = pairs._replace(chosen_length=chosen_length, rejected_length=rejected_length)
    out = dpo_from_sequences(pairs, options, gather)
    loss = out.loss

    # Metrics in TRL's order; each reduced across processes as TRL reduces it.
    metrics = self._metrics[mode]
    accelerator = self.accelerator
    if self.aux_loss_enabled:
        loss = loss + self.router_aux_loss_coef * outputs.aux_loss
        metrics["aux_loss"].append(accelerator.gather_for_metrics(outputs.aux_loss).mean().item())

    entropy_sum = accelerator.gather_for_metrics((token.entropy.detach() * shift_mask).sum()).sum()
    total_tokens = accelerator.gather_for_metrics(shift_mask.sum()).sum()
    metrics["entropy"].append((entropy_sum / total_tokens).item() if total_tokens > 0 else 0.0)

    if mode == "train":
        num_tokens = accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        self._total_train_tokens += num_tokens // self._tp_size
    metrics["num_tokens"] = [self._total_train_tokens]

    metrics["logits/chosen"].append(float(logits_metrics["logits/chosen"]))
    metrics["logits/rejected"].append(float(logits_metrics["logits/rejected"]))

    chosen_mask = counted.chunk(2)[0]
    correct = accelerator.gather_for_metrics((token.is_top1.chunk(2)[0] & chosen_mask).sum())
    chosen_tokens = accelerator.gather_for_metrics(chosen_mask.sum()).sum()
    metrics["mean_token_accuracy"].append((correct.sum() / chosen_tokens).item() if chosen_tokens > 0 else 0.0)

    for name, value in out.metrics.items():  # rewards/* then logps/*, TRL's order
        metrics[name].append(float(value))

    if return_outputs:
        # As TRL: the fused head builds no logits, so `compute_metrics` gets them from one more forward.
        warnings.warn(
            "`return_outputs=True`, and the logits it passes to `compute_metrics`, are deprecated and will be "
            "removed in v2.0.0. The fused LM head does not build the logits, so they are recomputed with an extra "
            "forward pass.",
            FutureWarning,
            stacklevel=2,
        )
        with torch.no_grad():
            outputs = model(**model_kwargs)
        return loss, outputs
    return loss
