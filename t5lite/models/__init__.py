"""The model zoo: encoder-decoder and decoder-only Transformers, and named configs."""

from t5lite.models.decoder import Decoder
from t5lite.models.encoder_decoder import EncoderDecoder
from t5lite.models.params import (
    abstract_params,
    active_param_count,
    build,
    dummy_inputs,
    init_params,
    param_axes,
    param_count,
)
from t5lite.models.registry import get_config, named_configs

__all__ = [
    "Decoder",
    "EncoderDecoder",
    "abstract_params",
    "active_param_count",
    "build",
    "dummy_inputs",
    "init_params",
    "param_axes",
    "param_count",
    "get_config",
    "named_configs",
]
