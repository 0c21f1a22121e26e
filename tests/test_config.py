import pathlib

import pytest

from t5lite.config import AdapterConfig, ModelConfig, MoeConfig, WeightQuantConfig, gin_bindings, model_config_from_gin
from t5lite.models import get_config


@pytest.mark.parametrize(
    "changes, field, allowed",
    [
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
    ],
)
def test_bad_config_names_field_and_allowed_values(changes, field, allowed):
    with pytest.raises(ValueError) as error:
        ModelConfig(**changes)
    assert field in str(error.value) and allowed in str(error.value)


def test_json_round_trip_and_unknown_fields():
    config = get_config("llama/tiny").replace(sliding_window=16, attention_sinks=4)
    assert ModelConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="Unknown ModelConfig fields"):
        ModelConfig.from_json('{"d_model": 8, "flux_capacitor": 1}')
    with pytest.raises(ValueError, match=r"Unknown ModelConfig fields \['moe.experts'\]"):
        ModelConfig.from_json('{"d_model": 8, "moe": {"experts": 4}}')


# A run directory's files as t5lite wrote them before ModelConfig had sub-configs (flat fields).
FLAT_RUN = pathlib.Path(__file__).parent / "fixtures" / "flat_config_run"
# What that run trained: switch/tiny on the corpus vocabulary, float32, dropout 0.1, LoRA targets set.
FLAT_RUN_CONFIG = get_config("switch/tiny").replace(
    vocab_size=4224, dtype="float32", dropout_rate=0.1, adapters=AdapterConfig(lora_targets=("query",))
)


def test_configs_of_the_flat_layout_migrate_on_read():
    assert ModelConfig.from_json((FLAT_RUN / "t5lite_config.json").read_text()) == FLAT_RUN_CONFIG
    assert model_config_from_gin([str(FLAT_RUN / "config.gin")]) == FLAT_RUN_CONFIG
    # Flat --gin. flags too, alongside the new names.
    flags = ["ModelConfig.num_experts = 2", "MoeConfig.router_jitter = 0.1", "ModelConfig.int8_weights = ('mlp',)"]
    config = model_config_from_gin(["models/switch/tiny.gin"], flags)
    assert (config.moe.num_experts, config.moe.router_jitter, config.weight_quant.families) == (2, 0.1, ("mlp",))


def test_sub_configs_bind_from_gin_by_name_or_reference(tmp_path):
    explicit = ["ModelConfig.moe = @MoeConfig()", "MoeConfig.num_experts = 4", "AdapterConfig.lora_rank = 2"]
    config = model_config_from_gin(["models/t5_1_1/tiny.gin"], explicit)
    assert config == model_config_from_gin(["models/t5_1_1/tiny.gin"], explicit[1:])
    assert config.moe == MoeConfig(num_experts=4) and config.adapters == AdapterConfig(lora_rank=2)
    # A flat binding in an included file (gin reads it, not t5lite) fails, naming the new name.
    (tmp_path / "old.gin").write_text("ModelConfig.num_experts = 4\n")
    (tmp_path / "top.gin").write_text(f"include '{tmp_path / 'old.gin'}'\n")
    with pytest.raises(ValueError, match="num_experts is now MoeConfig.num_experts"):
        model_config_from_gin([str(tmp_path / "top.gin")])


def test_gin_bindings_pin_every_field():
    config = FLAT_RUN_CONFIG.replace(weight_quant=WeightQuantConfig(families=("mlp",), bits=4, group_size=32))
    assert model_config_from_gin([], gin_bindings(config)) == config


def test_a_config_gin_that_would_run_outside_code_is_not_opened(tmp_path, monkeypatch, capsys):
    """Opening a shared run parses its config.gin: an import of another module (which runs it) is
    refused before gin sees it; with --trust_run the same file does run it (so the check is what stops it)."""
    from t5lite import cli

    (tmp_path / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    run.mkdir()
    saved = (FLAT_RUN / "config.gin").read_text()
    for payload, named in [
        ("import evil\n", "import evil"),
        ("include 'elsewhere.gin'\n", "include 'elsewhere.gin'"),
        ("train.seed = @os.system()\n", "@os.system"),
    ]:
        (run / "config.gin").write_text(payload + saved)
        assert cli.main(["eval", f"--model_dir={run}"]) == 2
        assert f"would run code from outside t5lite ({named})" in capsys.readouterr().err
        assert not (tmp_path / "ran").exists()
    (run / "config.gin").write_text("import evil\n" + saved)
    cli.main(["eval", f"--model_dir={run}", "--trust_run"])  # fails later: the run has no checkpoint
    assert (tmp_path / "ran").exists()
