import pathlib

import gin
import pytest

from t5lite.config import GIN_CONFIG_DIR, model_config_from_gin
from t5lite.models import get_config, named_configs

MODEL_GIN_FILES = sorted(p for p in (GIN_CONFIG_DIR / "models").glob("*/*.gin") if p.stem != "architecture")
RUN_GIN_FILES = sorted(p.name for p in (GIN_CONFIG_DIR / "runs").glob("*.gin") if p.stem != "defaults")


def registry_name(path: pathlib.Path) -> str:
    return f"{path.parent.name}/{path.stem}"


def test_every_named_config_has_a_gin_file_and_back():
    assert sorted(map(registry_name, MODEL_GIN_FILES)) == sorted(named_configs())


@pytest.mark.parametrize("path", MODEL_GIN_FILES, ids=registry_name)
def test_gin_file_binds_the_registry_config(path):
    try:
        assert model_config_from_gin([str(path)]) == get_config(registry_name(path))
    finally:
        gin.clear_config()


@pytest.mark.parametrize("name", RUN_GIN_FILES)
def test_run_gin_files_parse_and_build_their_model(name):
    try:
        config = model_config_from_gin([f"runs/{name}"])
    finally:
        gin.clear_config()
    assert config.vocab_size > 0


def test_gin_bindings_override_the_file():
    try:
        config = model_config_from_gin(["models/t5_1_1/small.gin"], ["ModelConfig.dropout_rate = 0.1"])
    finally:
        gin.clear_config()
    assert config == get_config("t5_1_1/small").replace(dropout_rate=0.1)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="t5_1_1/xxl"):
        get_config("t5_1_1/gigantic")
