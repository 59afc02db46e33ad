"""token_logprobs on logits sharded along the vocabulary (tensor parallelism), 2 and 4 gloo
processes on CPU: every field and the gradient of every slice equal one process running the whole
vocabulary. Slices come as a DTensor (`distribute_tensor(..., [Shard(-1)])`, and from a
`ColwiseParallel` lm_head built by `parallelize_module`) or as plain local tensors with
`process_group=` (uneven slices: 37 entries over 4 ranks)."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def cases():
    """(name, logits, labels, mask, options) for every case, the same in every process."""
    g = torch.Generator().manual_seed(7)
    out = []
    logits = torch.randn(3, 5, 37, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 37, (3, 5), generator=g)
    labels[0, 1] = -100
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False
    out.append(("fp64 temperature mask", logits, labels, mask, dict(temperature=0.7)))
    logits = torch.randn(2, 4, 37, generator=g) * 3
    out.append(("fp32 softcap scale", logits, torch.randint(0, 37, (2, 4), generator=g), None,
                dict(softcap=5.0, logit_scale=0.5)))
    out.append(("fp32 negative scale", torch.randn(2, 3, 37, generator=g), torch.randint(0, 37, (2, 3), generator=g),
                None, dict(logit_scale=-1.3, temperature=1.1)))
    # |z| ~ 1e4: the slices combine by differences of nearby values, as one process measures them.
    big = torch.randn(2, 3, 37, generator=g, dtype=torch.float64) * 3 + 1e4
    out.append(("fp32 large magnitude", big.float(), torch.randint(0, 37, (2, 3), generator=g), None, {}))
    # Ties across slices (argmax takes the first maximum) and a slice with no mass at all.
    ties = torch.randn(4, 37, generator=g, dtype=torch.float64)
    ties[:, 2] = ties[:, 30] = 9.0
    ties[3, :10] = float("-inf")
    tie_labels = torch.tensor([2, 30, 5, 30])
    out.append(("fp64 ties and an empty slice", ties, tie_labels, None, {}))
    logits = torch.randn(2, 6, 37, generator=g).bfloat16()
    out.append(("bf16", logits, torch.randint(0, 37, (2, 6), generator=g), None, dict(temperature=0.9)))
    return out


def objective(fields):
    """A loss that weighs every token's log-prob and entropy differently."""
    logps, entropy = fields.logps, fields.entropy
    w = torch.linspace(-1.0, 1.0, logps.numel(), dtype=torch.float64).view_as(logps)
    return (logps.double() * w).sum() + (entropy.double() * w.flip(-1)).sum() * 0.3


B, T, V, H = 4, 5, 23, 8


def loss_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    labels[1, 4] = -100  # masked out: a label there may be anything
    adv = torch.randn(B, generator=g)
    old, ref = torch.randn(B, T, generator=g) - 3, torch.randn(B, T, generator=g) - 3
    return logits, labels, mask, adv, old, ref


def loss_calls():
    """Every loss built on token log-probs: name -> fn(level) -> output, where `level` holds the
    input level's arguments (logits=, or hidden= with weight=, and vocab_group= for slices)."""
    import fastalign

    _, labels, mask, adv, old, ref = loss_batch()
    ref_pairs = torch.tensor([-30.0, -31.0]), torch.tensor([-29.0, -33.0])
    return {
        "grpo dapo": lambda x: fastalign.grpo_loss(
            labels=labels, **x, completion_mask=mask, advantages=adv, old_logps=old, ref_logps=ref, beta=0.04,
            loss_type="dapo", num_items_in_batch=mask.sum(), entropy_coef=0.01),
        "grpo gspo": lambda x: fastalign.grpo_loss(
            labels=labels, **x, completion_mask=mask, advantages=adv, old_logps=old,
            importance_sampling_level="sequence", loss_type="grpo"),
        "grpo verl": lambda x: fastalign.grpo_loss(
            labels=labels, **x, completion_mask=mask, advantages=adv, old_logps=old, convention="verl",
            loss_type="vanilla", loss_agg_mode="seq-mean-token-mean"),
        "ppo": lambda x: fastalign.ppo_loss(
            labels=labels, **x, completion_mask=mask, advantages=adv[:, None].expand(B, T), old_logps=old,
            ref_logps=ref, kl_coef=0.1),
        "rloo": lambda x: fastalign.rloo_loss(labels=labels, **x, completion_mask=mask, advantages=adv,
                                              old_logps=(old * mask).sum(-1)),
        "dpo": lambda x: fastalign.DPOLoss(beta=0.1)(labels=labels, **x, completion_mask=mask,
                                                     ref_chosen_logps=ref_pairs[0], ref_rejected_logps=ref_pairs[1]),
        "cpo": lambda x: fastalign.CPOLoss(beta=0.1)(labels=labels, **x, completion_mask=mask),
        "orpo": lambda x: fastalign.ORPOLoss(beta=0.1)(labels=labels, **x, completion_mask=mask),
        "kto": lambda x: fastalign.KTOLoss(beta=0.1)(
            labels=labels, **x, completion_mask=mask, ref_logps=torch.tensor([-30.0, -31.0, -29.0, -33.0]),
            desirable=torch.tensor([True, False, True, False]), kl=torch.tensor(0.1)),
        "rrhf": lambda x: fastalign.RRHFLoss(length_penalty=0.5)(
            labels=labels, **x, completion_mask=mask, rewards=torch.tensor([1.0, 0.5, 2.0, -1.0]), group_size=4),
    }


def lm_head_batch():
    """hidden [B, T, H] and an lm_head weight [V, H] for the hidden-states level."""
    g = torch.Generator().manual_seed(4)
    return torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) * 0.5


def _sliced_loss_results(world, rank):
    """Every loss on this rank's slice of the vocabulary with vocab_group=: plain logits slices, and
    the hidden states with this rank's rows of the lm_head (no rank holds the whole weight)."""
    group = dist.group.WORLD
    sizes = _slices(V, world)
    rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    logits = loss_batch()[0]
    hidden, weight = lm_head_batch()
    results = {}
    for name, fn in loss_calls().items():
        leaf = logits[..., rows].clone().requires_grad_()
        out = fn({"logits": leaf, "vocab_group": group})
        out.loss.backward()
        parts = [None] * world
        dist.all_gather_object(parts, leaf.grad)
        h, w = hidden.clone().requires_grad_(), weight[rows].clone().requires_grad_()
        linear = fn({"hidden": h, "weight": w, "vocab_group": group})
        linear.loss.backward()
        weight_parts = [None] * world
        dist.all_gather_object(weight_parts, w.grad)
        results[name] = {
            "loss": out.loss.detach(), "grad": torch.cat(parts, dim=-1), "metrics": _metrics(out),
            "linear_loss": linear.loss.detach(), "linear_metrics": _metrics(linear),
            "grad_hidden": h.grad, "grad_weight": torch.cat(weight_parts, dim=0),
        }
    return results


def _metrics(out):
    return {k: torch.as_tensor(v).detach() for k, v in getattr(out, "metrics", {}).items()}


def _loss_results(world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    logits = loss_batch()[0]
    results = {}
    for name, fn in loss_calls().items():
        leaf = distribute_tensor(logits, mesh, [Shard(2)]).requires_grad_()
        out = fn({"logits": leaf})
        out.loss.backward()
        results[name] = {"loss": out.loss.detach(), "grad": leaf.grad.full_tensor(),
                         "metrics": {k: torch.as_tensor(v).detach() for k, v in getattr(out, "metrics", {}).items()}}
    return results


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, H)
        self.body = torch.nn.Linear(H, H)
        self.lm_head = torch.nn.Linear(H, V, bias=False)

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.body(self.embed(ids))))


def _colwise_results(world):
    """A model whose lm_head is parallelized by parallelize_module(ColwiseParallel) with its output
    left sharded along the vocabulary, trained one step of GRPO from its logits."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    import fastalign

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = parallelize_module(TinyLM(), mesh, {"lm_head": ColwiseParallel(use_local_output=False)})
    _, labels, mask, adv, old, _ = loss_batch()
    logits = model(labels.clamp(min=0))
    out = fastalign.grpo_loss(logits, labels, completion_mask=mask, advantages=adv, old_logps=old, loss_type="dapo",
                              num_items_in_batch=mask.sum())
    out.loss.backward()
    grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for n, p in model.named_parameters()}
    # From hidden states: the ColwiseParallel weight (a DTensor, rows sharded) with its mesh's group.
    model.zero_grad()
    hidden = torch.tanh(model.body(model.embed(labels.clamp(min=0))))
    fields = fastalign.linear_token_logprobs(hidden, model.lm_head.weight, labels, mask=mask, outputs=("entropy",),
                                             process_group=mesh.get_group())
    objective(fields).backward()
    linear_grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                    for n, p in model.named_parameters()}
    return {"loss": out.loss.detach(), "grads": grads, "sharded": str(logits.placements),
            "linear_logps": fields.logps.detach(), "linear_grads": linear_grads}


def linear_cases():
    """(name, hidden [N, H], weight [V, H], bias or None, labels, options)."""
    g = torch.Generator().manual_seed(2)
    n, h, v = 9, 6, 29
    out = []
    for name, dtype, bias, options in (("fp64 temperature bias", torch.float64, True, dict(temperature=0.8)),
                                       ("fp64 softcap", torch.float64, False, dict(softcap=4.0, logit_scale=0.7)),
                                       ("fp32", torch.float32, True, {})):
        hidden = torch.randn(n, h, generator=g, dtype=dtype)
        weight = torch.randn(v, h, generator=g, dtype=dtype)
        labels = torch.randint(0, v, (n,), generator=g)
        labels[3] = -100
        out.append((name, hidden, weight, torch.randn(v, generator=g, dtype=dtype) if bias else None, labels, options))
    return out


def _linear_results(world, rank):
    """linear_token_logprobs with the lm_head split by rows: plain slices with process_group=."""
    import fastalign

    results = {}
    for name, hidden, weight, bias, labels, options in linear_cases():
        sizes = _slices(weight.shape[0], world)
        rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
        h = hidden.clone().requires_grad_()
        w = weight[rows].clone().requires_grad_()
        b = bias[rows].clone().requires_grad_() if bias is not None else None
        fields = fastalign.linear_token_logprobs(h, w, labels, bias=b, outputs=OUTPUTS, process_group=dist.group.WORLD,
                                                 **options)
        objective(fields).backward()
        local = [w.grad] + ([b.grad] if b is not None else [])
        parts = [None] * world
        dist.all_gather_object(parts, local)
        results[name] = {f: getattr(fields, f).detach() for f in ("logps",) + OUTPUTS}
        results[name]["grads"] = [h.grad] + [torch.cat([p[i] for p in parts]) for i in range(len(local))]
    return results


def _slices(vocab, world):
    return [t.numel() for t in torch.arange(vocab).tensor_split(world)]


def _worker(rank, world, init_file, mode, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import fastalign

        results = {}
        if mode == "losses":
            results = _loss_results(world)
        elif mode == "colwise":
            results = _colwise_results(world)
        elif mode == "linear":
            results = _linear_results(world, rank)
        elif mode == "sliced losses":
            results = _sliced_loss_results(world, rank)
        for name, logits, labels, mask, options in cases() if mode in ("group", "dtensor") else ():
            if mode == "dtensor":
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.tensor import Shard, distribute_tensor

                mesh = init_device_mesh("cpu", (world,))
                leaf = distribute_tensor(logits, mesh, [Shard(logits.dim() - 1)]).requires_grad_()
                fields = fastalign.token_logprobs(leaf, labels, mask=mask, outputs=OUTPUTS, **options)
                objective(fields).backward()
                grad = leaf.grad.full_tensor()
            else:
                sizes = _slices(logits.shape[-1], world)
                start = sum(sizes[:rank])
                leaf = logits[..., start:start + sizes[rank]].clone().requires_grad_()
                fields = fastalign.token_logprobs(leaf, labels, mask=mask, outputs=OUTPUTS,
                                                  process_group=dist.group.WORLD, **options)
                objective(fields).backward()
                parts = [None] * world
                dist.all_gather_object(parts, leaf.grad)
                grad = torch.cat(parts, dim=-1)
            results[name] = {f: getattr(fields, f).detach() for f in ("logps",) + OUTPUTS}
            results[name]["grad"] = grad
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "result.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the result is on disk; see test_linear_fsdp.py for why no interpreter shutdown


def _run(world, mode):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "rendezvous"), mode, tmp), nprocs=world, join=True)
        return torch.load(os.path.join(tmp, "result.pt"))


@pytest.mark.parametrize("mode", ["group", "dtensor"])
@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_equals_one_process(world, mode):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import fastalign
    from numerics import assert_as_accurate_as_reference

    results = _run(world, mode)
    for name, logits, labels, mask, options in cases():
        leaf = logits.clone().requires_grad_()
        whole = fastalign.token_logprobs(leaf, labels, mask=mask, outputs=OUTPUTS, **options)
        objective(whole).backward()
        truth_leaf = logits.double().requires_grad_()
        truth = fastalign.reference.token_logprobs(truth_leaf, labels, mask=mask, outputs=OUTPUTS, **options)
        objective(truth).backward()
        got = results[name]
        assert torch.equal(got["is_top1"], whole.is_top1), name
        for field in ("logps",) + OUTPUTS[:3]:
            # As accurate as one process against float64, entry by entry up to fp32 rounding.
            assert_as_accurate_as_reference(got[field], getattr(whole, field), getattr(truth, field),
                                            f"{name}: {field}")
        assert_as_accurate_as_reference(got["grad"], leaf.grad, truth_leaf.grad, f"{name}: grad", slack_eps=8.0)
        if logits.dtype == torch.float64:
            for field in ("logps",) + OUTPUTS[:3]:
                torch.testing.assert_close(got[field], getattr(whole, field), rtol=1e-12, atol=1e-12,
                                           msg=f"{name}: {field}")
            torch.testing.assert_close(got["grad"], leaf.grad, rtol=1e-12, atol=1e-12, msg=f"{name}: grad")


@pytest.mark.parametrize("world", [2, 4])
def test_every_loss_on_vocab_sharded_logits_equals_one_process(world):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    results = _run(world, "losses")
    logits = loss_batch()[0]
    for name, fn in loss_calls().items():
        leaf = logits.clone().requires_grad_()
        out = fn({"logits": leaf})
        out.loss.backward()
        got = results[name]
        torch.testing.assert_close(got["loss"], out.loss.detach(), rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(got["grad"], leaf.grad, rtol=1e-4, atol=1e-6, msg=name)
        metrics = getattr(out, "metrics", {})
        assert sorted(got["metrics"]) == sorted(metrics), name
        for key, value in metrics.items():
            torch.testing.assert_close(got["metrics"][key].float(), torch.as_tensor(value).float(), rtol=1e-4,
                                       atol=1e-6, equal_nan=True, msg=f"{name}: {key}")


def assert_loss_equal(got_loss, got_metrics, out, name):
    torch.testing.assert_close(got_loss, out.loss.detach(), rtol=1e-5, atol=1e-6, msg=name)
    metrics = getattr(out, "metrics", {})
    assert sorted(got_metrics) == sorted(metrics), name
    for key, value in metrics.items():
        torch.testing.assert_close(got_metrics[key].float(), torch.as_tensor(value).float(), rtol=1e-4,
                                   atol=1e-6, equal_nan=True, msg=f"{name}: {key}")


@pytest.mark.parametrize("world", [2, 4])
def test_every_loss_on_a_vocabulary_slice_equals_one_process(world):
    """Plain logits slices and an lm_head split by rows, with vocab_group=: loss, metrics, the
    gradient of every slice, of the hidden states and of every weight row equal one process."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    results = _run(world, "sliced losses")
    logits = loss_batch()[0]
    hidden, weight = lm_head_batch()
    for name, fn in loss_calls().items():
        got = results[name]
        leaf = logits.clone().requires_grad_()
        out = fn({"logits": leaf})
        out.loss.backward()
        assert_loss_equal(got["loss"], got["metrics"], out, name)
        torch.testing.assert_close(got["grad"], leaf.grad, rtol=1e-4, atol=1e-6, msg=name)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        linear = fn({"hidden": h, "weight": w})
        linear.loss.backward()
        assert_loss_equal(got["linear_loss"], got["linear_metrics"], linear, f"{name} from hidden states")
        torch.testing.assert_close(got["grad_hidden"], h.grad, rtol=1e-4, atol=1e-6, msg=f"{name}: grad hidden")
        torch.testing.assert_close(got["grad_weight"], w.grad, rtol=1e-4, atol=1e-6, msg=f"{name}: grad weight")


def test_colwise_parallel_lm_head_trains_as_one_process():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import fastalign

    got = _run(2, "colwise")
    assert "Shard(dim=2)" in got["sharded"]  # the logits really were vocabulary-sharded
    torch.manual_seed(0)
    model = TinyLM()
    _, labels, mask, adv, old, _ = loss_batch()
    out = fastalign.grpo_loss(model(labels.clamp(min=0)), labels, completion_mask=mask, advantages=adv, old_logps=old,
                              loss_type="dapo", num_items_in_batch=mask.sum())
    out.loss.backward()
    torch.testing.assert_close(got["loss"], out.loss.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    model.zero_grad()
    hidden = torch.tanh(model.body(model.embed(labels.clamp(min=0))))
    fields = fastalign.linear_token_logprobs(hidden, model.lm_head.weight, labels, mask=mask, outputs=("entropy",))
    objective(fields).backward()
    torch.testing.assert_close(got["linear_logps"], fields.logps.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got["linear_grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=f"linear: {name}")


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_lm_head_equals_one_process(world):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import fastalign

    results = _run(world, "linear")
    for name, hidden, weight, bias, labels, options in linear_cases():
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
        whole = fastalign.linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2] if bias is not None else None,
                                                outputs=OUTPUTS, **options)
        objective(whole).backward()
        got = results[name]
        assert torch.equal(got["is_top1"], whole.is_top1), name
        tol = dict(rtol=1e-12, atol=1e-12) if hidden.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        for field in ("logps",) + OUTPUTS[:3]:
            torch.testing.assert_close(got[field], getattr(whole, field), **tol, msg=f"{name}: {field}")
        for which, g, leaf in zip(("hidden", "weight", "bias"), got["grads"], leaves):
            torch.testing.assert_close(g, leaf.grad, **tol, msg=f"{name}: grad {which}")


def test_process_group_without_torch_distributed_is_named():
    import fastalign

    if dist.is_available() and dist.is_initialized():
        pytest.skip("this process already runs torch.distributed")
    with pytest.raises(ValueError, match=r"^process_group: vocabulary-parallel logits need an initialized"):
        fastalign.token_logprobs(torch.randn(2, 5), torch.tensor([1, 2]), process_group=object())
    with pytest.raises(ValueError, match=r"^process_group: vocabulary-parallel logits need an initialized"):
        fastalign.linear_token_logprobs(torch.randn(2, 3), torch.randn(5, 3), torch.tensor([1, 2]),
                                        process_group=object())


@pytest.mark.parametrize("name", ["grpo dapo", "rloo", "dpo", "kto"])
@pytest.mark.parametrize("at", ["logits", "hidden"])
def test_vocab_group_without_torch_distributed_is_named(name, at):
    if dist.is_available() and dist.is_initialized():
        pytest.skip("this process already runs torch.distributed")
    hidden, weight = lm_head_batch()
    level = {"logits": loss_batch()[0]} if at == "logits" else {"hidden": hidden, "weight": weight}
    with pytest.raises(ValueError, match=r"^vocab_group: torch.distributed is not initialized"):
        loss_calls()[name]({**level, "vocab_group": object()})
