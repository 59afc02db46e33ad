"""The conventions every preference loss and RLOO follow: options as keywords or as
`options=x_options(...)` with the same result, a module built from the same keywords, options that
are frozen dataclasses, every option listed in every docstring, and the calling forms kept for
compatibility (masks and options by position), each with a DeprecationWarning and the same result."""

from __future__ import annotations

import dataclasses
import inspect
import pydoc
import warnings

import pytest
import torch
from conftest import DEVICE

import fastalign

B, T, V = 2, 5, 11
G = torch.Generator().manual_seed(0)
LOGITS = torch.randn(2 * B, T, V, generator=G).to(DEVICE)
LABELS = torch.randint(0, V, (2 * B, T), generator=G).to(DEVICE)
MASK = torch.ones(2 * B, T, device=DEVICE)
MASK[:, 0] = 0
SUMS = torch.tensor([-9.0, -7.5], device=DEVICE)
COUNTS = torch.tensor([3.0, 4.0], device=DEVICE)
DESIRABLE = torch.tensor([True, False, True, True], device=DEVICE)
POLICY = dict(completion_mask=MASK, advantages=torch.tensor([1.0, -1.0, 0.5, -0.5], device=DEVICE),
              old_logps=torch.full((2 * B,), -11.0, device=DEVICE))


class Loss:
    """One loss's entry points: `functions` take option keywords (or options=); `module(**options)`
    builds the module and calls it on the same batch as `functions[-1]`."""

    def __init__(self, builder, kind, options, functions, module):
        self.builder, self.kind, self.options, self.functions, self.module = builder, kind, options, functions, module


LOSSES = {
    "dpo": Loss(
        fastalign.dpo_options, fastalign.dpo.DPOOptions,
        dict(beta=0.3, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5]),
        [lambda **o: fastalign.dpo_loss(SUMS, SUMS - 1, SUMS + 1, SUMS, chosen_num_tokens=COUNTS,
                                        rejected_num_tokens=COUNTS + 1, **o),
         lambda **o: fastalign.dpo_loss_from_logits(LOGITS, LABELS, completion_mask=MASK, ref_chosen_logps=SUMS,
                                                    ref_rejected_logps=SUMS - 1, **o)],
        lambda **o: fastalign.DPOLoss(**o)(LOGITS, LABELS, completion_mask=MASK, ref_chosen_logps=SUMS,
                                           ref_rejected_logps=SUMS - 1),
    ),
    "cpo": Loss(
        fastalign.cpo_options, fastalign.cpo.CPOOptions, dict(beta=0.2, loss_type="simpo", simpo_gamma=0.3),
        [lambda **o: fastalign.cpo_loss(SUMS, SUMS - 1, COUNTS, COUNTS + 1, **o),
         lambda **o: fastalign.cpo_loss_from_logits(LOGITS, LABELS, completion_mask=MASK, **o)],
        lambda **o: fastalign.CPOLoss(**o)(LOGITS, LABELS, completion_mask=MASK),
    ),
    "orpo": Loss(
        fastalign.orpo_options, fastalign.orpo.ORPOOptions, dict(beta=0.4),
        [lambda **o: fastalign.orpo_loss(SUMS / 4, SUMS / 3, COUNTS, COUNTS, SUMS, COUNTS + 2, **o),
         lambda **o: fastalign.orpo_loss_from_logits(LOGITS, LABELS, completion_mask=MASK, **o)],
        lambda **o: fastalign.ORPOLoss(**o)(LOGITS, LABELS, completion_mask=MASK),
    ),
    "kto": Loss(
        fastalign.kto_options, fastalign.kto.KTOOptions, dict(beta=0.3, desirable_weight=1.5),
        [lambda **o: fastalign.kto_loss(torch.cat([SUMS, SUMS - 2]), torch.cat([SUMS, SUMS]) - 0.5, DESIRABLE,
                                        kl=0.2, **o),
         lambda **o: fastalign.kto_loss_from_logits(LOGITS, LABELS, torch.cat([SUMS, SUMS]), DESIRABLE,
                                                    completion_mask=MASK, kl=0.2, **o)],
        lambda **o: fastalign.KTOLoss(**o)(LOGITS, LABELS, torch.cat([SUMS, SUMS]), DESIRABLE, completion_mask=MASK,
                                           kl=0.2),
    ),
    "reward": Loss(
        fastalign.reward_options, fastalign.reward.RewardOptions, dict(center_rewards_coefficient=0.01),
        [lambda **o: fastalign.bradley_terry_loss(SUMS / 5, SUMS / 4, **o),
         lambda **o: fastalign.reward_loss(torch.cat([SUMS / 5, SUMS / 4]), margin=0.1, **o)],
        lambda **o: fastalign.RewardLoss(**o)(torch.cat([SUMS / 5, SUMS / 4]), margin=0.1),
    ),
    "rloo": Loss(
        fastalign.rloo_options, fastalign.rloo.RLOOOptions, dict(epsilon=0.1, epsilon_high=0.3, temperature=0.8),
        [lambda **o: fastalign.rloo_loss(LOGITS, LABELS.clamp(min=0), **POLICY, **o)],
        lambda **o: fastalign.RLOOLoss(**o)(LOGITS, LABELS.clamp(min=0), **POLICY),
    ),
}


def assert_equal(a, b):
    assert torch.equal(a.loss, b.loss)
    assert list(a.metrics) == list(b.metrics)
    for name in a.metrics:
        assert torch.equal(a.metrics[name], b.metrics[name]) or (a.metrics[name].isnan() & b.metrics[name].isnan())


def entries():
    return [pytest.param(name, i, id=f"{name}-{i}")
            for name, loss in LOSSES.items() for i in range(len(loss.functions))]


@pytest.mark.parametrize("name, i", entries())
def test_options_object_equals_the_same_keywords(name, i):
    loss = LOSSES[name]
    fn = loss.functions[i]
    assert_equal(fn(options=loss.builder(**loss.options)), fn(**loss.options))
    assert not torch.equal(fn(**loss.options).loss, fn().loss)  # the options change the loss


@pytest.mark.parametrize("name", LOSSES)
def test_module_holds_the_checked_options_and_equals_the_function(name):
    loss = LOSSES[name]
    module = loss.module(**loss.options)
    assert_equal(module, loss.functions[-1](**loss.options))
    built = {"reward": fastalign.RewardLoss, "rloo": fastalign.RLOOLoss, "dpo": fastalign.DPOLoss,
             "cpo": fastalign.CPOLoss, "orpo": fastalign.ORPOLoss, "kto": fastalign.KTOLoss}[name](**loss.options)
    assert built.options == loss.builder(**loss.options)


@pytest.mark.parametrize("name, i", entries())
def test_options_and_keywords_together_is_an_error(name, i):
    loss = LOSSES[name]
    first = next(iter(loss.options))
    both = rf"^options: pass either options= or keyword options, not both \(\['{first}'\]\)"
    with pytest.raises(ValueError, match=both):
        loss.functions[i](options=loss.builder(), **{first: loss.options[first]})


@pytest.mark.parametrize("name", LOSSES)
def test_options_are_frozen_dataclasses(name):
    loss = LOSSES[name]
    options = loss.builder(**loss.options)
    assert isinstance(options, loss.kind) and dataclasses.is_dataclass(options)
    field = dataclasses.fields(options)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(options, field, getattr(options, field))
    assert dataclasses.replace(options) == options


@pytest.mark.parametrize("name", LOSSES)
def test_every_entry_point_lists_every_option(name):
    loss = LOSSES[name]
    module = fastalign.__dict__[{"dpo": "DPOLoss", "cpo": "CPOLoss", "orpo": "ORPOLoss", "kto": "KTOLoss",
                                 "reward": "RewardLoss", "rloo": "RLOOLoss"}[name]]
    functions = {"dpo": ("dpo_loss", "dpo_loss_from_logits"), "cpo": ("cpo_loss", "cpo_loss_from_logits"),
                 "orpo": ("orpo_loss", "orpo_loss_from_logits"), "kto": ("kto_loss", "kto_loss_from_logits"),
                 "reward": ("bradley_terry_loss", "reward_loss"), "rloo": ("rloo_loss",)}[name]
    targets = [loss.builder, module, *(getattr(fastalign, f) for f in functions)]
    for parameter in inspect.signature(loss.builder).parameters.values():
        for target in targets:
            assert f"{parameter.name} ({parameter.default!r}): " in target.__doc__, (target, parameter.name)
    for target in targets:
        assert "{" + "options}" not in target.__doc__
    assert "reference_free (False): take the reference log-probs as 0" in pydoc.render_doc(fastalign.dpo_loss)


# --- calling forms kept for compatibility ---------------------------------------------------------------

DEPRECATED_POSITIONAL = {
    "dpo_loss_from_logits": (
        lambda: fastalign.dpo_loss_from_logits(LOGITS, LABELS, MASK, SUMS, SUMS - 1),
        lambda: fastalign.dpo_loss_from_logits(LOGITS, LABELS, completion_mask=MASK, ref_chosen_logps=SUMS,
                                               ref_rejected_logps=SUMS - 1),
        "dpo_loss_from_logits: passing completion_mask, ref_chosen_logps, ref_rejected_logps by position"),
    "DPOLoss.forward": (
        lambda: fastalign.DPOLoss()(LOGITS, LABELS, MASK, SUMS, SUMS - 1),
        lambda: fastalign.DPOLoss()(LOGITS, LABELS, completion_mask=MASK, ref_chosen_logps=SUMS,
                                    ref_rejected_logps=SUMS - 1),
        "DPOLoss.forward: passing completion_mask, ref_chosen_logps, ref_rejected_logps by position"),
    "CPOLoss.forward": (
        lambda: fastalign.CPOLoss()(LOGITS, LABELS, MASK),
        lambda: fastalign.CPOLoss()(LOGITS, LABELS, completion_mask=MASK),
        "CPOLoss.forward: passing completion_mask by position"),
    "ORPOLoss.forward": (
        lambda: fastalign.ORPOLoss()(LOGITS, LABELS, MASK, MASK),
        lambda: fastalign.ORPOLoss()(LOGITS, LABELS, completion_mask=MASK, attention_mask=MASK),
        "ORPOLoss.forward: passing completion_mask, attention_mask by position"),
    "KTOLoss.forward": (
        lambda: fastalign.KTOLoss()(LOGITS, LABELS, torch.cat([SUMS, SUMS]), DESIRABLE, MASK, None, None, 0.2),
        lambda: fastalign.KTOLoss()(LOGITS, LABELS, torch.cat([SUMS, SUMS]), DESIRABLE, completion_mask=MASK, kl=0.2),
        "KTOLoss.forward: passing completion_mask, kl_logps, ref_kl_logps, kl by position"),
    "cpo_options": (lambda: fastalign.cpo_options(0.2, "simpo"),
                    lambda: fastalign.cpo_options(beta=0.2, loss_type="simpo"),
                    "cpo_options: passing beta, loss_type by position"),
    "kto_options": (lambda: fastalign.kto_options(0.2, "kto", 2.0),
                    lambda: fastalign.kto_options(beta=0.2, loss_type="kto", desirable_weight=2.0),
                    "kto_options: passing beta, loss_type, desirable_weight by position"),
    "DPOLoss": (lambda: fastalign.DPOLoss(0.2, "hinge").options,
                lambda: fastalign.DPOLoss(beta=0.2, loss_type="hinge").options,
                "DPOLoss.__init__: passing beta, loss_type by position"),
    "CPOLoss": (lambda: fastalign.CPOLoss(0.2).options, lambda: fastalign.CPOLoss(beta=0.2).options,
                "CPOLoss.__init__: passing beta by position"),
    "ORPOLoss": (lambda: (lambda m: (m.options, m.ignore_index))(fastalign.ORPOLoss(0.2, -1)),
                 lambda: (lambda m: (m.options, m.ignore_index))(fastalign.ORPOLoss(beta=0.2, ignore_index=-1)),
                 "ORPOLoss.__init__: passing beta, ignore_index by position"),
    "KTOLoss": (lambda: fastalign.KTOLoss(0.2, "apo_zero_unpaired").options,
                lambda: fastalign.KTOLoss(beta=0.2, loss_type="apo_zero_unpaired").options,
                "KTOLoss.__init__: passing beta, loss_type by position"),
    "RewardLoss": (lambda: fastalign.RewardLoss(0.1).options,
                   lambda: fastalign.RewardLoss(center_rewards_coefficient=0.1).options,
                   "RewardLoss.__init__: passing center_rewards_coefficient by position"),
    "RLOOLoss": (lambda: fastalign.RLOOLoss(0.1, 0.3).options,
                 lambda: fastalign.RLOOLoss(epsilon=0.1, epsilon_high=0.3).options,
                 "RLOOLoss.__init__: passing epsilon, epsilon_high by position"),
}


@pytest.mark.parametrize("entry", DEPRECATED_POSITIONAL)
def test_positional_arguments_now_keyword_only_still_work_with_a_warning(entry):
    old, new, message = DEPRECATED_POSITIONAL[entry]
    with pytest.warns(DeprecationWarning, match=rf"^{message.replace('.', chr(92) + '.')} is deprecated") as record:
        got = old()
    # Attributed to the caller's line, where Python's default filter shows it (not to fastalign or torch).
    assert [w.filename for w in record if w.category is DeprecationWarning] == [__file__]
    want = new()
    if isinstance(want, fastalign.types.LossOutput):
        assert_equal(got, want)
    else:
        assert got == want


def test_keyword_calls_warn_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for name, loss in LOSSES.items():
            for fn in loss.functions:
                fn(**loss.options)
            loss.module(**loss.options)
        for _, new, _ in DEPRECATED_POSITIONAL.values():
            new()


def test_positional_misuse_is_a_type_error():
    with pytest.raises(TypeError, match=r"takes at most 4 positional arguments but 5 were given"):
        fastalign.CPOLoss()(LOGITS, LABELS, MASK, MASK)
    with pytest.raises(TypeError, match="got multiple values for argument 'completion_mask'"):
        fastalign.CPOLoss()(LOGITS, LABELS, MASK, completion_mask=MASK)


def test_compiled_module_called_the_earlier_way_still_compiles_whole():
    module = fastalign.CPOLoss(loss_type="simpo")
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: module(x, LABELS, MASK).loss, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(LOGITS), module(LOGITS, LABELS, completion_mask=MASK).loss)
