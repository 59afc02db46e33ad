"""KTOTrainer end to end: a tiny Llama (and a tiny Mixtral, for the router's aux loss) trained a few
steps by stock TRL 1.16 and by TRL patched with fastalign.integrations.trl, from the same seed, logs
the same loss and metrics at every step; evaluation logs the same metrics. And, with two processes
stood in for by two threads, the same cross-process reductions of every metric."""

from __future__ import annotations

import collections
import types

import pytest
import tiny_trl
import torch
from threaded_accelerator import run_as_processes

trl = pytest.importorskip("trl")

import fastalign.integrations.trl.kto as fa_kto  # noqa: E402
from fastalign.integrations import trl as fa_trl  # noqa: E402

CONFIGS = [
    # 9 rows: the last batch has one row, whose KL "mismatched" pair is the matched one (TRL takes it).
    dict(loss_type="kto", rows=9),
    dict(loss_type="kto", beta=0.5, desirable_weight=1.33, undesirable_weight=0.7),
    dict(loss_type="kto", precompute_ref_log_probs=True),
    dict(loss_type="apo_zero_unpaired", beta=0.2, undesirable_weight=2.0),
]


def mixtral(seed: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=tiny_trl.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, router_aux_loss_coef=0.02))


def _trainer(output_dir, config, make_model=tiny_trl.causal_lm, eval_rows=0):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    config = dict(config)
    rows = config.pop("rows", 12)
    args = KTOConfig(**tiny_trl.common_args(output_dir, **config))
    # An explicit reference, seeded apart from the policy so that the first step's log-ratios are not all 0.
    ref_model = None if args.precompute_ref_log_probs else make_model(seed=1)
    return KTOTrainer(model=make_model(seed=0), ref_model=ref_model, args=args,
                      train_dataset=Dataset.from_list(tiny_trl.kto_rows(rows)),
                      eval_dataset=Dataset.from_list(tiny_trl.kto_rows(eval_rows, seed=1)) if eval_rows else None,
                      processing_class=tiny_trl.tokenizer())


@pytest.fixture
def kto_loss_calls(monkeypatch):
    """How many times the patched trainer called fastalign's KTO loss."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return kto_loss(*args, **kwargs)

    kto_loss = fa_kto.kto_loss
    monkeypatch.setattr(fa_kto, "kto_loss", counting)
    return calls


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_kto_training_matches_stock_trl(tmp_path, config, kto_loss_calls):
    stock = tiny_trl.train_logs(lambda: _trainer(tmp_path / "stock", config))
    assert not kto_loss_calls
    with fa_trl.patched(trainers=("kto",)):
        ours = tiny_trl.train_logs(lambda: _trainer(tmp_path / "fastalign", config))
    assert not fa_trl.is_patched()
    assert len(kto_loss_calls) == 3
    tiny_trl.assert_logs_match(stock, ours)
    # The one-sided second step really left the rejected group's metrics out.
    assert "rewards/chosen" in ours[1] and "rewards/rejected" not in ours[1] and "logits/rejected" not in ours[1]
    if config["loss_type"] == "kto" and not config.get("precompute_ref_log_probs"):
        assert any(step["kl"] > 0 for step in stock), "the KL baseline is clamped to 0 at every step"


def test_kto_router_aux_loss_matches_stock_trl(tmp_path, kto_loss_calls):
    config = dict(loss_type="kto")
    stock = tiny_trl.train_logs(lambda: _trainer(tmp_path / "stock", config, make_model=mixtral))
    with fa_trl.patched(trainers=("kto",)):
        ours = tiny_trl.train_logs(lambda: _trainer(tmp_path / "fastalign", config, make_model=mixtral))
    assert kto_loss_calls and "aux_loss" in ours[0]
    tiny_trl.assert_logs_match(stock, ours)


def test_kto_evaluation_matches_stock_trl(tmp_path, kto_loss_calls):
    def evaluate(output_dir):
        metrics = _trainer(output_dir, dict(loss_type="kto"), eval_rows=8).evaluate()
        # Wall-clock entries (runtime, throughput, model preparation time) are not the math.
        return [{k: v for k, v in metrics.items() if not k.endswith(("_runtime", "_per_second", "_time"))}]

    stock = evaluate(tmp_path / "stock")
    with fa_trl.patched(trainers=("kto",)):
        ours = evaluate(tmp_path / "fastalign")
    assert kto_loss_calls and "eval_rewards/margins" in ours[0]
    tiny_trl.assert_logs_match(stock, ours)


@pytest.mark.parametrize("config, match", [
    (dict(beta=0.0), r"KTOConfig\.beta: expected a finite number > 0"),
    (dict(desirable_weight=0.0, undesirable_weight=0.0), r"KTOConfig\.desirable_weight, undesirable_weight: both"),
])
def test_unserved_option_fails_at_construction(tmp_path, config, match):
    with fa_trl.patched(trainers=("kto",)), pytest.raises(ValueError, match=match):
        _trainer(tmp_path, dict(loss_type="kto", **config))


def test_unpatch_restores_stock_trl():
    from trl.trainer.kto_trainer import KTOTrainer

    compute_loss, init = KTOTrainer.__dict__["_compute_loss"], KTOTrainer.__dict__["__init__"]
    with fa_trl.patched(trainers=("kto",)):
        assert KTOTrainer.__dict__["_compute_loss"] is fa_kto.compute_loss
    assert KTOTrainer.__dict__["_compute_loss"] is compute_loss and KTOTrainer.__dict__["__init__"] is init


# Two processes, stood in for by threads -------------------------------------------------------------


class FusedHeadStandIn:
    """A model behind TRL's fused LM head: per-token log-probs, entropy and mean logits (0 where the
    label is -100) of fixed logits, looked up by the input_ids tensor passed."""

    training = True

    def __init__(self, *pairs):
        self.pairs = pairs  # (input_ids [B, L], logits [B, L, V])

    def __call__(self, input_ids, labels, fused_lm_head, **kwargs):
        assert fused_lm_head
        logits = next(z for ids, z in self.pairs if ids is input_ids)[:, :-1]
        targets = labels[:, 1:]
        valid = targets != -100
        logp = torch.log_softmax(logits, dim=-1)
        fields = (logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1),
                  logits.mean(-1))
        log_probs, entropy, mean_logits = (torch.where(valid, x, 0.0) for x in fields)
        return types.SimpleNamespace(log_probs=log_probs, entropy=entropy, mean_logits=mean_logits)


def _kto_shard(rank: int, labels: list[bool]):
    """One process's KTO batch (precomputed reference log-probs) and a model for it."""
    gen = torch.Generator().manual_seed(rank)
    b, length, vocab = len(labels), 7, 50

    def sequences():
        ids = torch.randint(1, vocab, (b, length), generator=gen)
        attention = torch.ones(b, length, dtype=torch.long)
        attention[1, -2:] = 0
        completion = attention.clone()
        completion[:, :2] = 0
        return ids.masked_fill(attention == 0, 0), attention, completion

    ids, attention, completion = sequences()
    kl_ids, kl_attention, kl_completion = sequences()
    model = FusedHeadStandIn((ids, torch.randn(b, length, vocab, generator=gen, dtype=torch.float64) * 2),
                             (kl_ids, torch.randn(b, length, vocab, generator=gen, dtype=torch.float64) * 2))
    kl_labels = kl_ids.masked_fill(kl_completion == 0, -100)
    kl_logps = model(kl_ids, kl_labels, True).log_probs.sum(-1)
    batch = {
        "input_ids": ids, "attention_mask": attention, "completion_mask": completion,
        "KL_input_ids": kl_ids, "KL_attention_mask": kl_attention, "KL_completion_mask": kl_completion,
        "label": torch.tensor(labels),
        "ref_logps": -torch.rand(b, generator=gen, dtype=torch.float64) * 5 - 12,
        # Below the policy's on average: a positive KL estimate, different on each process.
        "ref_KL_logps": kl_logps - torch.rand(b, generator=gen, dtype=torch.float64) - 0.5 * rank,
    }
    return batch, model


def _kto_stand_in(accelerator, config):
    """The KTOTrainer attributes `_compute_loss` reads, for one process."""
    from trl.trainer.kto_trainer import KTOTrainer

    trainer = types.SimpleNamespace(
        model=FusedHeadStandIn(), accelerator=accelerator, aux_loss_enabled=False, precompute_ref_logps=True,
        calculate_KL=config["loss_type"] == "kto", loss_type=config["loss_type"], beta=config.get("beta", 0.1),
        desirable_weight=config.get("desirable_weight", 1.0), undesirable_weight=config.get("undesirable_weight", 1.0),
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )
    trainer._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, trainer)
    return trainer


# Process 1 has no undesirable completion: TRL still logs that group's metrics, from process 0's.
SHARD_LABELS = ([True, False, False, True], [True, True, True, True])


@pytest.mark.parametrize("config", [dict(loss_type="kto", desirable_weight=1.33),
                                    dict(loss_type="apo_zero_unpaired", beta=0.3)], ids=lambda c: c["loss_type"])
def test_two_process_reductions_match_stock_trl(config):
    from trl.trainer.kto_trainer import KTOTrainer

    def step(compute_loss):
        def run(accelerator):
            batch, model = _kto_shard(accelerator.rank, SHARD_LABELS[accelerator.rank])
            trainer = _kto_stand_in(accelerator, config)
            loss = compute_loss(trainer, model, batch, False)
            return loss.item(), {name: values[-1] for name, values in trainer._metrics["train"].items()}
        return run

    stock = run_as_processes(step(KTOTrainer._compute_loss))
    ours = run_as_processes(step(fa_kto.compute_loss))
    assert stock[0][1] == stock[1][1], "stock TRL's metrics differ between processes"
    assert "logps/rejected" in stock[1][1]
    for (stock_loss, stock_metrics), (our_loss, our_metrics) in zip(stock, ours):
        assert our_loss == pytest.approx(stock_loss, rel=1e-6)
        tiny_trl.assert_logs_match([stock_metrics], [our_metrics], rtol=1e-6, atol=1e-7)
    # Process 0 alone logs other values, so the match above is a match of the reductions.
    alone = run_as_processes(step(KTOTrainer._compute_loss), size=1)[0][1]
    for name in ("kl", "entropy", "logits/chosen", "rewards/chosen", "logps/chosen", "rewards/margins"):
        if name != "kl" or config["loss_type"] == "kto":
            assert alone[name] != pytest.approx(stock[0][1][name]), name
