"""Quantised models for inference: the uniform quantiser, post-training methods and model conversion."""

from t5lite.quantization.core import Scheme, dequantize, fit, pack_int4, quantize, unpack_int4
from t5lite.quantization.weights import quantize_weights

__all__ = ["Scheme", "dequantize", "fit", "pack_int4", "quantize", "quantize_weights", "unpack_int4"]
