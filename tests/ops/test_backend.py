"""The backend override (environment and context manager) and torch.compile through the op."""

from __future__ import annotations

import pytest
import torch

import fastalign
from fastalign.reference import logprobs as reference_logprobs


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv("FASTALIGN_BACKEND", raising=False)
    assert fastalign.current_backend() == "auto"


def test_environment_then_context_manager(monkeypatch):
    monkeypatch.setenv("FASTALIGN_BACKEND", "reference")
    assert fastalign.current_backend() == "reference"
    with fastalign.use_backend("native"):
        assert fastalign.current_backend() == "native"
        with fastalign.use_backend("AUTO"):
            assert fastalign.current_backend() == "auto"
        assert fastalign.current_backend() == "native"
    assert fastalign.current_backend() == "reference"


def counting(monkeypatch, name):
    calls = []
    original = getattr(reference_logprobs, name)

    def wrapper(*args):
        calls.append(name)
        return original(*args)

    monkeypatch.setattr(reference_logprobs, name, wrapper)
    return calls


def test_forced_backend_serves_forward_and_backward(monkeypatch):
    forward = counting(monkeypatch, "token_logprobs_forward")
    backward = counting(monkeypatch, "token_logprobs_backward")
    logits = torch.randn(3, 50, requires_grad=True)
    with fastalign.use_backend("reference"):
        out = fastalign.token_logprobs(logits, torch.tensor([1, 2, 3]))
    out.logps.sum().backward()  # outside the block: still the forward's backend
    assert forward == ["token_logprobs_forward"] and backward == ["token_logprobs_backward"]


def test_environment_variable_reaches_the_op(monkeypatch):
    forward = counting(monkeypatch, "token_logprobs_forward")
    monkeypatch.setenv("FASTALIGN_BACKEND", "reference")
    fastalign.token_logprobs(torch.randn(2, 9), torch.tensor([0, 8]))
    assert forward == ["token_logprobs_forward"]


def test_auto_picks_native_on_cpu(monkeypatch):
    if not fastalign.available_backends("cpu")["native"][0]:
        pytest.skip("native backend not built")
    forward = counting(monkeypatch, "token_logprobs_forward")
    fastalign.token_logprobs(torch.randn(2, 9), torch.tensor([0, 8]))
    assert forward == []


@pytest.mark.parametrize(
    "backend, compiler", [("native", "inductor"), ("native", "aot_eager"), ("reference", "aot_eager")]
)
def test_torch_compile_fullgraph(backend, compiler):
    if backend == "native" and not fastalign.available_backends("cpu")["native"][0]:
        pytest.skip("native backend not built")
    torch._dynamo.reset()

    def loss_fn(logits, labels, mask):
        out = fastalign.token_logprobs(logits[:, :-1], labels[:, 1:], temperature=0.8, mask=mask[:, 1:],
                                       outputs=("entropy", "is_top1"))
        return (out.logps.sum() + 0.1 * out.entropy.sum()) / mask.sum(), out.is_top1

    logits = torch.randn(2, 6, 101, requires_grad=True)
    labels = torch.randint(0, 101, (2, 6))
    mask = torch.rand(2, 6) > 0.2
    with fastalign.use_backend(backend):
        eager_loss, eager_top1 = loss_fn(logits, labels, mask)
        (eager_grad,) = torch.autograd.grad(eager_loss, logits)
        compiled = torch.compile(loss_fn, fullgraph=True, backend=compiler)
        loss, top1 = compiled(logits, labels, mask)
        (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(grad, eager_grad)
    assert torch.equal(top1, eager_top1)


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("op", sorted(fastalign.backend.OPS))
def test_every_backend_exposes_every_op(backend, op):
    """The backend contract (fastalign/backend.py): each backend serves each op under its name."""
    module = fastalign.backend.backend_module(backend, op)
    assert callable(getattr(module, op, None)), f"{module.__name__} lacks {op}"


def test_the_triton_backend_forwards_to_functions_that_exist():
    pytest.importorskip("triton")
    from fastalign import _triton

    for op in fastalign.backend.OPS:
        function = getattr(_triton, op)
        if function.__doc__.startswith("`fastalign.kernels."):
            module, name = function.__doc__.strip("`").rsplit(".", 1)
            assert callable(getattr(_triton.kernels(module.rsplit(".", 1)[1]), name))


def test_ops_are_registered_for_each_entry_of_the_table():
    for op in fastalign.backend.OPS:
        assert hasattr(torch.ops.fastalign, op), op


def test_the_kernels_package_imports_nothing_from_fastalign():
    import ast
    from pathlib import Path

    for path in (Path(__file__).resolve().parents[2] / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1 and not (node.module or "").startswith("fastalign"), f"{path.name}: {ast.unparse(node)}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("fastalign") for a in node.names), f"{path.name}: {ast.unparse(node)}"


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.lower().split("_"))


def test_kernel_ids_agree_with_the_cpp_enums():
    """kernels/contract.py defines the ids; csrc/ mirrors them; the Triton kernels import them."""
    import re
    from pathlib import Path

    from fastalign._triton import contract

    ids = contract()
    csrc = Path(__file__).resolve().parents[2] / "csrc" / "cpu"
    policy = (csrc / "policy.cpp").read_text()
    enum = {name: int(value) for name, value in re.findall(r"\bk(\w+) = (\d+)", policy)}
    for i, name in enumerate(ids.SURROGATES):
        assert enum[_camel(name)] == i == getattr(ids, f"SURROGATE_{name.upper()}"), name
    for i, name in enumerate(ids.KL_ESTIMATORS):
        assert enum[_camel(name)] == i == getattr(ids, f"KL_{name.upper()}"), name
    for i, name in enumerate(ids.OBJECTIVE_PARAMS):
        assert enum[_camel(name)] == i, name
    assert enum["NumParams"] == len(ids.OBJECTIVE_PARAMS)
    advantages = dict(re.findall(r"constexpr int64_t kScale(\w+) = (\d+);", (csrc / "advantages.cpp").read_text()))
    assert int(advantages["Group"]) == ids.SCALE_GROUP and int(advantages["Given"]) == ids.SCALE_GIVEN


def test_token_objective_passes_the_contract_ids():
    from fastalign._triton import contract
    from fastalign.token_objective import TokenObjective

    ids = contract()
    surrogate, kl, params = TokenObjective(surrogate="sapo", kl="low_var_kl", tau_neg=2.5,
                                           kl_bias_correction=True).kernel_args()
    assert (surrogate, kl) == (ids.SURROGATE_SAPO, ids.KL_LOW_VAR_KL)
    assert params[ids.OBJECTIVE_PARAMS.index("tau_neg")] == 2.5
    assert params[ids.OBJECTIVE_PARAMS.index("kl_bias_correction")] == 1.0
