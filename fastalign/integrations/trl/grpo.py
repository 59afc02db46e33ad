"""`GRPOTrainer._compute_loss` through `fastalign.grpo_loss`.

TRL's forward stays (`_get_per_token_logps_and_entropies`, whose fused LM head fastalign serves
once patched); the loss over its per-token log-probs and entropies, and every metric TRL logs in
`_compute_loss`, come from fastalign with TRL's reductions across processes. Options map one to
one onto `fastalign.grpo_options(convention="trl")`.

The adaptive entropy controller (`use_adaptive_entropy=True`, Skywork-OR1) is TRL's, on TRL's own
trainer state: the bonus applies `entropy_coef` only while `_last_world_entropy` (the previous
optimizer step's entropy) is at or below `entropy_target`; each training micro-batch adds its
entropy sum and token count to `_entropy_window_stats`; at the optimizer step those are summed
over every process, the coefficient moves by `entropy_coef_delta` within
[`entropy_coef_min`, `entropy_coef_max`], and `_last_world_entropy` is set. TRL's checkpoints save
and restore the same attributes."""

from __future__ import annotations

import torch

from ...grpo import TRL_LOSS_TYPES, _high_entropy_mask, grpo_loss
from ...grpo_metrics import TRL_GA_SCALED
from ...policy_inputs import check_nonnegative
from ._forward import completion_logps_and_entropies

VESPO_OPTIONS = ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")


def check(trainer) -> None:
    """The options fastalign's GRPO loss cannot serve, named."""
    if trainer.loss_type not in TRL_LOSS_TYPES:
        raise ValueError(
            f"GRPOConfig.loss_type={trainer.loss_type!r}: fastalign serves {sorted(TRL_LOSS_TYPES)}; "
            "unpatch fastalign.integrations.trl to train with TRL's own loss"
        )
    args = trainer.args
    # Coefficients the loss would refuse at the first step: named now, under GRPOConfig's names.
    values = [("entropy_coef", trainer.entropy_coef)]
    if trainer.use_adaptive_entropy:
        values += [("entropy_coef_min", args.entropy_coef_min), ("entropy_coef_max", args.entropy_coef_max)]
    if trainer.loss_type == "vespo":
        values += [(name, getattr(args, name)) for name in VESPO_OPTIONS]
    for name, value in values:
        try:
            check_nonnegative(f"GRPOConfig.{name}", value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{error}; unpatch fastalign.integrations.trl to train with TRL's own loss") from None


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
    gather = gather_for(self.accelerator)
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
        gather=gather,
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
        **{name: getattr(args, name) for name in VESPO_OPTIONS},
        top_entropy_quantile=self.top_entropy_quantile,
        entropy_coef=applied_entropy_coef(self),
        off_policy_mask_threshold=self.off_policy_mask_threshold,
        max_completion_length=self.max_completion_length,
        gradient_accumulation_steps=accumulation,
        num_processes=self.accelerator.num_processes,
        steps_per_generation=args.steps_per_generation if train else 1,
    )
    loss = out.loss
    metrics = self._metrics[mode]
    for name, value in out.metrics.items():
        if name != "entropy_coef":  # the trainer's own coefficient, logged below
            metrics[name].append(float(value))
    if self._entropy_bonus_enabled:
        if "policy_loss" not in out.metrics:
            # A coefficient of 0 this window (the controller's gate shut, or the coefficient at 0):
            # the loss is the policy loss alone, logged as TRL logs it (before its scaling for
            # gradient accumulation).
            policy = loss.detach() * (accumulation if self.loss_type in TRL_GA_SCALED else 1)
            metrics["policy_loss"].append(self.accelerator.gather(policy).nanmean().item())
        if self.use_adaptive_entropy and train:
            update_entropy_controller(self, entropies, mask, gather)
        # Once per optimizer step, in training only, after the controller's update (as TRL logs it).
        if train and self.accelerator.sync_gradients:
            metrics["entropy_coef"].append(self.entropy_coef)
    if self.aux_loss_enabled:
        loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
        metrics["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
    return loss


def applied_entropy_coef(trainer) -> float:
    """The entropy bonus's coefficient for this micro-batch: the static one, or, under the adaptive
    controller, the coefficient set at the last optimizer step while the entropy measured then is at
    or below the target (0 otherwise), so every micro-batch of a window applies the same bonus."""
    if not trainer._entropy_bonus_enabled:
        return 0.0
    if trainer.use_adaptive_entropy and not trainer._last_world_entropy <= trainer.args.entropy_target:
        return 0.0
    return trainer.entropy_coef


def update_entropy_controller(trainer, entropies, mask, gather) -> None:
    """Adds this micro-batch's entropy sum and token count (over the tokens the bonus acts on) to
    the window; at the optimizer step, the window's global token-weighted mean entropy (sums and
    counts reduced over every process) moves the coefficient for the next step."""
    effective = mask
    if trainer.top_entropy_quantile < 1.0:
        effective = mask * _high_entropy_mask(entropies.detach(), mask, trainer.top_entropy_quantile, gather)
    stats = torch.stack([(entropies * effective).sum(), effective.sum()]).detach()
    window = trainer._entropy_window_stats
    trainer._entropy_window_stats = stats if window is None else window + stats
    if not trainer.accelerator.sync_gradients:
        return
    totals = trainer.accelerator.reduce(trainer._entropy_window_stats, reduction="sum")
    world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
    args = trainer.args
    if world_entropy <= args.entropy_target:
        trainer.entropy_coef = min(trainer.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
    else:
        trainer.entropy_coef = max(trainer.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
    trainer._last_world_entropy = world_entropy
    trainer._entropy_window_stats = None
