"""The DPO family: every loss type on every live backend against the eager reference, the reference
against TRL's own DPOTrainer code, the properties the losses must have, and bad input."""

from __future__ import annotations

import contextlib
import math
import types
from collections import defaultdict

import pytest
import torch
from conftest import DEVICE, backend_params
from numerics import assert_as_accurate_as_reference, max_error

import fastalign
from fastalign.dpo import LOSS_TYPES, METRIC_NAMES, dpo_options, ld_tail_mask
from fastalign.reference import dpo as reference
from fastalign.sequence import sequence_logprobs

B, T, V = 2, 6, 97

# Every loss type, with the label smoothing it needs, and the options that change the math.
CASES = {
    "sigmoid": {},
    "hinge": {"loss_type": "hinge"},
    "ipo": {"loss_type": "ipo"},
    "exo_pair": {"loss_type": "exo_pair", "label_smoothing": 1e-3},
    "nca_pair": {"loss_type": "nca_pair"},
    "robust": {"loss_type": "robust", "label_smoothing": 0.1},
    "bco_pair": {"loss_type": "bco_pair"},
    "sppo_hard": {"loss_type": "sppo_hard"},
    "aot": {"loss_type": "aot", "label_smoothing": 0.05},
    "aot_unpaired": {"loss_type": "aot_unpaired", "label_smoothing": 0.05},
    "apo_zero": {"loss_type": "apo_zero"},
    "apo_down": {"loss_type": "apo_down"},
    "discopop": {"loss_type": "discopop", "discopop_tau": 0.5},
    "sft": {"loss_type": "sft"},
    "sigmoid_norm": {"loss_type": "sigmoid_norm", "beta": 2.0},
    "sigmoid+sft": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
    "mpo": {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    "beta": {"beta": 0.7},
    "dpop": {"dpop_lambda": 5.0, "beta": 0.5},
    "wpo": {"use_weighting": True},
    "wpo-ipo": {"loss_type": "ipo", "use_weighting": True},
    "wpo-sft": {"loss_type": ["sigmoid", "sft"], "use_weighting": True},
    "ld": {"ld_alpha": 0.4},
    "ld-ipo-apo": {"loss_type": ["ipo", "apo_zero"], "ld_alpha": 0.0},
    "ld-wpo": {"ld_alpha": 0.5, "use_weighting": True, "beta": 0.5},
    "forward_kl": {"f_divergence_type": "forward_kl"},
    "js_divergence": {"f_divergence_type": "js_divergence", "loss_type": "hinge"},
    "alpha_divergence": {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    "alpha_divergence-ipo": {"f_divergence_type": "alpha_divergence", "loss_type": "ipo",
                             "f_alpha_divergence_coef": 1.7},
    "alpha_divergence-1": {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0},
    "reference_free": {"reference_free": True, "loss_type": ["sigmoid", "robust"], "label_smoothing": 0.2},
}
# Options TRL 1.16's DPOTrainer does not have.
NOT_IN_TRL = {"dpop", "reference_free"}


def uses_reference(options):
    return not options.get("reference_free") and options.get("loss_type") != "sft"


def make_batch(dtype, seed=0, ref_noise=0.3):
    """Aligned inputs [2B, T]: a one-token prompt, completions of different lengths, an ignored label."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2 * B, T, V, generator=gen) * 2).to(device=DEVICE, dtype=dtype)
    ref_logits = (logits.double() + ref_noise * torch.randn(2 * B, T, V, generator=gen).to(DEVICE)).to(dtype)
    labels = torch.randint(0, V, (2 * B, T), generator=gen).to(DEVICE)
    mask = torch.ones(2 * B, T, dtype=torch.long, device=DEVICE)
    mask[:, 0] = 0
    mask[0, 4:] = 0  # chosen 0: 3 tokens; rejected 0 (row 2): 5 -> an LD tail of 2
    mask[3, 3:] = 0  # rejected 1: 2 tokens; chosen 1 (row 1) has 4 with the ignored one
    labels[1, 2] = -100
    with torch.no_grad():
        ref = fastalign.reference.token_logprobs(ref_logits.double(), labels, mask=mask).logps.sum(-1)
    ref_chosen, ref_rejected = ref.float().chunk(2)
    return logits, labels, mask, ref_chosen, ref_rejected, ref_logits


def run(fn, logits, labels, mask, ref_chosen, ref_rejected, options, ref_logits=None):
    leaf = logits.detach().clone().requires_grad_(True)
    refs = (None, None) if ref_logits is not None or not uses_reference(options) else (ref_chosen, ref_rejected)
    out = fn(leaf, labels, completion_mask=mask, ref_chosen_logps=refs[0], ref_rejected_logps=refs[1],
             ref_logits=ref_logits, **options)
    (grad,) = torch.autograd.grad(out.loss, leaf)
    return out, grad


def on_backend(backend):
    def call(*args, **kwargs):
        with fastalign.use_backend(backend):
            return fastalign.dpo_loss_from_logits(*args, **kwargs)

    return call


def assert_sequence_level_accurate(value, reference, truth, name, magnitude):
    """`assert_as_accurate_as_reference` for the loss and metrics: they are functions of differences of
    sequence log-probs (sums over T tokens of size ~log V), so their rounding error follows `magnitude`,
    the size of those sums times the loss's sensitivity to them, not the size of the result."""
    value, reference, truth = value.detach(), reference.detach(), truth.detach().double()
    allowed = max_error(reference, truth) + 4 * torch.finfo(torch.float32).eps * (1.0 + magnitude)
    err = max_error(value, truth)
    assert err <= allowed, f"{name}: error {err:.3g} vs float64 exceeds the reference's {allowed:.3g} (with slack)"


def check_against_reference(backend, dtype, options, with_ref_logits=False):
    logits, labels, mask, rc, rr, ref_logits = make_batch(dtype)
    ref_logits = ref_logits if with_ref_logits else None
    truth, truth_grad = run(reference.dpo_loss_from_logits, logits.double(), labels, mask, rc, rr, options,
                            None if ref_logits is None else ref_logits.double())
    want, want_grad = run(reference.dpo_loss_from_logits, logits, labels, mask, rc, rr, options, ref_logits)
    got, got_grad = run(on_backend(backend), logits, labels, mask, rc, rr, options, ref_logits)
    assert got.loss.dtype == torch.float32 and got.loss.shape == ()
    # The batch's summed |sequence log-prob|, times beta where beta > 1 amplifies it.
    total = B * (truth.metrics["logps/chosen"].abs() + truth.metrics["logps/rejected"].abs())
    magnitude = 4 * max(1.0, options.get("beta", 0.1)) * float(total)
    assert_sequence_level_accurate(got.loss, want.loss, truth.loss, "loss", magnitude)
    assert got_grad.dtype == dtype and got_grad.shape == logits.shape
    assert got_grad.abs().max() > 0
    assert_as_accurate_as_reference(got_grad, want_grad, truth_grad, "grad")
    assert list(got.metrics) == list(want.metrics)
    for name, value in got.metrics.items():
        assert value.dtype == torch.float32 and value.shape == () and not value.requires_grad, name
        if name == "rewards/accuracies":
            assert torch.equal(value, want.metrics[name]), name
        else:
            assert_sequence_level_accurate(value, want.metrics[name], truth.metrics[name], name, magnitude)
    return got, got_grad


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(backend, dtype, case):
    check_against_reference(backend, dtype, CASES[case])


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["sigmoid", "ld-ipo-apo", "wpo", "aot"])
def test_reference_logits_match_reference(backend, dtype, case):
    check_against_reference(backend, dtype, CASES[case], with_ref_logits=True)


def test_every_loss_type_is_covered():
    covered = set()
    for options in CASES.values():
        kinds = options.get("loss_type", "sigmoid")
        covered.update([kinds] if isinstance(kinds, str) else kinds)
    assert covered == set(LOSS_TYPES)


# --- the reference against TRL's own code ---------------------------------------------------------


class _FusedHeadModel(torch.nn.Module):
    """Stands in for a model patched by TRL's add_fused_lm_head: fixed logits, the same per-token fields."""

    is_gradient_checkpointing = False

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids=None, attention_mask=None, use_cache=None, labels=None, fused_lm_head=True):
        out = fastalign.reference.token_logprobs(
            self.logits[:, :-1], labels[:, 1:], outputs=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
        )
        return types.SimpleNamespace(
            log_probs=out.logps, entropy=out.entropy, log_sum_sq_probs=out.log_sum_sq_probs,
            mean_logits=out.mean_logits, is_top1=out.is_top1, aux_loss=None,
        )


def _trl_trainer(policy_logits, ref_logits, options, precompute):
    """The attributes DPOTrainer._compute_loss reads, set as DPOTrainer.__init__ sets them from a DPOConfig."""
    o = dpo_options(**options)
    accelerator = types.SimpleNamespace(
        device=torch.device(DEVICE), gather=lambda x: x, gather_for_metrics=lambda x: x,
        autocast=contextlib.nullcontext,
    )
    return types.SimpleNamespace(
        model=_FusedHeadModel(policy_logits), ref_model=_FusedHeadModel(ref_logits), accelerator=accelerator,
        aux_loss_enabled=False, precompute_ref_logps=precompute, beta=o.beta, loss_types=list(o.loss_types),
        loss_weights=list(o.loss_weights), ld_alpha=o.ld_alpha, f_divergence_type=o.f_divergence_type,
        f_alpha_divergence_coef=o.f_alpha_divergence_coef, label_smoothing=o.label_smoothing,
        use_weighting=o.use_weighting, args=types.SimpleNamespace(discopop_tau=o.discopop_tau,
                                                                   gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )


@pytest.mark.parametrize("precompute", [True, False], ids=["ref-logps", "ref-model"])
@pytest.mark.parametrize("case", [c for c in CASES if c not in NOT_IN_TRL])
def test_reference_equals_trl_dpo_trainer(case, precompute):
    # DPOTrainer._compute_loss is a method; it runs here on an object carrying the attributes it reads.
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    options = CASES[case]
    if options.get("use_weighting") and "sft" in options.get("loss_type", ()):
        # TRL multiplies sft's expanded (stride-0) loss in place by the weights, which torch refuses.
        pytest.skip("TRL 1.16 fails on sft with WPO weighting; fastalign weights the sft term like the others")
    gen = torch.Generator().manual_seed(1)
    length = T + 1  # TRL takes the unshifted sequence and shifts inside the model
    logits = torch.randn(2 * B, length, V, generator=gen).to(DEVICE) * 2
    ref_logits = logits + 0.3 * torch.randn(2 * B, length, V, generator=gen).to(DEVICE)
    logits.requires_grad_(True)
    input_ids = torch.randint(0, V, (2 * B, length), generator=gen).to(DEVICE)
    completion_mask = torch.ones(2 * B, length, dtype=torch.long, device=DEVICE)
    completion_mask[:, :2] = 0
    completion_mask[0, 5:] = 0
    completion_mask[3, 4:] = 0
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": completion_mask}
    trainer = _trl_trainer(logits, ref_logits, options, precompute)
    ref_chosen, ref_rejected = trl_dpo.DPOTrainer.compute_ref_log_probs(trainer, trainer.ref_model, inputs)
    if precompute:
        inputs.update(ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
    want = trl_dpo.DPOTrainer._compute_loss(trainer, trainer.model, inputs, False)
    (want_grad,) = torch.autograd.grad(want, logits)

    refs = {"ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    if not precompute:
        refs = {"ref_logits": ref_logits[:, :-1]}
    got = reference.dpo_loss_from_logits(logits[:, :-1], input_ids[:, 1:], completion_mask=completion_mask[:, 1:], **refs,
                                         **options)
    (got_grad,) = torch.autograd.grad(got.loss, logits)
    torch.testing.assert_close(got.loss, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=1e-5)
    logged = trainer._metrics["train"]
    for name in METRIC_NAMES:
        assert got.metrics[name].item() == pytest.approx(logged[name][0], rel=1e-5, abs=1e-6), name


# --- properties -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_policy_equal_to_reference_gives_ln2_and_zero_rewards(backend, dtype):
    logits, labels, mask, *_ = make_batch(dtype)
    with fastalign.use_backend(backend):
        from_logits = fastalign.DPOLoss(beta=0.1)(logits, labels, completion_mask=mask, ref_logits=logits)
        seq = sequence_logprobs(logits, labels, completion_mask=mask)
        chosen, rejected = seq.logps.chunk(2)
        from_ref_logps = fastalign.DPOLoss(beta=0.1)(logits, labels, completion_mask=mask, ref_chosen_logps=chosen,
                                                     ref_rejected_logps=rejected)
    ln2 = torch.tensor(math.log(2.0), device=logits.device)
    for out in (from_logits, from_ref_logps):
        assert torch.equal(out.loss, ln2)
        for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert torch.equal(out.metrics[name], torch.tensor(0.0, device=logits.device)), name


@pytest.mark.parametrize("backend", backend_params())
def test_swapping_chosen_and_rejected_flips_the_margins(backend):
    logits, labels, mask, rc, rr, _ = make_batch(torch.float32)

    def swap(x):
        return torch.cat(x.chunk(2)[::-1])

    with fastalign.use_backend(backend):
        out = fastalign.dpo_loss_from_logits(logits, labels, completion_mask=mask, ref_chosen_logps=rc,
                                             ref_rejected_logps=rr)
        swapped = fastalign.dpo_loss_from_logits(swap(logits), swap(labels), completion_mask=swap(mask),
                                                 ref_chosen_logps=rr, ref_rejected_logps=rc)
    m = out.metrics
    assert m["rewards/margins"] != 0
    assert torch.equal(swapped.metrics["rewards/margins"], -m["rewards/margins"])
    assert torch.equal(swapped.metrics["rewards/chosen"], m["rewards/rejected"])
    assert torch.equal(swapped.metrics["logps/chosen"], m["logps/rejected"])
    assert torch.equal(swapped.metrics["logits/chosen"], m["logits/rejected"])
    assert swapped.metrics["rewards/accuracies"] == 1 - m["rewards/accuracies"]  # no ties here


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", CASES)
def test_fully_masked_completion_is_finite_and_gets_no_gradient(backend, case):
    logits, labels, mask, rc, rr, ref_logits = make_batch(torch.float32)
    mask[0] = 0  # chosen 0: no completion token
    mask[3] = 0  # rejected 1: none either
    options = CASES[case]
    with fastalign.use_backend(backend):
        out, grad = run(fastalign.dpo_loss_from_logits, logits, labels, mask, rc, rr, options)
    want, _ = run(reference.dpo_loss_from_logits, logits, labels, mask, rc, rr, options)
    assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.metrics.values())
    torch.testing.assert_close(out.loss, want.loss)
    assert torch.equal(grad[0], torch.zeros_like(grad[0])) and torch.equal(grad[3], torch.zeros_like(grad[3]))
    assert torch.isfinite(grad).all()


def test_fully_masked_pair_documented_values():
    logits, labels, _, *_ = make_batch(torch.float32)
    mask = torch.zeros(2 * B, T, dtype=torch.long, device=DEVICE)
    out = fastalign.dpo_loss_from_logits(
        logits, labels, completion_mask=mask, ref_logits=logits, loss_type=["sigmoid", "sft", "ipo"], use_weighting=True
    )
    # sigmoid: ln 2; sft over no token: 0; ipo with zero scores: (0 - 1 / (2 beta))^2; WPO weights exp(0) = 1.
    assert out.loss.item() == pytest.approx(math.log(2) + 0 + (1 / 0.2) ** 2)
    assert out.metrics["logits/chosen"] == 0 and out.metrics["logps/chosen"] == 0


def test_metrics_follow_trl_definitions():
    logits, labels, mask, rc, rr, _ = make_batch(torch.float32)
    beta = 0.3
    out = fastalign.dpo_loss_from_logits(logits, labels, completion_mask=mask, ref_chosen_logps=rc,
                                         ref_rejected_logps=rr, beta=beta)
    assert list(out.metrics) == list(METRIC_NAMES)
    token = fastalign.token_logprobs(logits, labels, mask=mask, outputs=("mean_logits",))
    chosen, rejected = token.logps.sum(-1).chunk(2)
    chosen_rewards, rejected_rewards = beta * (chosen - rc), beta * (rejected - rr)
    counted = (labels != -100) & (mask != 0)
    expected = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen.mean(),
        "logps/rejected": rejected.mean(),
        "logits/chosen": token.mean_logits[:B][counted[:B]].mean(),
        "logits/rejected": token.mean_logits[B:][counted[B:]].mean(),
    }
    for name, value in expected.items():
        torch.testing.assert_close(out.metrics[name], value.detach(), msg=name)
    assert all(not v.requires_grad for v in out.metrics.values())


def test_loss_types_that_need_no_reference_run_without_one():
    logits, labels, mask, *_ = make_batch(torch.float32)
    out = fastalign.dpo_loss_from_logits(logits, labels, completion_mask=mask, loss_type="sft")
    assert set(out.metrics) == {"logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"}
    counted = (labels != -100) & (mask != 0)
    chosen_token = fastalign.token_logprobs(logits, labels, mask=mask).logps[:B]
    torch.testing.assert_close(out.loss, -chosen_token[counted[:B]].mean())
    free = fastalign.dpo_loss_from_logits(logits, labels, completion_mask=mask, reference_free=True)
    torch.testing.assert_close(free.metrics["rewards/chosen"], 0.1 * free.metrics["logps/chosen"])


def test_dpop_penalty_hand_computed():
    chosen, rejected = torch.tensor([-10.0, -10.0]), torch.tensor([-12.0, -12.0])
    ref_chosen, ref_rejected = torch.tensor([-9.0, -11.0]), torch.tensor([-12.5, -12.5])
    beta, lam = 0.5, 3.0
    out = fastalign.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, dpop_lambda=lam)
    # Pair 0: the chosen log-prob fell 1 below the reference: penalty 3; pair 1 rose: none.
    margins = torch.tensor([(-1.0 - 0.5) - lam * 1.0, (1.0 - 0.5) - 0.0])
    torch.testing.assert_close(out.loss, -torch.nn.functional.logsigmoid(beta * margins).mean())
    plain = fastalign.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta)
    assert plain.loss < out.loss
    assert torch.equal(plain.metrics["rewards/margins"], out.metrics["rewards/margins"])


def test_ld_tail_mask_by_the_shorter_completion():
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0], [0, 1, 0, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    # pairs (row 0, row 2): 3 and 3 tokens -> no tail; (row 1, row 3): 2 and 5 -> row 3's last 3.
    want = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(ld_tail_mask(mask), want)


@pytest.mark.parametrize("case", CASES)
def test_logps_level_equals_logits_level(case):
    options = CASES[case]
    logits, labels, mask, rc, rr, _ = make_batch(torch.float64)
    rc, rr = rc.double(), rr.double()
    leaf = logits.clone().requires_grad_(True)
    token = fastalign.token_logprobs(leaf, labels, mask=mask, outputs=("log_sum_sq_probs",))
    counted = (labels != -100) & (mask != 0)
    tail = ld_tail_mask(counted)

    def pair(values):
        return dict(zip(("chosen", "rejected"), values.chunk(2)))

    logps, lssp = pair(token.logps.sum(-1)), pair(token.log_sum_sq_probs.sum(-1))
    counts, tails = pair(counted.sum(-1)), pair((token.logps * tail).sum(-1))
    refs = (rc, rr) if uses_reference(options) else (None, None)
    out = fastalign.dpo_loss(
        logps["chosen"], logps["rejected"], *refs,
        chosen_num_tokens=counts["chosen"], rejected_num_tokens=counts["rejected"],
        chosen_tail_logps=tails["chosen"], rejected_tail_logps=tails["rejected"],
        chosen_log_sum_sq_probs=lssp["chosen"], rejected_log_sum_sq_probs=lssp["rejected"], **options,
    )
    (grad,) = torch.autograd.grad(out.loss, leaf)
    want, want_grad = run(fastalign.dpo_loss_from_logits, logits, labels, mask, rc, rr, options)
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss, want.loss.double())
    torch.testing.assert_close(grad, want_grad)
    for name, value in out.metrics.items():
        torch.testing.assert_close(value, want.metrics[name], msg=name)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend", backend_params())
def test_compiles_without_graph_breaks(backend):
    logits, labels, mask, rc, rr, _ = make_batch(torch.float32)
    module = fastalign.DPOLoss(loss_type=["sigmoid", "sft"], ld_alpha=0.5, use_weighting=True)

    def step(x):
        out = module(x, labels, completion_mask=mask, ref_chosen_logps=rc, ref_rejected_logps=rr)
        return out.loss, out.metrics

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (compiled, step):
        leaf = logits.clone().requires_grad_(True)
        with fastalign.use_backend(backend):
            loss, metrics = fn(leaf)
            (grad,) = torch.autograd.grad(loss, leaf)
        results.append((loss, metrics, grad))
    (loss, metrics, grad), (want_loss, want_metrics, want_grad) = results
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(grad, want_grad)
    for name, value in want_metrics.items():
        torch.testing.assert_close(metrics[name], value, msg=name)


def test_module_equals_functional_and_validates_at_construction():
    logits, labels, mask, rc, rr, _ = make_batch(torch.float32)
    options = {"beta": 0.2, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}
    module = fastalign.DPOLoss(**options)
    out = module(logits=logits, labels=labels, completion_mask=mask, ref_chosen_logps=rc, ref_rejected_logps=rr)
    want = fastalign.dpo_loss_from_logits(logits, labels, completion_mask=mask, ref_chosen_logps=rc,
                                          ref_rejected_logps=rr, **options)
    assert torch.equal(out.loss, want.loss)
    assert "loss_type=['sigmoid', 'sft']" in repr(module)
    with pytest.raises(ValueError, match="beta"):
        fastalign.DPOLoss(beta=0.0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_per_sequence_math_float64(loss_type):
    options = CASES[loss_type]
    gen = torch.Generator().manual_seed(3)
    n = 3
    inputs = [(-20 + torch.randn(n, generator=gen, dtype=torch.float64)).requires_grad_(True) for _ in range(2)]
    refs = [-20 + torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(2)]
    counts = torch.tensor([3.0, 5.0, 1.0], dtype=torch.float64)

    def f(chosen, rejected):
        return fastalign.dpo_loss(
            chosen, rejected, *refs, chosen_num_tokens=counts, rejected_num_tokens=counts + 1, **options
        ).loss

    assert torch.autograd.gradcheck(f, tuple(inputs))


# --- bad input ------------------------------------------------------------------------------------

OPTION_ERRORS = [
    ({"beta": 0.0}, ValueError, "beta: expected a finite number > 0"),
    ({"beta": -0.1}, ValueError, "beta: expected a finite number > 0"),
    ({"beta": math.nan}, ValueError, "beta"),
    ({"loss_type": "dpo"}, ValueError, r"loss_type: unknown \['dpo'\]; expected any of sigmoid, hinge, ipo, "
                                       "exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, "
                                       "apo_zero, apo_down, discopop, sft, sigmoid_norm"),
    ({"loss_type": []}, ValueError, "loss_type: .*empty"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, ValueError,
     r"loss_weights: expected one weight per loss type \(2 for"),
    ({"loss_weights": [math.inf]}, ValueError, "loss_weights"),
    ({"loss_type": "exo_pair"}, ValueError, "label_smoothing: the 'exo_pair' loss needs label_smoothing > 0"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, ValueError,
     r"label_smoothing: the 'robust' loss needs .*\[0, 0.5\)"),
    ({"label_smoothing": 0.1}, ValueError, "label_smoothing: only aot, aot_unpaired, exo_pair, robust use it"),
    ({"loss_type": "aot", "label_smoothing": -0.1}, ValueError, r"label_smoothing: expected a value in \[0, 1\)"),
    ({"loss_type": "aot", "use_weighting": True}, ValueError, "use_weighting: .*'aot'.*cannot be combined"),
    ({"loss_type": ["sigmoid", "aot_unpaired"], "use_weighting": True}, ValueError, "use_weighting"),
    ({"loss_type": "nca_pair", "f_divergence_type": "js_divergence"}, ValueError,
     "f_divergence_type: 'js_divergence' is defined only for the loss types"),
    ({"loss_type": ["sigmoid", "aot"], "f_divergence_type": "forward_kl"}, ValueError, "f_divergence_type"),
    ({"f_divergence_type": "kl"}, ValueError, "f_divergence_type: unknown 'kl'; expected one of reverse_kl"),
    ({"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": math.nan}, ValueError,
     "f_alpha_divergence_coef"),
    ({"ld_alpha": 1.5}, ValueError, r"ld_alpha: expected a value in \[0, 1\]"),
    ({"discopop_tau": 0.0}, ValueError, "discopop_tau"),
    ({"dpop_lambda": -1.0}, ValueError, "dpop_lambda: expected a value >= 0"),
    ({"loss_type": "ipo", "dpop_lambda": 1.0}, ValueError, "dpop_lambda: the DPOP penalty modifies the 'sigmoid' loss"),
    ({"use_weighting": 1}, TypeError, "use_weighting: expected a bool"),
]


@pytest.mark.parametrize("entry", ["module", "from_logits", "dpo_loss"])
@pytest.mark.parametrize("options, error, match", OPTION_ERRORS)
def test_bad_options_name_the_option(entry, options, error, match):
    logits, labels, mask, rc, rr, _ = make_batch(torch.float32)
    with pytest.raises(error, match=match):
        if entry == "module":
            fastalign.DPOLoss(**options)
        elif entry == "from_logits":
            fastalign.dpo_loss_from_logits(logits, labels, completion_mask=mask, ref_chosen_logps=rc,
                                           ref_rejected_logps=rr, **options)
        else:
            fastalign.dpo_loss(rc, rr, rc, rr, **options)


def _logits_call(**change):
    logits, labels, mask, rc, rr, ref_logits = make_batch(torch.float32)
    args = {"logits": logits, "labels": labels, "completion_mask": mask, "ref_chosen_logps": rc,
            "ref_rejected_logps": rr}
    # The parameters are built at collection, on CPU: each bad input goes to the batch's device, so
    # that the check under test, not the device check, answers.
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.pop("args", {}).items()})
    change = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()}
    return lambda: fastalign.dpo_loss_from_logits(**args, **change)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"args": {"logits": torch.randn(3, T, V), "labels": torch.randint(0, V, (3, T)), "completion_mask": None}},
         ValueError, "logits: a paired loss takes 2B rows, B chosen then B rejected.*got 3 rows"),
        ({"args": {"logits": torch.randn(2 * B, V)}}, ValueError, r"logits: expected \[2B, T, V\]"),
        ({"args": {"ref_chosen_logps": torch.zeros(B + 1)}}, ValueError,
         r"ref_chosen_logps: expected shape \(2,\), one per pair \(logits has 4 rows = 2B\), got \(3,\)"),
        ({"args": {"ref_rejected_logps": torch.zeros(2 * B)}}, ValueError,
         r"ref_rejected_logps: expected shape \(2,\)"),
        ({"args": {"ref_rejected_logps": None}}, ValueError, "ref_rejected_logps: .*pass both or neither"),
        ({"args": {"ref_chosen_logps": None, "ref_rejected_logps": None}}, ValueError,
         r"ref_chosen_logps/ref_rejected_logps/ref_logits: loss_type \['sigmoid'\] needs the reference"),
        ({"ref_logits": torch.randn(2 * B, T, V)}, ValueError, "ref_logits: pass either ref_logits or"),
        ({"args": {"ref_chosen_logps": None, "ref_rejected_logps": None}, "ref_logits": torch.randn(2 * B, T, V + 1)},
         ValueError, r"ref_logits: expected shape \(4, 6, 97\)"),
        ({"reference_free": True}, ValueError, "reference log-probs were passed with reference_free=True"),
        ({"args": {"labels": torch.randint(0, V, (2 * B, T + 1))}}, ValueError, "labels: expected shape"),
        ({"args": {"completion_mask": torch.ones(2 * B, T + 1)}}, ValueError,
         r"completion_mask: expected shape \(4, 6\) \(logits.shape\[:-1\], like labels\)"),
        ({"args": {"ref_chosen_logps": None, "ref_rejected_logps": None},
          "ref_logits": torch.zeros(2 * B, T, V, dtype=torch.long)}, TypeError, "ref_logits: expected a floating"),
    ],
)
def test_bad_logits_level_input_names_the_argument(change, error, match):
    call = _logits_call(**change)
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"policy_rejected_logps": torch.zeros(B + 1)}, ValueError,
         r"policy_rejected_logps: expected shape \(2,\) \(that of policy_chosen_logps\), got \(3,\)"),
        ({"ref_chosen_logps": torch.zeros(B + 1)}, ValueError, r"ref_chosen_logps: expected shape \(2,\)"),
        ({"policy_chosen_logps": torch.zeros(2, B)}, ValueError, r"policy_chosen_logps: expected shape \[B\]"),
        ({"policy_chosen_logps": torch.zeros(0), "policy_rejected_logps": torch.zeros(0)}, ValueError,
         "policy_chosen_logps: expected shape"),
        ({"ref_rejected_logps": torch.zeros(B, dtype=torch.long)}, TypeError,
         "ref_rejected_logps: expected a floating"),
        ({"ref_chosen_logps": None, "ref_rejected_logps": None, "loss_type": "hinge"}, ValueError,
         r"loss_type \['hinge'\] needs the reference model's log-probs"),
        ({"loss_type": "ipo"}, ValueError, r"chosen_num_tokens: required by loss_type \['ipo'\]"),
        ({"loss_type": "sft", "chosen_num_tokens": torch.ones(B)}, ValueError, "rejected_num_tokens: required"),
        ({"use_weighting": True, "chosen_num_tokens": torch.ones(B), "rejected_num_tokens": torch.ones(B)},
         ValueError, r"chosen_log_sum_sq_probs: required by use_weighting \(WPO\)"),
        ({"ld_alpha": 0.5}, ValueError, r"chosen_tail_logps: required by ld_alpha \(LD-DPO\)"),
        ({"ld_alpha": 0.5, "chosen_tail_logps": torch.zeros(B), "rejected_tail_logps": torch.zeros(B + 1)},
         ValueError, r"rejected_tail_logps: expected shape \(2,\)"),
    ],
)
def test_bad_logps_level_input_names_the_argument(kwargs, error, match):
    args = {"policy_chosen_logps": torch.zeros(B), "policy_rejected_logps": torch.zeros(B),
            "ref_chosen_logps": torch.zeros(B), "ref_rejected_logps": torch.zeros(B)}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fastalign.dpo_loss(**args)
