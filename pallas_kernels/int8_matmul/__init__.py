"""int8 x int8 -> int32 matmul with per-tensor / per-channel / per-group scales and zero points."""

from pallas_kernels.int8_matmul.api import int8_matmul
from pallas_kernels.int8_matmul.dense import int8_dense, quantize_weight, weight_only_dense
from pallas_kernels.int8_matmul.quant import dequantize, quantize
from pallas_kernels.int8_matmul.reference import int8_matmul_reference

__all__ = [
    "int8_matmul",
    "int8_matmul_reference",
    "int8_dense",
    "weight_only_dense",
    "quantize_weight",
    "quantize",
    "dequantize",
]
