"""fastalign: fused kernels for the losses of LLM post-training.

Every op is a torch.library op with autograd, served by Triton kernels for CUDA tensors, C++
kernels for CPU tensors and a reference PyTorch implementation (the ground truth) otherwise.
"""

from . import reference
from .backend import BACKENDS, available_backends, current_backend, use_backend
from .logprobs import token_logprobs
from .types import TokenLogprobs

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "TokenLogprobs",
    "available_backends",
    "current_backend",
    "reference",
    "token_logprobs",
    "use_backend",
]
