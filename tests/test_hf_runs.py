"""Hugging Face models in and out as runnable runs, offline: a tiny HF T5 and a tiny HF Llama, each
with a SentencePiece tokenizer trained here -> `t5lite convert` -> `t5lite generate` (greedy tokens
equal HF generate's) -> LoRA fine-tuning from the converted run -> export -> transformers loads the
model and its tokenizer, and its logits are the fine-tuned run's."""

import json
import shutil

import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from hf_models import llama, t5

from t5lite import cli, decoding, inference
from t5lite.data import TokenizerJsonVocabulary

PROMPT = "the cat sat on"
# T5's special ids (pad 0, EOS 1, UNK 2) and Llama's (UNK 0, BOS 1, EOS 2).
SPECIAL_IDS = {
    "t5": dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1),
    "llama": dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1),
}
EXTRA_IDS = 10


def sentencepiece_model(directory, family):
    lines = [f"the {word} sat on the mat number {i}" for i in range(200) for word in ("cat", "dog", "bird")]
    (directory / "text.txt").write_text("\n".join(lines))
    prefix = directory / family
    spm.SentencePieceTrainer.train(
        input=str(directory / "text.txt"),
        model_prefix=str(prefix),
        vocab_size=300,
        byte_fallback=True,
        minloglevel=2,
        **SPECIAL_IDS[family],
    )
    return prefix.with_suffix(".model")


def hf_model(family):
    """The vocabulary of `sentencepiece_model` (T5's with EXTRA_IDS sentinels, padded); one decoder
    layer per encoder layer, as HF T5's generate() cache needs."""
    if family == "t5":
        return t5("gated-gelu", tied=False, vocab_size=320, num_decoder_layers=2)
    return llama(vocab_size=300, max_position_embeddings=256)


def save_pretrained(directory, family, model, sentencepiece):
    """Weights and tokenizer as a Hub model directory holds them: the SentencePiece file and the
    tokenizer.json transformers writes."""
    model.save_pretrained(directory)
    settings = {"tokenizer_class": "T5Tokenizer", "extra_ids": EXTRA_IDS} if family == "t5" else {}
    shutil.copy(sentencepiece, directory / ("spiece.model" if family == "t5" else "tokenizer.model"))
    (directory / "tokenizer_config.json").write_text(json.dumps(settings or {"tokenizer_class": "LlamaTokenizer"}))
    transformers.AutoTokenizer.from_pretrained(directory).save_pretrained(directory)


def hf_greedy(model, family, prompt_ids, n):
    """HF generate's new tokens, up to and including EOS."""
    with torch.no_grad():
        if family == "t5":
            out = model.generate(torch.tensor([prompt_ids + [1]]), max_new_tokens=n, do_sample=False)[0, 1:]
        else:
            out = model.generate(torch.tensor([[1, *prompt_ids]]), max_new_tokens=n, do_sample=False)
            out = out[0, len(prompt_ids) + 1 :]
    tokens = out.tolist()
    eos = model.config.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def logits(model, inputs, targets):
    """Of a decoder, for `targets`; of an encoder-decoder, for `targets` given `inputs`."""
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=torch.tensor(inputs), decoder_input_ids=torch.tensor(targets)).logits.numpy()
        return model(input_ids=torch.tensor(targets)).logits.numpy()


def t5lite_logits(run, inputs, targets):
    tokens = {"decoder_input_tokens": np.asarray(targets)}
    if run.model.config.is_encoder_decoder:
        tokens["encoder_input_tokens"] = np.asarray(inputs)
    return np.asarray(run.model.apply({"params": run.params}, **tokens, enable_dropout=False), np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_hugging_face_model_converts_generates_finetunes_and_exports(family, tmp_path, capsys):
    sentencepiece = sentencepiece_model(tmp_path, family)
    pieces = spm.SentencePieceProcessor(model_file=str(sentencepiece))
    original = hf_model(family)
    save_pretrained(tmp_path / "hf", family, original, sentencepiece)

    run_dir = tmp_path / "run"
    assert cli.main(["convert", str(tmp_path / "hf"), str(run_dir), "--dtype=float32"]) == 0
    run = inference.load_run(run_dir)
    assert (run.model.config.start_id, run.model.config.eos_id) == ((0, 1) if family == "t5" else (1, 2))
    assert np.isfinite(inference.validation_metrics(run, num_batches=1)["loss"])  # eval runs on its own task

    # Greedy decoding: the same tokens as HF generate, and the CLI prints their text.
    n = 10
    prompt_ids = pieces.encode(PROMPT)
    expected = hf_greedy(original, family, prompt_ids, n)
    if family == "t5":
        inputs = {"encoder_input_tokens": [prompt_ids + [1]]}
    else:
        inputs = {"prompt_tokens": [prompt_ids]}
    ours = decoding.generate(run.model, run.params, options=decoding.DecodingOptions(max_new_tokens=n), **inputs)
    np.testing.assert_array_equal(np.asarray(ours.tokens)[0, : len(expected)], expected)
    capsys.readouterr()
    assert cli.main(["generate", f"--model_dir={run_dir}", f"--prompt={PROMPT}", f"--max_new_tokens={n}"]) == 0
    assert run.vocabulary.decode([t for t in expected if t != run.model.config.eos_id]) in capsys.readouterr().out

    # LoRA fine-tuning from the converted run, on its own task (the corpus in the model's tokenizer).
    lengths = "{'inputs': 32, 'targets': 12}" if family == "t5" else "{'targets': 32}"
    finetuned = tmp_path / "finetuned"
    train = [
        "train",
        f"--gin_file={run_dir / 'config.gin'}",
        f"--model_dir={finetuned}",
        f"--gin.train.init_from='{run_dir}'",
        "--gin.AdapterConfig.lora_rank=4",
        f"--gin.train.task_feature_lengths={lengths}",
        "--gin.train.batch_size=8",
        "--gin.train.num_steps=3",
        "--gin.learning_rate_schedule.base_learning_rate=0.03",
    ]
    assert cli.main(train) == 0
    tuned = inference.load_run(finetuned)
    assert tuned.model.config.adapters.lora_rank == 4

    # Export: transformers loads it, offline, with the model's tokenizer, and computes the tuned run's logits.
    exported = tmp_path / "exported"
    assert cli.main(["convert", str(finetuned), str(exported)]) == 0
    reloaded = transformers.AutoModelForSeq2SeqLM if family == "t5" else transformers.AutoModelForCausalLM
    reloaded = reloaded.from_pretrained(exported, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported, local_files_only=True)
    assert tokenizer(PROMPT, add_special_tokens=False).input_ids == prompt_ids
    assert (tokenizer.eos_token_id, reloaded.config.eos_token_id) == (run.model.config.eos_id,) * 2
    inputs, targets = [prompt_ids + [1]], [[run.model.config.start_id, *prompt_ids]]
    np.testing.assert_allclose(logits(reloaded, inputs, targets), t5lite_logits(tuned, inputs, targets), atol=2e-4)
    assert np.abs(logits(reloaded, inputs, targets) - logits(original, inputs, targets)).max() > 1e-2  # LoRA in


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_tokenizer_json_is_a_seqio_vocabulary(family, tmp_path):
    """A model saved with tokenizer.json alone (what transformers 5 writes) tokenizes as transformers does;
    T5's sentinels are its extra ids."""
    sentencepiece = sentencepiece_model(tmp_path, family)
    save_pretrained(tmp_path / "hf", family, hf_model(family), sentencepiece)
    for name in ("spiece.model", "tokenizer.model"):
        (tmp_path / "hf" / name).unlink(missing_ok=True)
    vocabulary = TokenizerJsonVocabulary(tmp_path / "hf" / "tokenizer.json")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    text = "the dog sat on the mat 42 ünïcödé"
    ids = vocabulary.encode(text)
    assert ids == reference(text, add_special_tokens=False).input_ids
    expected = {"t5": (1, 2, EXTRA_IDS), "llama": (2, 0, 0)}[family]
    assert (vocabulary.eos_id, vocabulary.unk_id, vocabulary.extra_ids) == expected
    assert vocabulary.vocab_size == len(reference)
    if family == "t5":
        assert reference.convert_ids_to_tokens(vocabulary.vocab_size - 1) == "<extra_id_0>"
    decoded = reference.decode(ids, skip_special_tokens=True)  # T5's converted tokenizer maps ü to <unk>
    assert vocabulary.decode(ids) == decoded and (decoded == text) == (family == "llama")
    assert vocabulary.encode_tf(text).numpy().tolist() == ids
    assert vocabulary.decode_tf(np.asarray([ids, ids], np.int32)).numpy().tolist() == [decoded.encode()] * 2


def test_convert_refuses_a_model_without_tokenizer_and_writes_nothing(tmp_path, capsys):
    hf_model("llama").save_pretrained(tmp_path / "hf")
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "run")]) == 2
    assert "holds no tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
