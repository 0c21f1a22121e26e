"""Tiny random-initialised Hugging Face models, the references the interop tests compare with."""

import torch
import transformers


def t5(feed_forward_proj="relu", tied=True, cls=transformers.T5ForConditionalGeneration, **changes):
    """A T5 (T5's special ids: start 0, EOS 1). Untied (v1.1) models share their input embeddings
    as published ones do."""
    torch.manual_seed(0)
    settings = dict(
        vocab_size=99,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        dropout_rate=0.0,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=24,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    config = transformers.T5Config(
        **{**settings, **changes}, feed_forward_proj=feed_forward_proj, tie_word_embeddings=tied
    )
    config.tie_word_embeddings = tied  # transformers 5 ignores the constructor argument
    model = cls(config).eval()
    model.set_input_embeddings(model.shared)
    return model


def llama(tied=False, kv_heads=2, rope=None, **changes):
    """A Llama (BOS 1, EOS 2) with grouped-query attention."""
    torch.manual_seed(0)
    settings = dict(
        vocab_size=99,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=8,
        head_dim=8,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = transformers.LlamaConfig(
        **{**settings, **changes},
        num_key_value_heads=kv_heads,
        rope_parameters=rope or {"rope_type": "default", "rope_theta": 500.0},
        tie_word_embeddings=tied,
    )
    return transformers.LlamaForCausalLM(config).eval()
