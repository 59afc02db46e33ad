"""fastalign's vocabulary-parallel token log-probs against verl's own
`verl.utils.megatron.tensor_parallel.vocab_parallel_log_probs_from_logits` (Megatron-core's
`vocab_parallel_cross_entropy`, negated), the function verl's Megatron engine calls on the
vocabulary-sharded lm_head output. 4 gloo processes on CPU, Megatron's parallel state set up by
`parallel_state.initialize_model_parallel` with tensor-parallel groups of 2 (two of them) and of 4,
fastalign given Megatron's own tensor-parallel group: log-probs and the gradient of each rank's
slice agree with verl's, are at least as close to float64, and equal one process running fastalign
over the whole vocabulary.

How verl's function differs, and how the comparison accounts for it (each is also asserted, so a
change in verl or Megatron shows up here):
- no temperature: verl's engine divides the logits in place first (`logits.div_(temperature)`);
  verl gets logits / t, fastalign `temperature=t`;
- no mask or ignore_index: verl multiplies by the response mask afterwards, so verl gets real token
  ids at padded positions and its output is masked, fastalign gets `mask=`. A label outside the
  vocabulary (-100) is not an error to Megatron: every slice drops it and the result is the
  log-prob of the most likely token, max_j log p_j, not 0;
- it computes in fp32 whatever the logits' dtype and returns fp32 (fastalign returns fp64 for fp64
  logits), so fp64 logits are compared at fp32 accuracy;
- it overwrites fp32 logits with their softmax probabilities (Megatron works in place to save
  memory, on an fp32 copy for other dtypes; verl's engine clones the logits when it still needs
  them), so it gets a copy here;
- Megatron takes every rank's slice to be the same size (V divisible by the group's size).
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
import warnings

import peers
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Megatron warns that Transformer Engine and Apex are absent
    peers.require("megatron.core")
# verl itself is imported by the workers only (4 s a process); here it need only be there.
pytestmark = pytest.mark.skipif(peers.missing("verl"),
                                reason="verl is not installed (make venv installs the test peers)")

B, T, V = 3, 7, 48  # V divisible by 2 and 4: Megatron's slices are equal
WORLD, TP_SIZES = 4, (2, 4)


def mask():
    """Padding at both ends of a row, as in verl's left-padded prompts and right-padded responses."""
    m = torch.ones(B, T, dtype=torch.bool)
    m[0, 5:] = False
    m[2, :2] = False
    return m


def weights():
    """The per-token weights of the objective, zero where masked (verl's masked sum)."""
    return torch.randn(B, T, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * mask()


def cases():
    """(name, logits [B, T, V], labels [B, T], temperature), the same in every process: labels at
    both edges of every rank's slice, and padded positions hold real token ids, as in verl's
    batches."""
    g = torch.Generator().manual_seed(11)
    out = []
    for name, dtype, offset, temperature in (("fp32", torch.float32, 0.0, 1.0),
                                             ("fp32 temperature", torch.float32, 0.0, 0.7),
                                             ("fp32 large magnitude", torch.float32, 1e4, 1.0),
                                             ("fp64", torch.float64, 0.0, 1.0),
                                             ("bf16", torch.bfloat16, 0.0, 1.0)):
        logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3 + offset).to(dtype)
        labels = torch.randint(0, V, (B, T), generator=g)
        labels[1] = torch.tensor([0, 11, 12, 24, 35, 36, V - 1])
        out.append((name, logits, labels, temperature))
    return out


def _gather_last(t, group):
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, t, group=group)
    return torch.cat(parts, dim=-1)


def _tp_results(tp):
    """Every case on this rank's slice of the vocabulary, over Megatron's tensor-parallel group of
    size `tp` (set up by the caller)."""
    from megatron.core import parallel_state
    from verl.utils.megatron.tensor_parallel import vocab_parallel_log_probs_from_logits

    import fastalign

    group = parallel_state.get_tensor_model_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    m, w = mask(), weights()
    results = {}
    for name, logits, labels, temperature in cases():
        n = V // tp
        local = logits[..., tp_rank * n:(tp_rank + 1) * n]

        leaf = local.clone().requires_grad_()
        # As verl's engine: temperature applied to the logits beforehand, the mask afterwards; and
        # a tensor of its own, which verl's function overwrites.
        scaled = leaf / temperature if temperature != 1.0 else leaf.clone()
        verl_logps = vocab_parallel_log_probs_from_logits(scaled, labels) * m
        after_call = scaled.detach().clone()
        (verl_logps.double() * w).sum().backward()
        verl_grad = leaf.grad

        leaf = local.clone().requires_grad_()
        fields = fastalign.token_logprobs(leaf, labels, mask=m, temperature=temperature, process_group=group)
        (fields.logps.double() * w).sum().backward()

        with torch.no_grad():
            ignored = vocab_parallel_log_probs_from_logits(local.clone() / temperature, labels.masked_fill(~m, -100))
        results[name] = {
            "verl": verl_logps.detach(), "verl_grad": _gather_last(verl_grad, group),
            "fastalign": fields.logps.detach(), "fastalign_grad": _gather_last(leaf.grad, group),
            "verl_ignored": ignored, "verl_input_after": _gather_last(after_call, group),
            "fastalign_input_kept": torch.equal(leaf.detach(), local),
        }
    return results


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core import parallel_state
            import verl.utils.megatron.tensor_parallel  # noqa: F401
        # One set of processes for both sizes (each process pays the import of verl and Megatron):
        # 2 is two tensor-parallel groups of 2 (data parallel 2), 4 the whole world.
        for tp in TP_SIZES:
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
            results = _tp_results(tp)
            if parallel_state.get_tensor_model_parallel_rank() == 0:
                torch.save(results, os.path.join(out_dir, f"tp{tp}-rank{rank}.pt"))
            parallel_state.destroy_model_parallel()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the results are on disk; see test_linear_fsdp.py for why no interpreter shutdown


@pytest.fixture(scope="module")
def runs():
    """{tp: [the results of each tensor-parallel group's rank 0]}."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(WORLD, os.path.join(tmp, "rendezvous"), tmp), nprocs=WORLD, join=True)
        return {tp: [torch.load(os.path.join(tmp, f"tp{tp}-rank{r}.pt")) for r in range(0, WORLD, tp)]
                for tp in TP_SIZES}


def truth(logits, labels, temperature):
    """float64 log-probs (masked) and their gradient under the objective."""
    leaf = logits.to(torch.float64, copy=True).requires_grad_()
    logp = torch.log_softmax(leaf / temperature, -1)
    logps = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask()
    (logps * weights()).sum().backward()
    return logps.detach(), leaf.grad, logp.detach()


# fp64 logits are compared at fp32 accuracy with verl, which computes in fp32 (both are held to
# float64 below).
FP32 = dict(rtol=1e-5, atol=1e-6)


def grad_tolerance(dtype):
    if dtype != torch.bfloat16:
        return FP32
    # bf16 gradients on both sides; and for a token whose label another slice holds, fastalign's
    # entry 0 of the slice carries the absolute error |g| * 2^-9 that the label's own entry has
    # unsharded (vocab_parallel.py), where Megatron rounds its fp32 gradient once.
    return dict(rtol=1.6e-2, atol=float(weights().abs().max()) * 2**-8)


@pytest.mark.parametrize("tp", TP_SIZES)
def test_vocab_parallel_logprobs_equal_verls(runs, tp):
    import fastalign
    from numerics import assert_as_accurate_as_reference

    m, w = mask(), weights()
    for (name, logits, labels, temperature), group in itertools.product(cases(), range(len(runs[tp]))):
        got = runs[tp][group][name]
        name = f"{name} (group {group} of {len(runs[tp])})"
        grad_tol = grad_tolerance(logits.dtype)
        torch.testing.assert_close(got["fastalign"], got["verl"].to(got["fastalign"].dtype), **FP32,
                                   msg=f"{name}: log-probs")
        torch.testing.assert_close(got["fastalign_grad"], got["verl_grad"], **grad_tol, msg=f"{name}: grad")

        # Against float64: fastalign at least as accurate as verl.
        true_logps, true_grad, true_logp = truth(logits, labels, temperature)
        assert_as_accurate_as_reference(got["fastalign"], got["verl"], true_logps, f"{name}: log-probs")
        assert_as_accurate_as_reference(got["fastalign_grad"], got["verl_grad"], true_grad, f"{name}: grad",
                                        slack_eps=8.0)

        # One process, the whole vocabulary: the same numbers (to the last bits in fp64).
        leaf = logits.clone().requires_grad_()
        whole = fastalign.token_logprobs(leaf, labels, mask=m, temperature=temperature)
        (whole.logps.double() * w).sum().backward()
        exact = dict(rtol=1e-12, atol=1e-12) if logits.dtype == torch.float64 else None
        torch.testing.assert_close(got["fastalign"], whole.logps, **(exact or FP32), msg=f"{name}: one process")
        torch.testing.assert_close(got["fastalign_grad"], leaf.grad, **(exact or grad_tol),
                                   msg=f"{name}: one process, grad")

        # verl's semantics that differ (the module docstring).
        assert got["verl"].dtype == torch.float32, name
        assert got["fastalign"].dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32), name
        expected_ignored = torch.where(m, true_logps, true_logp.max(-1).values)
        torch.testing.assert_close(got["verl_ignored"].double(), expected_ignored, **FP32, msg=f"{name}: -100")
        if logits.dtype == torch.float32:
            torch.testing.assert_close(got["verl_input_after"].double(), true_logp.exp(), **FP32,
                                       msg=f"{name}: verl's input overwritten by its softmax")
        else:
            assert torch.equal(got["verl_input_after"], logits / temperature), name
        assert got["fastalign_input_kept"], name
