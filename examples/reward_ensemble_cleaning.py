"""Reward-model ensembles: cleaning noisy preference labels, and conservative best-of-n rewards.

    python examples/reward_ensemble_cleaning.py --steps 3

Needs only torch and fastalign; the last part also uses `datasets` and is skipped without it. Runs
offline on a CPU in seconds: the "reward models" are made here from a hidden true quality, so the
script can check what the ensemble finds. Each step draws a fresh synthetic set:

* Cleaning. B preference pairs, each response with a true quality; the human labels follow the
  truth except for 20% flipped at random (annotator noise). K = 5 reward models score every
  response: the true quality through each model's own scale and offset, plus noise.
  `flag_inconsistent_pairs` flags the pairs whose human label fewer than half the models agree
  with; `precision` is the share of the flagged pairs whose label was flipped, `recall` the share
  of the flipped labels that were flagged.
* Best-of-n. P prompts with N candidates each; one candidate per prompt is a reward hack: one model
  (a different one per prompt) scores it far above the rest while its true quality is poor.
  `ensemble_rewards(normalize=True)` z-scores each model (their scales differ) and reduces the K
  scores with "mean", "min" (worst case) or "mean_minus_std"; each line prints the mean true
  quality of the candidate each reduction picks, beside the best possible pick (`oracle`) and the
  share of prompts where the hack was picked (`hacked_*`).
* Dataset. The cleaning pairs as a `datasets.Dataset` with one score column per model:
  `flag_inconsistent_rows(..., drop_flagged=True)` keeps the pairs the ensemble agrees with.
"""

from __future__ import annotations

import argparse

import torch

from fastalign import ensemble_rewards, flag_inconsistent_pairs, flag_inconsistent_rows

MODELS = 5
LABEL_NOISE = 0.2


def reward_models(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each model's scale and offset ([K, 1] each): the same quality, scored on different scales."""
    scale = torch.empty(MODELS, 1).uniform_(0.5, 10.0, generator=generator)
    offset = torch.empty(MODELS, 1).uniform_(-5.0, 5.0, generator=generator)
    return scale, offset


def score(quality: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, generator: torch.Generator,
          noise: float = 0.7) -> torch.Tensor:
    """[K, n] scores of n responses of true quality `quality` [n]."""
    seen = quality + noise * torch.randn(MODELS, quality.shape[0], generator=generator)
    return scale * seen + offset


def cleaning(step: int, generator: torch.Generator, pairs: int = 512):
    scale, offset = reward_models(generator)
    first, second = torch.randn(pairs, generator=generator), torch.randn(pairs, generator=generator)
    flipped = torch.rand(pairs, generator=generator) < LABEL_NOISE
    # The human's chosen response: the better one, unless the label was flipped.
    first_chosen = (first > second) ^ flipped
    chosen = torch.where(first_chosen, first, second)
    rejected = torch.where(first_chosen, second, first)
    chosen_scores = score(chosen, scale, offset, generator)
    rejected_scores = score(rejected, scale, offset, generator)

    flagged, agreement = flag_inconsistent_pairs(chosen_scores, rejected_scores, threshold=0.5)
    caught = (flagged & flipped).sum().item()
    print(f"clean step {step}: pairs={pairs}  flipped={flipped.sum().item()}  flagged={flagged.sum().item()}  "
          f"precision={caught / max(flagged.sum().item(), 1):.3f}  recall={caught / max(flipped.sum().item(), 1):.3f}  "
          f"agreement={agreement.mean().item():.3f}")
    return chosen_scores, rejected_scores, flagged


def best_of_n(step: int, generator: torch.Generator, prompts: int = 256, candidates: int = 8) -> None:
    scale, offset = reward_models(generator)
    quality = torch.randn(prompts, candidates, generator=generator)
    # Candidate 0 of every prompt is the hack: poor in truth, loved by one model.
    quality[:, 0] = -1.0
    scores = score(quality.reshape(-1), scale, offset, generator).reshape(MODELS, prompts, candidates)
    fooled = torch.randint(0, MODELS, (prompts,), generator=generator)
    scores[fooled, torch.arange(prompts), 0] += 8.0 * scale[fooled, 0]

    picked = {}
    for reduction in ("mean", "min", "mean_minus_std"):
        rewards = ensemble_rewards(scores.reshape(MODELS, -1), reduction=reduction, normalize=True)
        picked[reduction] = rewards.reshape(prompts, candidates).argmax(1)
    line = "  ".join(f"{reduction}={quality.gather(1, pick[:, None]).mean().item():.3f}"
                     for reduction, pick in picked.items())
    hacked = "  ".join(f"hacked_{reduction}={(pick == 0).float().mean().item():.3f}"
                       for reduction, pick in picked.items())
    print(f"best_of_n step {step}: {line}  oracle={quality.max(1).values.mean().item():.3f}  {hacked}")


def dataset_cleaning(step: int, chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                     flagged: torch.Tensor) -> None:
    import datasets

    columns = {"pair": list(range(chosen_scores.shape[1]))}
    for k in range(MODELS):
        columns[f"chosen_rm{k}"] = chosen_scores[k].tolist()
        columns[f"rejected_rm{k}"] = rejected_scores[k].tolist()
    pairs = datasets.Dataset.from_dict(columns)
    kept = flag_inconsistent_rows(pairs, [f"chosen_rm{k}" for k in range(MODELS)],
                                  [f"rejected_rm{k}" for k in range(MODELS)], threshold=0.5, drop_flagged=True)
    same = kept["pair"] == (~flagged).nonzero().squeeze(1).tolist()
    print(f"dataset step {step}: rows={len(pairs)}  kept={len(kept)}  same_as_tensors={int(same)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="synthetic sets to draw (default 3)")
    args = parser.parse_args()
    try:
        import datasets  # noqa: F401
    except ImportError:
        has_datasets = False
        print("datasets is not installed: the Dataset part is skipped")
    else:
        has_datasets = True
        datasets.disable_progress_bars()
    for step in range(1, args.steps + 1):
        generator = torch.Generator().manual_seed(step)
        chosen_scores, rejected_scores, flagged = cleaning(step, generator)
        best_of_n(step, generator)
        if has_datasets:
            dataset_cleaning(step, chosen_scores, rejected_scores, flagged)


if __name__ == "__main__":
    main()
