"""fastalign: fused kernels for the losses of LLM post-training.

Every op is a torch.library op with autograd, served by Triton kernels for CUDA tensors, C++
kernels for CPU tensors and a reference PyTorch implementation (the ground truth) otherwise.
"""

from . import reference
from .advantages import group_advantages, reinforce_plus_plus_advantages, remax_advantages
from .backend import BACKENDS, available_backends, current_backend, use_backend
from .cpo import CPOLoss, cpo_loss, cpo_loss_from_logits, cpo_options
from .distillation import DistillationLoss, distillation_loss
from .divergence import TokenDivergence, token_divergence
from .dpo import DPOLoss, dpo_loss, dpo_loss_from_logits, dpo_options
from .gae import GAEOutput, gae
from .linear_divergence import linear_token_divergence
from .linear_logprobs import linear_token_logprobs
from .grpo import GRPOLoss, grpo_loss, grpo_options, vllm_importance_sampling_ratio
from .ppo import PPOLoss, ppo_loss, ppo_options
from .preference_diagnostics import (
    BradleyTerryFit,
    DatasetJudgements,
    IntransitivityReport,
    PairwiseJudgements,
    bradley_terry_fit,
    intransitive_cycles,
    judgements_from_dataset,
)
from .kto import KTOLoss, kto_loss, kto_loss_from_logits, kto_options
from .likelihood_displacement import DisplacementReport, likelihood_displacement, likelihood_displacement_from_logs
from .logprobs import token_logprobs
from .orpo import ORPOLoss, orpo_loss, orpo_loss_from_logits, orpo_options
from .reward import RewardLoss, bradley_terry_loss, reward_loss, reward_options
from .reward_ensemble import (
    EnsemblePreferences,
    FlaggedPairs,
    ensemble_preferences,
    ensemble_rewards,
    flag_inconsistent_pairs,
)
from .reward_ensemble_dataset import flag_inconsistent_rows
from .rloo import RLOOLoss, rloo_loss, rloo_options
from .rrhf import RRHFLoss, rrhf_loss, rrhf_loss_from_logits, rrhf_options
from .topk_divergence import topk_token_divergence
# Internal since the losses take hidden=, weight=, bias=; importable for code that built it (passing it
# as logits is deprecated).
from .types import HiddenStates, TokenLogprobs

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BradleyTerryFit",
    "CPOLoss",
    "DPOLoss",
    "DatasetJudgements",
    "DisplacementReport",
    "DistillationLoss",
    "EnsemblePreferences",
    "FlaggedPairs",
    "GAEOutput",
    "IntransitivityReport",
    "KTOLoss",
    "ORPOLoss",
    "PairwiseJudgements",
    "RewardLoss",
    "RLOOLoss",
    "RRHFLoss",
    "TokenDivergence",
    "TokenLogprobs",
    "available_backends",
    "bradley_terry_fit",
    "bradley_terry_loss",
    "cpo_loss",
    "cpo_loss_from_logits",
    "cpo_options",
    "current_backend",
    "distillation_loss",
    "dpo_loss",
    "dpo_loss_from_logits",
    "dpo_options",
    "ensemble_preferences",
    "ensemble_rewards",
    "flag_inconsistent_pairs",
    "flag_inconsistent_rows",
    "gae",
    "likelihood_displacement",
    "likelihood_displacement_from_logs",
    "linear_token_divergence",
    "linear_token_logprobs",
    "GRPOLoss",
    "grpo_loss",
    "grpo_options",
    "vllm_importance_sampling_ratio",
    "PPOLoss",
    "ppo_loss",
    "ppo_options",
    "group_advantages",
    "intransitive_cycles",
    "judgements_from_dataset",
    "kto_loss",
    "kto_loss_from_logits",
    "kto_options",
    "orpo_loss",
    "orpo_loss_from_logits",
    "orpo_options",
    "reference",
    "reinforce_plus_plus_advantages",
    "remax_advantages",
    "reward_loss",
    "reward_options",
    "rloo_loss",
    "rloo_options",
    "rrhf_loss",
    "rrhf_loss_from_logits",
    "rrhf_options",
    "token_divergence",
    "token_logprobs",
    "topk_token_divergence",
    "use_backend",
]
