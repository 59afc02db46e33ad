"""One process of a 2-process (torchrun, gloo, CPU) training run for
tests/integrations/test_trl_distributed.py: trains stock TRL or fastalign-patched TRL a few steps
and, on rank 0, writes the logged math."""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import tiny_trl  # noqa: E402
import torch  # noqa: E402


# DeepSpeed ZeRO-3 on its CPU accelerator (DS_ACCELERATOR=cpu), with the Trainer's own optimizer.
ZERO3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
         "gradient_accumulation_steps": "auto", "zero_allow_untested_optimizer": True, "bf16": {"enabled": False}}


def grpo_trainer(model_dir, output_dir, zero3=False):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    extra = {"deepspeed": ZERO3} if zero3 else {}
    args = GRPOConfig(**tiny_trl.common_args(output_dir, max_steps=2, gradient_accumulation_steps=2,
                                             num_iterations=2, per_device_train_batch_size=4, **extra),
                      loss_type="dapo", beta=0.04, num_generations=4, max_completion_length=8)
    return GRPOTrainer(model=model_dir, reward_funcs=tiny_trl.length_reward, args=args,
                       train_dataset=Dataset.from_list(tiny_trl.prompt_rows(32)),
                       processing_class=tiny_trl.tokenizer())


def rloo_trainer(model_dir, output_dir):
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    # A learning rate at which the second iteration clips some sequences but not all.
    args = RLOOConfig(**tiny_trl.common_args(output_dir, max_steps=2, gradient_accumulation_steps=2,
                                             num_iterations=2, per_device_train_batch_size=4, learning_rate=1e-4),
                      num_generations=4, max_completion_length=8, epsilon_high=0.28)
    return RLOOTrainer(model=model_dir, reward_funcs=tiny_trl.length_reward, args=args,
                       train_dataset=Dataset.from_list(tiny_trl.prompt_rows(32)),
                       processing_class=tiny_trl.tokenizer())


def kto_trainer(model_dir, output_dir):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(**tiny_trl.common_args(output_dir, max_steps=2, per_device_train_batch_size=3))
    return KTOTrainer(model=tiny_trl.causal_lm(seed=0), ref_model=tiny_trl.causal_lm(seed=1), args=args,
                      train_dataset=Dataset.from_list(tiny_trl.kto_rows(24)), processing_class=tiny_trl.tokenizer())


def reward_trainer(model_dir, output_dir):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(**tiny_trl.common_args(output_dir, max_steps=2, per_device_train_batch_size=2),
                        center_rewards_coefficient=0.01)
    return RewardTrainer(model=tiny_trl.sequence_classifier(seed=0), args=args,
                         train_dataset=Dataset.from_list(tiny_trl.reward_rows(16, margin=True)),
                         processing_class=tiny_trl.tokenizer())


def dpo_trainer(model_dir, output_dir):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**tiny_trl.common_args(output_dir, max_steps=2, per_device_train_batch_size=2),
                     loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    return DPOTrainer(model=tiny_trl.causal_lm(), ref_model=tiny_trl.causal_lm(), args=args,
                      train_dataset=Dataset.from_list(tiny_trl.preference_rows(32)),
                      processing_class=tiny_trl.tokenizer())


def distillation_trainer(model_dir, output_dir):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    args = DistillationConfig(**tiny_trl.common_args(output_dir, max_steps=2, per_device_train_batch_size=2),
                              beta=0.5, temperature=0.9, max_completion_length=6)
    teacher = tiny_trl.causal_lm(seed=1, hidden_size=96, intermediate_size=160)
    return DistillationTrainer(model=tiny_trl.causal_lm(seed=0), teacher_model=teacher, args=args,
                               train_dataset=Dataset.from_list(tiny_trl.prompt_rows(16)),
                               processing_class=tiny_trl.tokenizer())


def gkd_trainer(model_dir, output_dir):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    args = GKDConfig(**tiny_trl.common_args(output_dir, max_steps=2, per_device_train_batch_size=2), beta=0.5,
                     lmbda=0.0, seq_kd=False, max_length=32)
    teacher = tiny_trl.causal_lm(seed=1, hidden_size=96, intermediate_size=160)
    return GKDTrainer(model=tiny_trl.causal_lm(seed=0), teacher_model=teacher, args=args,
                      train_dataset=Dataset.from_list(tiny_trl.chat_rows(16)),
                      processing_class=tiny_trl.chat_tokenizer())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--trainer", required=True,
                        choices=("grpo", "dpo", "rloo", "kto", "reward", "distillation", "gkd"))
    parser.add_argument("--fastalign", action="store_true")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--zero3", action="store_true", help="DeepSpeed ZeRO-3 (grpo only)")
    opts = parser.parse_args()
    if opts.fastalign:
        from fastalign.integrations import trl as fa_trl

        # The DistillationTrainer's divergence is a fused head: no loss method to replace.
        fa_trl.patch(trainers=() if opts.trainer == "distillation" else (opts.trainer,))
    make = {"grpo": grpo_trainer, "dpo": dpo_trainer, "rloo": rloo_trainer, "kto": kto_trainer,
            "reward": reward_trainer, "distillation": distillation_trainer, "gkd": gkd_trainer}[opts.trainer]
    torch.manual_seed(0)
    extra = {"zero3": True} if opts.zero3 else {}
    logs = tiny_trl.train_logs(lambda: make(opts.model_dir, os.path.dirname(opts.out), **extra))
    if int(os.environ.get("RANK", "0")) == 0:
        with open(opts.out, "w") as f:
            json.dump({"world_size": int(os.environ.get("WORLD_SIZE", "1")), "logs": logs}, f)
    # Leaving with gloo's threads still up can abort the process at exit ("terminate called
    # without an active exception"): close the group on every rank first.
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
