"""One call switches TRL 1.16's trainers to fastalign; another restores stock TRL.

    import fastalign.integrations.trl as fa_trl
    fa_trl.patch()      # every DPO / GRPO / KTO / RLOO / SFT / Reward / Distillation / GKD trainer
    trainer.train()
    fa_trl.unpatch()    # stock TRL again

Two layers, both looked up by TRL at call time (so trainers built before `patch()` switch too):

* fused heads: the fused LM head that DPO, GRPO, KTO, RLOO and SFT run for the policy and the
  reference model (`add_fused_lm_head`) is served by `fastalign.linear_token_logprobs`
  (`lm_head.py`), and the DistillationTrainer's fused student-teacher divergence by
  `fastalign.linear_token_divergence` (`distillation.py`); only the counted tokens are projected
  (TRL's "compact" mode, on every device);
* losses (`losses=True`): the trainers' loss methods (`GRPOTrainer._compute_loss`, ...) are
  replaced by ones that keep TRL's forward passes and run fastalign's loss on their outputs,
  logging TRL's metric names with TRL's reductions across processes; GKD's
  `generalized_jsd_loss` is served by `fastalign.token_divergence`.

An option a replaced loss cannot serve raises a ValueError naming it when the trainer is built
(or, for a trainer built before `patch()`, at its first loss), never a fallback to other math.
"""

from __future__ import annotations

import importlib

import torch

from ..._checks import check_flag
from ._patching import Swaps, checked_init

# trainer name -> (TRL module, class, loss method, fastalign module holding `compute_loss` and `check`)
LOSSES = {
    "dpo": ("trl.trainer.dpo_trainer", "DPOTrainer", "_compute_loss", "dpo"),
    "grpo": ("trl.trainer.grpo_trainer", "GRPOTrainer", "_compute_loss", "grpo"),
    "kto": ("trl.trainer.kto_trainer", "KTOTrainer", "_compute_loss", "kto"),
    "rloo": ("trl.trainer.rloo_trainer", "RLOOTrainer", "_compute_loss", "rloo"),
    "reward": ("trl.trainer.reward_trainer", "RewardTrainer", "compute_loss", "reward"),
}
# trainer name -> (TRL module, class, static loss method) replaced by fastalign.integrations.trl.distillation's
STATIC_LOSSES = {
    "gkd": ("trl.experimental.gkd.gkd_trainer", "GKDTrainer", "generalized_jsd_loss"),
}
TRAINERS = (*LOSSES, *STATIC_LOSSES)

_SWAPS = Swaps()


def is_patched() -> bool:
    return bool(_SWAPS)


def patch(*, lm_head: bool = True, losses: bool = True, trainers: tuple[str, ...] | None = None) -> None:
    """Routes TRL's fused heads (`lm_head`: the log-prob head and the DistillationTrainer's
    divergence) and the loss methods (`losses`) of `trainers` (names from TRAINERS, or one name;
    default: all of them) through fastalign. Calling it twice is an error: undo first."""
    if _SWAPS:
        raise RuntimeError("fastalign.integrations.trl is already patched; call unpatch() first")
    # Checked before TRL is imported (seconds), so that a typo fails at once and names itself.
    check_flag("lm_head", lm_head)
    check_flag("losses", losses)
    if isinstance(trainers, str):
        trainers = (trainers,)
    elif trainers is not None and not isinstance(trainers, (tuple, list, set, frozenset)):
        raise TypeError(f"trainers: expected trainer names from {sorted(TRAINERS)}, got {type(trainers).__name__}")
    chosen = TRAINERS if trainers is None else tuple(trainers)
    unknown = [t for t in chosen if t not in TRAINERS]
    if unknown:
        raise ValueError(f"trainers: unknown {unknown}; expected names from {sorted(TRAINERS)}")
    import trl.trainer.utils as trl_utils

    import trl.trainer.distillation_trainer as trl_distillation

    from . import distillation
    from .lm_head import FastalignChunkedLogProb

    for name in ("_ChunkedLogProbFunction", "_use_triton"):
        if not hasattr(trl_utils, name):
            raise RuntimeError(
                f"trl.trainer.utils.{name} not found: fastalign.integrations.trl targets TRL 1.16's fused LM head"
            )
    try:
        if lm_head:
            _SWAPS.swap(trl_utils, "_ChunkedLogProbFunction", FastalignChunkedLogProb)
            # Compact mode everywhere: TRL then hands over only the counted tokens, so ignored
            # positions cost no matmul (TRL itself does this only on Triton devices).
            _SWAPS.swap(trl_utils, "_use_triton", lambda device: True)
            _SWAPS.swap(trl_distillation, "ChunkedDivergenceFunction", distillation.ChunkedDivergence)
            _SWAPS.swap(trl_distillation, "_use_triton", lambda device: True)
        if losses:
            for trainer in chosen:
                if trainer in STATIC_LOSSES:
                    module_name, class_name, method = STATIC_LOSSES[trainer]
                    cls = getattr(importlib.import_module(module_name), class_name)
                    _SWAPS.swap(cls, method, staticmethod(getattr(distillation, method)))
                    continue
                module_name, class_name, method, ours = LOSSES[trainer]
                cls = getattr(importlib.import_module(module_name), class_name)
                impl = importlib.import_module(f"{__name__}.{ours}")
                _SWAPS.swap(cls, method, impl.compute_loss)
                _SWAPS.swap(cls, "__init__", checked_init(cls.__init__, impl.check))
    except BaseException:
        _SWAPS.undo()
        raise


def unpatch() -> None:
    """Puts back everything `patch` replaced."""
    _SWAPS.undo()


class patched:
    """`with patched(): ...` — patch() on entry, unpatch() on exit."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def __enter__(self):
        patch(**self.kwargs)
        return self

    def __exit__(self, *exc):
        unpatch()
        return False


def gather_for(accelerator):
    """A `gather` for fastalign's losses: every process's tensor concatenated along dim 0, lengths
    free to differ (accelerate's `gather` needs equal shapes, so tensors are padded to the longest
    and each process's real rows kept). None with a single process."""
    if accelerator.num_processes == 1:
        return None

    def gather(tensor: torch.Tensor) -> torch.Tensor:
        length = torch.tensor([tensor.shape[0]], device=tensor.device)
        lengths = accelerator.gather(length).tolist()
        padded = accelerator.pad_across_processes(tensor, dim=0, pad_index=0)
        rows = accelerator.gather(padded)
        longest = max(lengths)
        return torch.cat([rows[i * longest:i * longest + n] for i, n in enumerate(lengths)])

    return gather
