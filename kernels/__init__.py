"""Triton GPU kernels, installed as ``fastalign.kernels``; imports nothing from ``fastalign``."""
