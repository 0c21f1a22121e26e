"""Pallas kernels for TPU and GPU (interpretable on CPU): flash attention and int8 matmul.

Independent of t5lite: plain JAX arrays in, plain JAX arrays out.
"""

from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.int8_matmul import int8_matmul

__all__ = ["flash_attention", "int8_matmul"]
