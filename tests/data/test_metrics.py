"""The seqio metrics against T5's own (`t5.evaluation.metrics`) and the libraries they wrap."""

import re

import gin
import numpy as np
import pytest
import sacrebleu
import seqio
import sklearn.metrics
import t5.evaluation.metrics as t5_metrics
from rouge_score import rouge_scorer

from t5lite import data
from t5lite.data import metrics

# Unicode punctuation and symbols: sacrebleu's "intl" tokenizer (T5's) splits them, "13a" does not.
BLEU_PREDICTIONS = [
    "The price rose to €5—a record for the company.",
    "She said «hello» to everyone in the room.",
    "It rained all day, so we stayed home and read.",
    "Scores improve when models are trained longer.",
]
BLEU_TARGETS = [
    "The price climbed to €5—a record for the firm.",
    "She said «hello» to all in the room.",
    "It rained the whole day, so we stayed at home.",
    "Models trained for longer get better scores.",
]
BLEU_SECOND_REFERENCES = [
    "Prices rose to €5, a record for the company.",
    "She greeted everyone in the room with «hello».",
    "Because it rained all day we stayed home reading.",
    "Training models longer improves their scores.",
]

ROUGE_TARGETS = [
    "The cat sat on the mat . It was happy .",
    "A quick brown fox jumps over the lazy dog",
    "Summaries are short . They say what matters .",
    "nothing in common here",
    "one two three four",
]
ROUGE_PREDICTIONS = [
    "the cat was on the mat . it was glad .",
    "The quick brown fox jumped over a dog",
    "summaries say what matters . they are short .",
    "completely different words",
    "one two three",
]
ROUGE_KEYS = ("rouge1", "rouge2", "rougeLsum")

SQUAD_TARGETS = [
    ["Denver Broncos", "The Denver Broncos"],
    ["Santa Clara, California", "Levi's Stadium"],
    ["the 50th Super Bowl", "Super Bowl 50"],
    ["gold"],
    ["1,000 yards"],
]
SQUAD_PREDICTIONS = ["the broncos", "Levi's Stadium in Santa Clara", "Super Bowl 50!", "golden", "1000 yards"]

LABELS_TARGETS = ["entailment", "neutral", "contradiction", "neutral", "entailment", "entailment", "contradiction"]
LABELS_PREDICTIONS = ["entailment", "entailment", "contradiction", "neutral", "neutral", "entailment", "maybe"]


def test_bleu_matches_t5_and_sacrebleu():
    ours = metrics.bleu(BLEU_TARGETS, BLEU_PREDICTIONS)["bleu"]
    assert ours == pytest.approx(t5_metrics.bleu(BLEU_TARGETS, BLEU_PREDICTIONS)["bleu"], abs=1e-9)
    assert ours == pytest.approx(sacrebleu.corpus_bleu(BLEU_PREDICTIONS, [BLEU_TARGETS], tokenize="intl").score)
    assert 10 < ours < 60
    assert abs(ours - sacrebleu.corpus_bleu(BLEU_PREDICTIONS, [BLEU_TARGETS]).score) > 1  # "13a" differs here


def test_bleu_takes_each_examples_references():
    per_example = [list(refs) for refs in zip(BLEU_TARGETS, BLEU_SECOND_REFERENCES)]
    streams = [BLEU_TARGETS, BLEU_SECOND_REFERENCES]
    ours = metrics.bleu(per_example, BLEU_PREDICTIONS)["bleu"]
    assert ours == pytest.approx(sacrebleu.corpus_bleu(BLEU_PREDICTIONS, streams, tokenize="intl").score)
    assert ours == pytest.approx(t5_metrics.bleu(streams, BLEU_PREDICTIONS)["bleu"])  # T5 takes streams
    assert ours > metrics.bleu(BLEU_TARGETS, BLEU_PREDICTIONS)["bleu"] + 1

    uneven = [BLEU_TARGETS[0], [BLEU_TARGETS[1], BLEU_SECOND_REFERENCES[1]], BLEU_TARGETS[2], BLEU_TARGETS[3]]
    padded = [BLEU_TARGETS, [None, BLEU_SECOND_REFERENCES[1], None, None]]
    expected = sacrebleu.corpus_bleu(BLEU_PREDICTIONS, padded, tokenize="intl").score
    assert metrics.bleu(uneven, BLEU_PREDICTIONS)["bleu"] == pytest.approx(expected)


def test_bleu_by_hand():
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == {"bleu": pytest.approx(100.0)}
    assert metrics.bleu(["the cat sat on the mat"], ["dogs run fast in parks"]) == {"bleu": 0.0}


def test_rouge_is_the_mean_of_rouge_score_f_measures():
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS))
    lines = [(t.replace(" . ", " .\n"), p.replace(" . ", " .\n")) for t, p in zip(ROUGE_TARGETS, ROUGE_PREDICTIONS)]
    scores = [scorer.score(t, p) for t, p in lines]
    expected = {key: 100 * np.mean([s[key].fmeasure for s in scores]) for key in ROUGE_KEYS}
    ours = metrics.rouge(ROUGE_TARGETS, ROUGE_PREDICTIONS)
    assert ours == pytest.approx(expected, abs=1e-9)
    # On one line ROUGE-Lsum is ROUGE-L, lower here, where the prediction reorders the sentences.
    unsplit = 100 * scorer.score(ROUGE_TARGETS[2], ROUGE_PREDICTIONS[2])["rougeLsum"].fmeasure
    assert metrics.rouge(ROUGE_TARGETS[2:3], ROUGE_PREDICTIONS[2:3])["rougeLsum"] > unsplit + 10


def test_rouge_matches_t5():
    # With two examples the median of T5's bootstrap means is their mean (the middle of three values
    # with probability 1/2), so the two agree exactly; with more, T5's value moves with its RNG.
    np.random.seed(0)
    two = t5_metrics.rouge(ROUGE_TARGETS[:2], ROUGE_PREDICTIONS[:2])
    assert metrics.rouge(ROUGE_TARGETS[:2], ROUGE_PREDICTIONS[:2]) == pytest.approx(two, abs=1e-6)
    np.random.seed(0)  # numpy's legacy RNG stream is stable, so T5's value here is fixed
    five = t5_metrics.rouge(ROUGE_TARGETS, ROUGE_PREDICTIONS)
    assert metrics.rouge(ROUGE_TARGETS, ROUGE_PREDICTIONS) == pytest.approx(five, abs=2.5)  # rougeLsum: 1.9 off


def test_rouge_by_hand():
    # rouge1: precision 2/2, recall 2/3 -> F 0.8; rouge2: 1/1 and 1/2 -> 2/3.
    assert metrics.rouge(["a b c"], ["a b"]) == pytest.approx({"rouge1": 80.0, "rouge2": 200 / 3, "rougeLsum": 80.0})


def test_squad_matches_t5():
    ours = metrics.squad(SQUAD_TARGETS, SQUAD_PREDICTIONS)
    assert ours == pytest.approx(t5_metrics.squad(SQUAD_TARGETS, SQUAD_PREDICTIONS), abs=1e-9)
    assert 0 < ours["em"] < ours["f1"] < 100


def test_squad_by_hand():
    assert metrics.squad([["The Cat!"]], ["cat"]) == {"em": 100.0, "f1": 100.0}
    assert metrics.squad(["The Cat!"], ["cat"]) == {"em": 100.0, "f1": 100.0}  # one answer as a string
    # "big cat" vs "cat": precision 1, recall 1/2 -> F1 2/3; the second answer matches exactly.
    assert metrics.squad([["the big cat"]], ["a cat"]) == pytest.approx({"em": 0.0, "f1": 200 / 3})
    assert metrics.squad([["the big cat", "an old cat"]], ["Old cat."]) == {"em": 100.0, "f1": 100.0}


def test_classification_matches_sklearn_and_t5():
    ours = metrics.classification(LABELS_TARGETS, LABELS_PREDICTIONS)
    classes = sorted(set(LABELS_TARGETS))
    f1 = sklearn.metrics.f1_score(LABELS_TARGETS, LABELS_PREDICTIONS, labels=classes, average="macro")
    recall = sklearn.metrics.recall_score(LABELS_TARGETS, LABELS_PREDICTIONS, labels=classes, average=None)
    assert ours == pytest.approx(
        {
            "accuracy": 100 * sklearn.metrics.accuracy_score(LABELS_TARGETS, LABELS_PREDICTIONS),
            "macro_f1": 100 * f1,
            **{f"accuracy/{c}": 100 * r for c, r in zip(classes, recall)},
        },
        abs=1e-9,
    )
    # T5 classifies into class ids, an unknown label post-processed to -1.
    ids = {c: i for i, c in enumerate(classes)}
    targets, predictions = [ids[t] for t in LABELS_TARGETS], [ids.get(p, -1) for p in LABELS_PREDICTIONS]
    assert ours["macro_f1"] == pytest.approx(t5_metrics.mean_multiclass_f1(3)(targets, predictions)["mean_3class_f1"])
    assert ours["accuracy"] == pytest.approx(t5_metrics.accuracy(targets, predictions)["accuracy"])


def test_classification_by_hand():
    # a: recall 1/2, precision 1/2 -> F1 1/2; b: never right -> 0. "x" is no class.
    assert metrics.classification(["a", "b", "a"], ["a", "a", "x"]) == pytest.approx(
        {"accuracy": 100 / 3, "macro_f1": 25.0, "accuracy/a": 50.0, "accuracy/b": 0.0}
    )


METRICS = [metrics.exact_match, metrics.bleu, metrics.rouge, metrics.squad, metrics.classification]


@pytest.mark.parametrize("metric", METRICS, ids=lambda m: m.__name__)
@pytest.mark.parametrize(
    "targets, predictions, message",
    [
        (["a", "b", "c", "d"], ["a", "b", "c"], "3 predictions for 4 targets"),
        ([], [], "no predictions to score"),
        (["a", "b"], ["a", b"b"], "prediction 1 is bytes b'b', not a string"),
        (["a", None], ["a", "b"], "target 1 is NoneType None, not a string"),
        ([[], "b"], ["a", "b"], "target 0 is list [], not a string"),
    ],
)
def test_bad_input_is_named(metric, targets, predictions, message):
    with pytest.raises(ValueError, match=f"^{metric.__name__}: {re.escape(message)}"):
        metric(targets, predictions)


def test_only_reference_metrics_take_lists_of_references():
    with pytest.raises(ValueError, match=r"rouge: target 0 is list \['a'\], not a string\."):
        metrics.rouge([["a"]], ["a"])
    with pytest.raises(ValueError, match="bleu: target 0 is list .*, not a string or a non-empty list of strings"):
        metrics.bleu([["a", 1]], ["a"])


def test_gin_passes_metrics_to_a_text_file_task(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("A line of text.\nAnother line.\n")
    with gin.unlock_config():
        gin.parse_config(f"""
            t5lite.data.register_text_file_task.name = "test_gin_metrics"
            t5lite.data.register_text_file_task.train_files = "{path}"
            t5lite.data.register_text_file_task.objective = "prefix_lm"
            t5lite.data.register_text_file_task.vocabulary = "bytes"
            t5lite.data.register_text_file_task.metric_fns = [@t5lite.data.metrics.bleu, @t5lite.data.metrics.rouge]
        """)
    try:
        name = data.register_text_file_task()
    finally:
        gin.clear_config()
    assert seqio.get_mixture_or_task(name).predict_metric_fns == [metrics.bleu, metrics.rouge]
