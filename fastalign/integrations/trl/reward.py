"""`RewardTrainer.compute_loss` through `fastalign.reward_loss`.

TRL's forward stays (the sequence-classification model scores B chosen rows, then B rejected
rows); the Bradley–Terry loss over those scores, with the optional `margin` column and
`center_rewards_coefficient`, and the metrics TRL logs come from fastalign, reduced across
processes as TRL reduces them. fastalign's math runs in fp32 whatever the scores' dtype (TRL's
runs in the head's dtype, so under bf16 the two differ by bf16 rounding)."""

from __future__ import annotations

import torch

from ...reward import reward_loss, reward_options


def _options(trainer):
    try:
        return reward_options(center_rewards_coefficient=trainer.args.center_rewards_coefficient)
    except ValueError as error:
        raise ValueError(
            f"RewardConfig.{error}; unpatch fastalign.integrations.trl to train with TRL's own loss"
        ) from error


def check(trainer) -> None:
    """The options fastalign's reward loss cannot serve, named."""
    _options(trainer)


def _across_processes(accelerator, metrics: dict[str, torch.Tensor]) -> list[float]:
    """min/mean/max reward, accuracy and margin over every process, as TRL reduces them: the scores
    through `gather` (the extremes of the processes' extremes; since accelerate's `gather` needs equal
    shapes, every process scored as many rows, so the mean of their means is the mean of all scores),
    accuracy and margin the mean of the processes' means through `gather_for_metrics`."""
    extremes = torch.stack([metrics["min_reward"], metrics["mean_reward"], metrics["max_reward"]])
    means = torch.stack([metrics["accuracy"], metrics["margin"]])
    if accelerator.num_processes > 1:
        per_process = accelerator.gather(extremes.unsqueeze(0))
        extremes = torch.stack([per_process[:, 0].min(), per_process[:, 1].mean(), per_process[:, 2].max()])
        means = accelerator.gather_for_metrics(means.unsqueeze(0)).mean(0)
    return torch.cat([extremes, means]).tolist()


def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    options = _options(self)
    mode = "train" if self.model.training else "eval"
    # As TRL: the cache would only cost memory (and warn under gradient checkpointing).
    inputs["use_cache"] = False
    outputs = model(**inputs)
    out = reward_loss(outputs.logits, margin=inputs.get("margin"), options=options)

    if mode == "train":
        num_tokens_in_batch = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        self._total_train_tokens += num_tokens_in_batch // self._tp_size
    metrics = self._metrics[mode]
    metrics["num_tokens"] = [self._total_train_tokens]
    low, mean, high, accuracy, margin = _across_processes(self.accelerator, out.metrics)
    metrics["min_reward"].append(low)
    metrics["mean_reward"].append(mean)
    metrics["max_reward"].append(high)
    metrics["accuracy"].append(accuracy)
    metrics["margin"].append(margin)
    return (out.loss, outputs) if return_outputs else out.loss
