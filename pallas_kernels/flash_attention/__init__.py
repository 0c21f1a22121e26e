"""Flash attention with in-kernel masks, T5 relative-position bias and ALiBi (TPU, GPU, interpret)."""

from pallas_kernels.flash_attention.api import flash_attention
from pallas_kernels.flash_attention.reference import attention_reference
from pallas_kernels.flash_attention.relpos import relative_position_bucket

__all__ = ["flash_attention", "attention_reference", "relative_position_bucket"]
