"""`GRPOTrainer._compute_loss` through `fastalign.grpo_loss`.

TRL's forward stays (`_get_per_token_logps_and_entropies`, whose fused LM head fastalign serves
once patched); the loss over its per-token log-probs and entropies, and every metric TRL logs in
`_compute_loss`, come from fastalign with TRL's reductions across processes. Options map one to
one onto `fastalign.grpo_options(convention="trl")`."""

from __future__ import annotations

from ...grpo import TRL_LOSS_TYPES, grpo_loss
from ._forward import completion_logps_and_entropies


def check(trainer) -> None:
    """The options fastalign's GRPO loss cannot serve, named."""
    if trainer.loss_type not in TRL_LOSS_TYPES:
        raise ValueError(
            f"GRPOConfig.loss_type={trainer.loss_type!r}: fastalign serves {sorted(TRL_LOSS_TYPES)}; "
            "unpatch fastalign.integrations.trl to train with TRL's own loss"
        )
    if getattr(trainer, "use_adaptive_entropy", False):
        raise ValueError(
            "GRPOConfig.use_adaptive_entropy=True: the adaptive entropy controller is not served by fastalign; "
            "use a fixed entropy_coef or unpatch fastalign.integrations.trl"
        )


def compute_loss(self, model, inputs):
    from . import gather_for

    check(self)
    completion_mask = inputs["completion_mask"]
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    per_token_logps, entropies, aux_loss = completion_logps_and_entropies(self, model, inputs)
    mode = "train" if self.model.training else "eval"
    train = mode == "train"
    # Evaluation neither accumulates nor splits the generation batch across steps.
    accumulation = self.current_gradient_accumulation_steps if train else 1
    use_is_ratio = self.use_vllm and self.vllm_importance_sampling_correction
    args = self.args
    out = grpo_loss(
        logps=per_token_logps,
        entropies=entropies,
        completion_mask=mask,
        advantages=inputs["advantages"],
        old_logps=inputs.get("old_per_token_logps"),
        ref_logps=inputs["ref_per_token_logps"] if self.beta != 0.0 else None,
        importance_sampling_ratio=inputs["importance_sampling_ratio"] if use_is_ratio else None,
        sampling_logps=inputs.get("sampling_per_token_logps") if self.off_policy_mask_threshold is not None else None,
        num_items_in_batch=inputs.get("num_items_in_batch"),
        gather=gather_for(self.accelerator),
        convention="trl",
        loss_type=self.loss_type,
        epsilon_low=self.epsilon_low,
        epsilon_high=self.epsilon_high,
        delta=args.delta,
        beta=self.beta,
        use_bias_correction_kl=args.use_bias_correction_kl,
        importance_sampling_level=self.importance_sampling_level,
        sapo_temperature_pos=args.sapo_temperature_pos,
        sapo_temperature_neg=args.sapo_temperature_neg,
        top_entropy_quantile=self.top_entropy_quantile,
        entropy_coef=self.entropy_coef if self._entropy_bonus_enabled else 0.0,
        off_policy_mask_threshold=self.off_policy_mask_threshold,
        max_completion_length=self.max_completion_length,
        gradient_accumulation_steps=accumulation,
        num_processes=self.accelerator.num_processes,
        steps_per_generation=args.steps_per_generation if train else 1,
    )
    loss = out.loss
    metrics = self._metrics[mode]
    for name, value in out.metrics.items():
        if name == "entropy_coef":
            # TRL logs the coefficient once per optimizer step, in training only.
            if train and self.accelerator.sync_gradients:
                metrics[name].append(self.entropy_coef)
            continue
        metrics[name].append(float(value))
    if self.aux_loss_enabled:
        loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
        metrics["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
    return loss

