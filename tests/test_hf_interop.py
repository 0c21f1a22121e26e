"""Logit parity with Hugging Face PyTorch models, weight round trips and `t5lite convert` refusals
(tests/test_hf_runs.py converts whole runs both ways)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_models import llama, t5

from t5lite import cli
from t5lite.config import AdapterConfig, WeightQuantConfig
from t5lite.interop import hf
from t5lite.layers.moe import moe_summary
from t5lite.models import get_config, param_count
from t5lite.models.hidden import hidden_states

HF_MODELS = {
    "t5_v1_0": functools.partial(t5, "relu", tied=True),
    "t5_v1_1": functools.partial(t5, "gated-gelu", tied=False),
    "mt5": functools.partial(t5, "gated-gelu", tied=False, cls=transformers.MT5ForConditionalGeneration),
    "llama_gqa_untied": functools.partial(llama, tied=False, kv_heads=2),
    "llama_mqa_tied_linear_rope": functools.partial(
        llama, tied=True, kv_heads=1, rope={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}
    ),
}


def ids(shape, seed):
    return np.random.RandomState(seed).randint(1, 99, shape)


def hf_logits(hf_model, x, y):
    with torch.no_grad():
        if hf_model.config.is_encoder_decoder:
            return hf_model(input_ids=torch.tensor(x), decoder_input_ids=torch.tensor(y)).logits.numpy()
        return hf_model(input_ids=torch.tensor(y)).logits.numpy()


def t5lite_logits(model, params, x, y):
    if model.config.is_encoder_decoder:
        return model.apply(
            {"params": params},
            encoder_input_tokens=jnp.asarray(x),
            decoder_input_tokens=jnp.asarray(y),
            enable_dropout=False,
        )
    return model.apply({"params": params}, decoder_input_tokens=jnp.asarray(y), enable_dropout=False)


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_logits_match_hugging_face(name):
    hf_model = HF_MODELS[name]()
    model, params = hf.from_torch(hf_model)
    forward = jax.jit(functools.partial(t5lite_logits, model))
    for batch, x_len, y_len in [(2, 7, 5), (1, 40, 33)]:  # 33-40 tokens reach the log-spaced relative buckets
        x, y = ids((batch, x_len), 1), ids((batch, y_len), 2)
        expected = hf_logits(hf_model, x, y)
        ours = np.asarray(forward(params, x, y))
        assert ours.shape == expected.shape and ours.dtype == np.float32
        assert np.abs(ours - expected).max() <= 1e-4, np.abs(ours - expected).max()


@pytest.mark.parametrize("name", ["t5_v1_1", "llama_gqa_untied"])
def test_unscanned_import_matches_too(name):
    hf_model = HF_MODELS[name]()
    model, params = hf.from_torch(hf_model, scan_layers=False)
    assert "layers_1" in params["decoder"]
    x, y = ids((2, 6), 3), ids((2, 4), 4)
    np.testing.assert_allclose(t5lite_logits(model, params, x, y), hf_logits(hf_model, x, y), atol=1e-4)


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("name", ["t5_v1_1", "llama_gqa_untied"])
def test_hidden_states_match_hugging_face(name, scan_layers):
    """Each layer's sown output is Hugging Face's hidden state after that layer (HF's last one is
    after the final norm, so it is left out)."""
    hf_model = HF_MODELS[name]()
    model, params = hf.from_torch(hf_model, scan_layers=scan_layers)
    x, y = ids((2, 6), 5), ids((2, 4), 6)
    features = (
        dict(encoder_input_tokens=x, decoder_input_tokens=y)
        if model.config.is_encoder_decoder
        else dict(decoder_input_tokens=y)
    )
    _, state = model.apply({"params": params}, **features, enable_dropout=False, mutable=["intermediates"])
    ours = hidden_states(state["intermediates"], model.config)
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            out = hf_model(input_ids=torch.tensor(x), decoder_input_ids=torch.tensor(y), output_hidden_states=True)
            theirs = {"encoder": out.encoder_hidden_states, "decoder": out.decoder_hidden_states}
        else:
            theirs = {"decoder": hf_model(input_ids=torch.tensor(y), output_hidden_states=True).hidden_states}
    assert sorted(ours) == sorted(theirs)
    for stack, layers in ours.items():
        assert len(layers) == len(theirs[stack]) - 1
        for i in range(len(layers) - 1):
            np.testing.assert_allclose(layers[i], theirs[stack][i + 1].numpy(), atol=1e-4, err_msg=f"{stack} {i}")


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_export_then_import_round_trips_exactly(name):
    hf_model = HF_MODELS[name]()
    model, params = hf.from_torch(hf_model)
    exported = hf.to_torch(model, params)
    original, again = hf_model.state_dict(), exported.state_dict()
    assert set(again) == set(original)
    for key, value in original.items():
        assert torch.equal(again[key], value), key
    _, reimported = hf.from_torch(exported)
    jax.tree.map(np.testing.assert_array_equal, reimported, params)
    assert exported.config.tie_word_embeddings == hf_model.config.tie_word_embeddings


@pytest.mark.parametrize(
    "name",
    ["t5_1_1/small", "t5_1_1/base", "t5_1_1/large", "t5_1_1/xl", "t5_1_1/xxl", "mt5/small", "llama/1b", "llama/7b"],
)
def test_param_count_matches_hugging_face(name):
    config = get_config(name)
    hf_config = hf.hf_config_from(config)
    cls = transformers.T5ForConditionalGeneration if config.is_encoder_decoder else transformers.LlamaForCausalLM
    with torch.device("meta"):
        hf_model = cls(hf_config)
    if config.is_encoder_decoder:  # one input table, as in the published checkpoints
        hf_model.set_input_embeddings(hf_model.shared)
    assert param_count(config) == sum(p.numel() for p in hf_model.parameters())


def test_published_sizes():
    assert round(param_count(get_config("t5_1_1/small")) / 1e6) == 77
    assert round(param_count(get_config("t5_1_1/base")) / 1e6) == 248
    assert round(param_count(get_config("t5_1_1/xxl")) / 1e9, 1) == 11.1
    assert round(param_count(get_config("llama/7b")) / 1e9, 2) == 6.74


def test_untied_input_embeddings_are_refused_with_the_fix():
    hf_model = t5("gated-gelu", tied=False)
    hf_model.encoder.embed_tokens = torch.nn.Embedding(99, 32)  # what transformers 5 builds for untied T5
    with pytest.raises(ValueError, match="set_input_embeddings"):
        hf.from_torch(hf_model)


def test_unsupported_architectures_are_refused():
    hf_model = llama()
    hf_model.config.attention_bias = True
    with pytest.raises(ValueError, match="attention_bias"):
        hf.from_torch(hf_model)
    with pytest.raises(ValueError, match="position_encoding='alibi'"):
        hf.hf_config_from(get_config("llama/tiny").replace(position_encoding="alibi"))


def test_convert_refuses_bad_paths_and_touches_nothing(tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("precious")
    assert cli.main(["convert", str(tmp_path / "missing"), str(occupied)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["convert", str(tmp_path / "missing"), str(tmp_path / "new")]) == 2
    assert "neither a t5lite run or checkpoint" in capsys.readouterr().err
    assert (occupied / "keep.txt").read_text() == "precious" and not (tmp_path / "new").exists()


def switch(sparse_step=2, expert_capacity=64, **changes):
    """A random-initialised HF Switch Transformer with 4 experts in every (step 1) or every other layer."""
    torch.manual_seed(0)
    config = transformers.SwitchTransformersConfig(
        vocab_size=99,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=4,
        num_decoder_layers=4,
        num_heads=4,
        num_experts=4,
        expert_capacity=expert_capacity,
        num_sparse_encoder_layers=4 // sparse_step,
        num_sparse_decoder_layers=4 // sparse_step,
        dropout_rate=0.0,
        router_jitter_noise=0.0,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=24,
        **changes,
    )
    model = transformers.SwitchTransformersForConditionalGeneration(config).eval()
    model.set_input_embeddings(model.shared)
    return model


@pytest.mark.parametrize("sparse_step", [1, 2])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_switch_transformers_logits_match_hugging_face(sparse_step, scan_layers):
    hf_model = switch(sparse_step)
    model, params = hf.from_torch(hf_model, scan_layers=scan_layers)
    assert model.config.moe.num_experts == 4 and model.config.moe.encoder_every == sparse_step
    forward = jax.jit(lambda params, x, y: model.apply({"params": params}, x, y, enable_dropout=False, mutable=["moe"]))
    for batch, x_len, y_len in [(2, 7, 5), (1, 40, 33)]:
        x, y = ids((batch, x_len), 1), ids((batch, y_len), 2)
        logits, sown = forward(params, jnp.asarray(x), jnp.asarray(y))
        error = np.abs(np.asarray(logits) - hf_logits(hf_model, x, y)).max()
        assert error <= 1e-4, error
        usage = moe_summary(sown["moe"])
        assert float(usage["dropped_fraction"]) == 0.0
        assert np.count_nonzero(np.asarray(usage["expert_fraction"])) > 1  # the routing really splits tokens
    exported = hf.state_dict_from_params(params, model.config)
    for key, value in exported.items():
        np.testing.assert_array_equal(value, hf_model.state_dict()[key].numpy(), err_msg=key)
    assert param_count(model.config) == sum(p.numel() for p in hf_model.parameters())


def test_switch_transformers_drop_the_tokens_hugging_face_drops():
    """A fixed capacity of 2 tokens per expert and sequence: both drop the same tokens (zero MLP output)."""
    hf_model = switch(sparse_step=1, expert_capacity=2)
    model, params = hf.from_torch(hf_model)
    x, y = ids((2, 24), 7), ids((2, 17), 8)
    logits, sown = model.apply(
        {"params": params}, jnp.asarray(x), jnp.asarray(y), enable_dropout=False, mutable=["moe"]
    )
    assert float(moe_summary(sown["moe"])["dropped_fraction"]) > 0.3
    np.testing.assert_allclose(logits, hf_logits(hf_model, x, y), atol=1e-4)


def test_switch_transformers_load_from_a_saved_directory(tmp_path):
    hf_model = switch()
    hf_model.save_pretrained(tmp_path / "hf")
    model, params = hf.load_pretrained(tmp_path / "hf")
    x, y = ids((2, 6), 5), ids((2, 5), 6)
    np.testing.assert_allclose(t5lite_logits(model, params, x, y), hf_logits(hf_model, x, y), atol=1e-4)


def test_unsupported_switch_models_are_refused():
    with pytest.raises(ValueError, match="sparse step 1 or 2"):
        hf.config_from_hf(switch(sparse_step=4).config)
    with pytest.raises(ValueError, match="router_bias=True"):
        hf.config_from_hf(switch(router_bias=True).config)
    with pytest.raises(ValueError, match="Exporting mixture-of-experts models"):
        hf.hf_config_from(get_config("switch/tiny"))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"adapters": AdapterConfig(bitfit=True)}, "no place for adapters"),
        ({"adapters": AdapterConfig(lora_rank=4)}, "merge LoRA first"),
        ({"weight_quant": WeightQuantConfig(families=("mlp",))}, "Export the float run"),
    ],
)
def test_export_refuses_what_hugging_face_cannot_hold(changes, message):
    with pytest.raises(ValueError, match=message):
        hf.hf_config_from(get_config("t5_1_1/tiny").replace(**changes))
