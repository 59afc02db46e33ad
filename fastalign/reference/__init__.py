"""The reference backend and the oracles, in plain PyTorch.

Each module here is the reference backend of its ops (`fastalign/backend.py` lists them: every op
under its own name, any device) and the ground truth the C++ and Triton kernels are checked
against; `dpo.py` and `rrhf.py` are unfused oracles of the DPO family and of RRHF. The math the
losses run on every call (the policy objective, the trainers' aggregation, masked reductions)
lives in `fastalign.policy_objective`, `fastalign.aggregation` and `fastalign.masked`.
"""

from .logprobs import token_logprobs, transform_logits

__all__ = ["token_logprobs", "transform_logits"]
