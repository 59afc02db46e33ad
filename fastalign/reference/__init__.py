"""Reference PyTorch implementations: the ground truth every kernel is checked against."""

from .logprobs import token_logprobs, transform_logits

__all__ = ["token_logprobs", "transform_logits"]
