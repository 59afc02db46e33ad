"""`RLOOTrainer._compute_loss` through `fastalign.rloo_loss`.

TRL's forward stays (`_get_per_token_logps_and_entropies`, whose fused LM head fastalign serves
once patched); the sequence-level clipped loss over its per-token log-probs, and every metric TRL
logs in `_compute_loss`, come from fastalign with TRL's reductions across processes. RLOOConfig
has a single loss; its options here are `epsilon` and `epsilon_high`. The KL penalty (`beta`),
reward clipping and the leave-one-out advantages act at generation, which stays TRL's."""

from __future__ import annotations

from ...rloo import clip_range, rloo_loss
from ._forward import completion_logps_and_entropies

def check(trainer) -> None:
    """The options fastalign's RLOO loss cannot serve, named."""
    try:
        clip_range(trainer.epsilon_low, trainer.epsilon_high, prefix="RLOOConfig.")
    except (TypeError, ValueError) as error:
        raise ValueError(f"{error}; unpatch fastalign.integrations.trl to train with TRL's own loss") from None


def compute_loss(self, model, inputs):
    from . import gather_for

    check(self)
    completion_mask = inputs["completion_mask"]
    per_token_logps, entropies, aux_loss = completion_logps_and_entropies(self, model, inputs)
    out = rloo_loss(
        logps=per_token_logps,
        entropies=entropies,
        completion_mask=completion_mask,
        advantages=inputs["advantages"],
        old_logps=inputs["old_logps"],
        epsilon=self.epsilon_low,
        epsilon_high=self.epsilon_high,
        gather=gather_for(self.accelerator),
    )
    loss = out.loss
    metrics = self._metrics["train" if self.model.training else "eval"]
    # RLOO's loss is unscaled (the Trainer divides it by the accumulation steps), and so is its aux term.
    if self.aux_loss_enabled:
        loss = loss + self.router_aux_loss_coef * aux_loss
        metrics["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
    for name, value in out.metrics.items():
        metrics[name].append(float(value))
    return loss
