import pathlib
import re

import gin
import jax
import pytest

from t5lite.config import GIN_CONFIG_DIR, model_config_from_gin
from t5lite.models import abstract_params, get_config, named_configs, registry

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


def test_committed_model_gin_files_are_what_the_registry_writes():
    written = registry.gin_files()
    committed = {
        str(p.relative_to(GIN_CONFIG_DIR / "models")): p.read_text()
        for p in (GIN_CONFIG_DIR / "models").glob("*/*.gin")
    }
    assert sorted(committed) == sorted(written)
    for path, text in written.items():
        assert committed[path] == text, f"{path} differs from the registry: run registry.write_gin_files()"


@pytest.mark.parametrize("path", MODEL_GIN_FILES, ids=registry_name)
def test_parameter_count_in_the_header_is_the_models(path):
    """The header's count against the initialiser's shapes (abstractly: no memory for XXL)."""
    header = re.fullmatch(
        r"# (\S+): ([\d,.]+)M parameters(?:, ([\d,.]+)M active per token)?\.", path.read_text().splitlines()[0]
    )
    assert header and header[1] == registry_name(path), path.read_text().splitlines()[0]
    config = get_config(registry_name(path))
    leaves = jax.tree.leaves(abstract_params(config))
    assert float(header[2].replace(",", "")) == round(sum(leaf.size for leaf in leaves) / 1e6, 1)
    if config.moe.num_experts:  # a token passes through experts_per_token of each MoE layer's experts
        experts = sum(
            leaf.size
            for path_, leaf in jax.tree_util.tree_leaves_with_path(abstract_params(config))
            if any(getattr(key, "key", None) in ("wi", "wi_0", "wi_1", "wo") for key in path_)
            and any(getattr(key, "key", None) == "moe" for key in path_)
        )
        idle = experts * (1 - config.moe.experts_per_token / config.moe.num_experts)
        assert float(header[3].replace(",", "")) == round((sum(leaf.size for leaf in leaves) - idle) / 1e6, 1)


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
