"""Log-likelihood scoring (rank classification) against Hugging Face PyTorch models and a direct
forward pass, and the built-in multiple-choice task."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import torch
from hf_models import llama, t5

from t5lite import scoring
from t5lite.data import multiple_choice
from t5lite.interop import hf

# Inputs and options of several lengths, ids in [2, 99) (0 is padding; T5's EOS 1 and Llama's BOS 1
# are left out so that no row looks special).
RNG = np.random.RandomState(0)
INPUTS = [RNG.randint(2, 99, n).tolist() for n in (5, 11, 3)]
OPTIONS = [[RNG.randint(2, 99, n).tolist() for n in lengths] for lengths in ((1, 4, 2), (6,), (3, 3, 9, 2))]


@functools.cache
def converted(name):
    hf_model = t5("gated-gelu", tied=False) if name == "t5_v1_1" else llama()
    return (hf_model, *hf.from_torch(hf_model))


def torch_log_likelihood(hf_model, x, option):
    """log p(option | x): T5 scores `labels` (decoder inputs are the labels shifted after its start
    token); Llama reads [BOS] + x + option and the option's tokens are predicted one position early."""
    with torch.no_grad():
        if hf_model.config.is_encoder_decoder:
            logits = hf_model(input_ids=torch.tensor([x]), labels=torch.tensor([option])).logits[0]
            predicted = logits
        else:
            row = [hf_model.config.bos_token_id, *x, *option]
            predicted = hf_model(input_ids=torch.tensor([row])).logits[0, len(x) : len(x) + len(option)]
        log_probs = torch.log_softmax(predicted.double(), dim=-1)
        return float(log_probs[torch.arange(len(option)), torch.tensor(option)].sum())


@pytest.mark.parametrize("name", ["t5_v1_1", "llama"])
def test_scores_match_hugging_face(name):
    hf_model, model, params = converted(name)
    scores = scoring.option_log_likelihoods(model, params, INPUTS, OPTIONS, batch_size=4)
    for x, options, score in zip(INPUTS, OPTIONS, scores):
        expected = np.array([torch_log_likelihood(hf_model, x, o) for o in options])
        np.testing.assert_allclose(score.sum, expected, rtol=0, atol=1e-4)
        np.testing.assert_array_equal(score.length, [len(o) for o in options])
        np.testing.assert_allclose(score.mean, score.sum / score.length, rtol=1e-6)


@pytest.mark.parametrize("name", ["t5_v1_1", "llama"])
def test_questions_scored_together_equal_each_alone(name):
    """Other rows, padding and the batch's shape leave a row's score as it is."""
    _, model, params = converted(name)
    together = scoring.option_log_likelihoods(model, params, INPUTS, OPTIONS, batch_size=3)
    for x, options, score in zip(INPUTS, OPTIONS, together):
        alone = scoring.option_log_likelihoods(model, params, [x], [options], batch_size=8)[0]
        np.testing.assert_allclose(score.sum, alone.sum, rtol=1e-6)  # float32 rounding; a leak is far larger


def test_prefix_lm_context_attends_bidirectionally():
    """A prefix LM's score is the direct forward pass's with decoder_causal_attention over [start] +
    context (seqio's region), and it differs from the causal score."""
    _, model, params = converted("llama")
    x, option = INPUTS[1], OPTIONS[1][0]
    score = functools.partial(scoring.option_log_likelihoods, model, params, [x], [[option]], batch_size=4)
    prefix, causal = score(prefix_lm=True)[0].sum[0], score()[0].sum[0]
    row = [model.config.start_id, *x, *option]
    logits = model.apply(
        {"params": params},
        decoder_input_tokens=jnp.array([row[:-1]]),
        decoder_causal_attention=jnp.array([[1] * (len(x) + 1) + [0] * (len(option) - 1)]),
        enable_dropout=False,
    )[0]
    log_probs = np.asarray(jax.nn.log_softmax(logits))[len(x) :]
    expected = log_probs[np.arange(len(option)), option].sum()
    assert prefix == pytest.approx(expected, abs=1e-4)
    assert abs(prefix - causal) > 1e-3


def test_rank_classify_and_metrics():
    scores = [
        scoring.OptionScores(np.array([-3.0, -1.0, -4.0]), np.array([-1.0, -0.5, -0.25]), np.array([3, 2, 16])),
        scoring.OptionScores(np.array([-2.0, -6.0]), np.array([-2.0, -0.5]), np.array([1, 12])),
    ]
    np.testing.assert_array_equal(scoring.rank_classify(scores, "sum"), [1, 0])
    np.testing.assert_array_equal(scoring.rank_classify(scores, "mean"), [2, 1])
    assert scoring.rank_metrics(scores, [1, 1]) == {"rank_accuracy": 50.0, "rank_accuracy_norm": 50.0}
    with pytest.raises(ValueError, match="by='max'"):
        scoring.rank_classify(scores, "max")
    with pytest.raises(ValueError, match="2 labels for 1 questions"):
        scoring.rank_metrics(scores[:1], [0, 1])
    with pytest.raises(ValueError, match="not the index"):
        scoring.rank_metrics(scores, [0, 2])


def test_scores_favouring_the_label_rank_every_question_right():
    examples = multiple_choice.multiple_choice_examples("validation", 50)
    scores = [
        scoring.OptionScores(sums, sums / 3, np.full(len(sums), 3))
        for e in examples
        for sums in [np.where(np.arange(len(e.choices)) == e.label, -1.0, -5.0)]
    ]
    assert scoring.rank_metrics(scores, [e.label for e in examples]) == {
        "rank_accuracy": 100.0,
        "rank_accuracy_norm": 100.0,
    }


def test_evaluate_choices_ranks_tokenized_text():
    """The text path tokenizes, appends EOS and ranks; a model that saw nothing is no oracle, so
    the result is checked against scoring the same tokens directly."""
    _, model, params = converted("llama")
    encode = lambda text: [2 + ord(c) % 97 for c in text]  # a toy byte-level vocabulary within 99 ids
    examples = multiple_choice.multiple_choice_examples("validation", 4)
    metrics = scoring.evaluate_choices(model, params, examples, encode, prefix_lm=True)
    eos = model.config.eos_id
    scores = scoring.option_log_likelihoods(
        model,
        params,
        [encode(e.context) + [eos] for e in examples],
        [[encode(c) + [eos] for c in e.choices] for e in examples],
        prefix_lm=True,
    )
    assert metrics == scoring.rank_metrics(scores, [e.label for e in examples])


@pytest.mark.parametrize(
    "inputs, options, kwargs, message",
    [
        ([[5]], [[[5]], [[6]]], {}, "1 inputs and 2 option lists"),
        ([], [], {}, "no questions"),
        ([[5]], [[]], {}, "Question 0 has no options"),
        ([[5], [7]], [[[5]], [[6], []]], {}, "Option 1 of question 1 has no tokens"),
        ([[5]], [[[5, 99]]], {}, r"outside \[1, vocab_size=99\)"),
        ([[5, 0]], [[[5]]], {}, "0 is padding"),
        ([[-3]], [[[5]]], {}, "The input of question 0 holds ids outside"),
        ([[5]], [[[2.5]]], {}, "integer token ids"),
        ([[5]], [[[5]]], {"batch_size": 0}, "batch_size=0"),
    ],
)
def test_bad_questions_are_refused(inputs, options, kwargs, message):
    _, model, params = converted("llama")
    with pytest.raises(ValueError, match=message):
        scoring.option_log_likelihoods(model, params, inputs, options, **kwargs)


def test_encoder_decoder_refusals():
    _, model, params = converted("t5_v1_1")
    with pytest.raises(ValueError, match="needs at least one input token"):
        scoring.option_log_likelihoods(model, params, [[]], [[[5]]])
    with pytest.raises(ValueError, match="prefix_lm=True is for decoder-only"):
        scoring.option_log_likelihoods(model, params, [[5]], [[[5]]], prefix_lm=True)


def test_multiple_choice_examples_are_deterministic_and_well_formed():
    examples = multiple_choice.multiple_choice_examples("validation")
    multiple_choice._records.cache_clear()
    assert multiple_choice.multiple_choice_examples("validation") == examples
    paragraphs = multiple_choice._paragraphs("validation")
    assert len(examples) == len(paragraphs) > 100
    for example, paragraph in zip(examples, paragraphs):
        assert len(example.choices) == multiple_choice.NUM_CHOICES == len(set(example.choices))
        # The labelled choice is the corpus's own continuation of the context.
        assert paragraph.startswith(f"{example.context} {example.choices[example.label]}")
    assert len({e.label for e in examples}) == multiple_choice.NUM_CHOICES  # the answer's position varies
    assert not set(paragraphs) & set(multiple_choice._paragraphs("train"))
    with pytest.raises(ValueError, match="Unknown split 'test'"):
        multiple_choice.multiple_choice_examples("test")


def test_multiple_choice_task_keeps_choices_and_label():
    name = multiple_choice.register_multiple_choice_task("test_corpus_choice_bytes", vocabulary="bytes")
    task = seqio.get_mixture_or_task(name)
    dataset = task.get_dataset({"inputs": 256, "targets": 256}, split="validation", shuffle=False)
    first = next(dataset.as_numpy_iterator())
    example = multiple_choice.multiple_choice_examples("validation", 1)[0]
    vocab = task.output_features["inputs"].vocabulary
    assert vocab.decode(first["inputs"].tolist()) == example.context
    assert vocab.decode(first["targets"].tolist()) == example.choices[example.label]
    assert [c.decode() for c in first["choices"]] == list(example.choices)
    assert first["label"] == example.label


@pytest.mark.parametrize("prefix_lm", [True, False])
def test_decoder_rows_are_what_seqio_trains_on(prefix_lm):
    """A decoder-only row holds the features seqio's prefix-LM converter makes of {"inputs": context,
    "targets": option} (the causal one drops decoder_causal_attention)."""
    import tensorflow as tf

    _, model, _ = converted("llama")
    x, option = INPUTS[0], OPTIONS[0][1]
    rows = scoring._decoder_rows(model.config.replace(start_id=0), [(x, option)], prefix_lm)
    length = rows["decoder_target_tokens"].shape[1]
    dataset = tf.data.Dataset.from_tensors({"inputs": tf.constant(x), "targets": tf.constant(option)})
    converter = seqio.PrefixLMFeatureConverter(pack=False)
    (expected,) = converter(dataset, {"inputs": length - len(option), "targets": len(option)}).as_numpy_iterator()
    assert set(rows) == set(expected) - (set() if prefix_lm else {"decoder_causal_attention"})
    for name, value in rows.items():
        np.testing.assert_array_equal(value[0], expected[name], err_msg=name)
