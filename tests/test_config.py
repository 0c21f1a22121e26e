import pytest

from t5lite.config import ModelConfig
from t5lite.models import get_config


@pytest.mark.parametrize("changes, field, allowed", [
    ({"num_heads": 6, "num_kv_heads": 4}, "num_kv_heads", "[1, 2, 3, 6]"),
    ({"mlp_activation": "mish"}, "mlp_activation", "swiglu"),
    ({"d_model": -8}, "d_model", "positive integer"),
    ({"num_heads": 0}, "num_heads", "positive integer"),
    ({"d_ff": 2.5}, "d_ff", "positive integer"),
    ({"position_encoding": "xpos"}, "position_encoding", "alibi"),
    ({"norm": "batch"}, "norm", "rms, layer"),
    ({"architecture": "encoder"}, "architecture", "encoder_decoder, decoder"),
    ({"dtype": "int8"}, "dtype", "bfloat16"),
    ({"remat_policy": "sometimes"}, "remat_policy", "dots"),
    ({"dropout_rate": 1.0}, "dropout_rate", "[0, 1)"),
    ({"sliding_window": 0}, "sliding_window", "positive integer"),
    ({"attention_sinks": 2}, "attention_sinks", "sliding_window"),
    ({"position_encoding": "rope", "head_dim": 7}, "head_dim", "even"),
])
def test_bad_config_names_field_and_allowed_values(changes, field, allowed):
    with pytest.raises(ValueError) as error:
        ModelConfig(**changes)
    assert field in str(error.value) and allowed in str(error.value)


def test_json_round_trip_and_unknown_fields():
    config = get_config("llama/tiny").replace(sliding_window=16, attention_sinks=4)
    assert ModelConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="Unknown ModelConfig fields"):
        ModelConfig.from_json('{"d_model": 8, "flux_capacitor": 1}')
