"""`KTOTrainer._compute_loss` through `fastalign.kto_loss`.

TRL's forwards stay: the policy on the KL batch (no_grad) and on the completions, and the reference
model on both (or the precomputed reference log-probs, or the policy with its PEFT adapter off),
each through the fused LM head that fastalign serves once patched. The loss over their
per-completion log-prob sums and every metric TRL logs in `_compute_loss` come from fastalign
(`kto_loss`, `kto_token_metrics`), reduced across processes as TRL reduces them."""

from __future__ import annotations

import math
import warnings

import torch
from trl.trainer.kto_trainer import disable_gradient_checkpointing, is_peft_model, use_adapter

from ...kto import kto_loss, kto_options, kto_token_metrics

# Batch entries that are not model inputs (TRL's `_non_model_keys` in `_compute_loss`).
_NOT_MODEL_INPUTS = frozenset({
    "completion_mask", "KL_input_ids", "KL_attention_mask", "KL_completion_mask", "KL_token_type_ids",
    "KL_mm_token_type_ids", "label", "ref_logps", "ref_KL_logps",
})
# Logged only when that group has a completion (a completion token, for logits/*) on some process: NaN otherwise.
_GROUP_METRICS = ("logits/chosen", "logits/rejected", "rewards/chosen", "logps/chosen", "rewards/rejected",
                  "logps/rejected", "rewards/margins")


def _options(trainer):
    # Read from the trainer's attributes, as TRL's loss reads them.
    try:
        return kto_options(beta=trainer.beta, loss_type=trainer.loss_type, desirable_weight=trainer.desirable_weight,
                           undesirable_weight=trainer.undesirable_weight)
    except ValueError as error:
        raise ValueError(
            f"KTOConfig.{error}; unpatch fastalign.integrations.trl to train with TRL's own loss"
        ) from error


def check(trainer) -> None:
    """The options fastalign's KTO loss cannot serve, named."""
    _options(trainer)


def _metrics_gather(accelerator):
    """TRL reduces every KTO metric with `gather_for_metrics` (which, at the end of an uneven
    dataloader, keeps only the first `remainder` processes' values); the same call keeps fastalign's
    reductions identical. None with a single process: the metrics are then local."""
    return None if accelerator.num_processes == 1 else accelerator.gather_for_metrics


def _reference_logps(self, batch, model_kwargs, labels, seq_len):
    """The reference's log-prob sums over the completions and (None without the KL term) over the KL
    completions, as TRL's `_compute_loss` runs them: the reference model, or the PEFT policy with its
    adapter disabled (or switched to "ref")."""
    ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
    with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
        if is_peft_model(self.model) and self.ref_model is None:
            unwrapped = self.accelerator.unwrap_model(self.model)
            with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                ref_kl_logps = self._compute_kl_logps(self.model, batch)
                outputs = self.model(**ref_kwargs, labels=labels, fused_lm_head=True)
        else:
            ref_kl_logps = self._compute_kl_logps(self.ref_model, batch)
            outputs = self.ref_model(**ref_kwargs, labels=labels, fused_lm_head=True)
    return outputs.log_probs[:, -seq_len:].sum(-1), ref_kl_logps


def compute_loss(self, model, inputs, return_outputs):
    options = _options(self)
    mode = "train" if self.model.training else "eval"
    batch = {k: (v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    gather = _metrics_gather(self.accelerator)

    kl_logps = self._compute_kl_logps(model, batch)
    model_kwargs = {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}
    model_kwargs["use_cache"] = False
    if self.aux_loss_enabled:
        model_kwargs["output_router_logits"] = True
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
    # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens.
    seq_len = batch["input_ids"].size(1) - 1
    per_token_logps = outputs.log_probs[:, -seq_len:]
    desirable = torch.as_tensor(batch["label"], dtype=torch.bool, device=per_token_logps.device)

    if self.precompute_ref_logps:
        ref_logps = batch["ref_logps"]
        ref_kl_logps = batch["ref_KL_logps"] if self.calculate_KL else None
    else:
        ref_logps, ref_kl_logps = _reference_logps(self, batch, model_kwargs, labels, seq_len)

    kl = None
    if self.calculate_KL:
        # TRL's estimate: this process's mean over its mismatched pairs, averaged over processes (kto_loss
        # clamps it). Passed as `kl` rather than as log-prob sums because TRL also takes a last batch of
        # one row, whose only "mismatched" pair is the matched one, and kto_loss would reject that.
        kl = (kl_logps - ref_kl_logps).mean().detach()
        if gather is not None:
            kl = gather(kl.reshape(1)).mean()
    out = kto_loss(per_token_logps.sum(-1), ref_logps, desirable, kl=kl, gather=gather, options=options)
    token_metrics = kto_token_metrics(outputs.entropy[:, -seq_len:], outputs.mean_logits[:, -seq_len:],
                                      batch["completion_mask"][:, 1:], desirable, gather=gather)
    values = {**out.metrics, **token_metrics}
    values = dict(zip(values, torch.stack(list(values.values())).tolist()))  # one device sync for all of them

    metrics = self._metrics[mode]
    metrics["kl"].append(values["kl"])
    metrics["entropy"].append(values["entropy"])
    if mode == "train":
        num_tokens_in_batch = self.accelerator.gather_for_metrics(batch["attention_mask"].sum()).sum().item()
        self._total_train_tokens += num_tokens_in_batch // self._tp_size
    metrics["num_tokens"] = [self._total_train_tokens]
    for name in _GROUP_METRICS:
        if not math.isnan(values[name]):
            metrics[name].append(values[name])

    loss = out.loss
    if self.aux_loss_enabled:
        aux_loss = outputs.aux_loss
        loss = loss + self.router_aux_loss_coef * aux_loss
        metrics["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

    if return_outputs:
        warnings.warn(
            "`return_outputs=True`, and the logits it passes to `compute_metrics`, are deprecated and will be removed "
            "in v2.0.0. The fused LM head does not build the logits, so they are recomputed with an extra forward pass.",
            FutureWarning,
            stacklevel=2,
        )
        with torch.no_grad():
            outputs = model(**model_kwargs)
    return (loss, outputs) if return_outputs else loss
