"""`t5lite eval`: metrics chosen by the task or by --metrics, sampled metrics (pass@k), ranking a
multiple-choice task's choices, and `--compare` of two runs judged example by example."""

import json
import math
import re
import shutil

import pytest
import seqio
from scipy import stats

from t5lite import cli, data
from t5lite.data import code_tasks, multiple_choice, sources
from t5lite.data import metrics as seqio_metrics
from t5lite.data.evaluation import evaluate_predictions

RECORDS = [{"inputs": f"question {i}", "targets": f"answer {i}"} for i in range(5)]


class Calls:
    """Fakes of the model's functions that record how evaluation called them."""

    def __init__(self):
        self.greedy, self.sampled, self.questions = [], [], []

    def predict(self, texts):
        self.greedy.append(list(texts))
        return [text.replace("question", "answer") for text in texts]

    def sample(self, texts, samples, temperature):
        self.sampled.append((list(texts), samples, temperature))
        return [[f"sample {s} of {text}" for s in range(samples)] for text in texts]

    def choices(self, questions):
        self.questions.append(list(questions))
        return {"rank_accuracy": 25.0}


def recording_metric(name, seen):
    def metric(targets, predictions):
        seen[name] = (list(targets), list(predictions))
        return {name: 1.0}

    return metric


@pytest.fixture
def recorded_task():
    """A task with two greedy metrics and a sampled one (3 samples at 0.7), each recording its arguments."""
    seen = {}
    metrics = [
        recording_metric("greedy_a", seen),
        recording_metric("greedy_b", seen),
        seqio_metrics.sampled(samples=3, temperature=0.7)(recording_metric("sampled", seen)),
    ]
    seqio.TaskRegistry.remove("test_eval_recorded")
    vocab = data.get_vocabulary("bytes")
    seqio.TaskRegistry.add(
        "test_eval_recorded",
        source=sources.RecordsSource(lambda split: RECORDS),
        output_features={key: seqio.Feature(vocab) for key in ("inputs", "targets")},
        preprocessors=[seqio.preprocessors.tokenize],
        metric_fns=metrics,
    )
    return seen


def test_a_sampled_metric_gets_its_samples_and_greedy_metrics_share_one_decode(recorded_task):
    calls = Calls()
    results = evaluate_predictions("test_eval_recorded", "validation", calls.predict, sample_fn=calls.sample)
    inputs = [r["inputs"] for r in RECORDS]
    targets = [r["targets"] for r in RECORDS]
    assert results == {"test_eval_recorded": {"greedy_a": 1.0, "greedy_b": 1.0, "sampled": 1.0}}
    assert calls.greedy == [inputs]  # decoded once for both greedy metrics
    assert calls.sampled == [(inputs, 3, 0.7)]
    assert recorded_task["greedy_a"] == recorded_task["greedy_b"] == (targets, targets)
    assert recorded_task["sampled"] == (targets, [[f"sample {s} of {x}" for s in range(3)] for x in inputs])
    assert calls.questions == []  # the task has no choices


def test_metrics_override_runs_the_named_functions_instead_of_the_tasks(recorded_task):
    calls = Calls()
    results = evaluate_predictions("test_eval_recorded", "validation", calls.predict, metrics=["exact_match", "bleu"])
    assert set(results["test_eval_recorded"]) == {"exact_match", "bleu"}
    assert results["test_eval_recorded"]["exact_match"] == 100.0  # the fake answers every question right
    assert calls.sampled == [] and recorded_task == {}


def test_unknown_metric_names_are_refused_before_anything_is_decoded(recorded_task, capsys):
    calls = Calls()
    with pytest.raises(ValueError, match=r"'exact_matc'.*known metrics are: bleu, classification, exact_match"):
        evaluate_predictions("test_eval_recorded", "validation", calls.predict, metrics=["exact_match", "exact_matc"])
    with pytest.raises(ValueError, match="rank_accuracy ranks the choices"):
        evaluate_predictions("test_eval_recorded", "validation", calls.predict, metrics=["rank_accuracy"])
    with pytest.raises(ValueError, match="has a metric of 3 samples per example; pass sample_fn"):
        evaluate_predictions("test_eval_recorded", "validation", calls.predict)
    assert calls.greedy == [] and recorded_task == {}
    assert cli.main(["eval", "--model_dir=/no/such/run", "--metrics=bleu,pass_at_100"]) == 2  # before loading
    assert "Unknown metric name(s) 'pass_at_100'" in capsys.readouterr().err


def test_a_multiple_choice_task_ranks_its_questions_instead_of_decoding():
    calls = Calls()
    results = evaluate_predictions(
        "t5lite_corpus_choice", "validation", calls.predict, choices_fn=calls.choices, max_examples=5
    )
    assert results == {"t5lite_corpus_choice": {"rank_accuracy": 25.0}}
    assert calls.questions == [[tuple(q) for q in multiple_choice.multiple_choice_examples("validation", 5)]]
    assert calls.greedy == []


def test_pass_at_k_on_the_code_task_with_reference_and_wrong_samples():
    problems = {p.prompt: p for p in code_tasks.PROBLEMS}
    validation = [problems[r["inputs"]] for r in code_tasks.examples("validation")]
    right = {validation[0].prompt: 10, validation[1].prompt: 3}  # correct samples of 10; the others none
    calls = []

    def sample(texts, samples, temperature):
        calls.append((samples, temperature))
        return [
            [problems[x].solution] * right.get(x, 0) + ["    return None\n"] * (samples - right.get(x, 0))
            for x in texts
        ]

    def no_greedy(texts):
        raise AssertionError("pass@k needs no greedy decode")

    results = evaluate_predictions("t5lite_code", "validation", no_greedy, sample_fn=sample)["t5lite_code"]
    assert calls == [(10, 0.8)]
    n = len(validation)
    assert results["pass@1"] == pytest.approx(100 * (1.0 + 0.3) / n)
    assert results["pass@10"] == pytest.approx(100 * 2 / n)


# A trained run: its checkpoints at steps 75 and 150 are the two runs compared.

TINY = [
    "train.mixture_or_task_name = 't5lite_synthetic_copy'",
    "train.num_steps = 150",
    "train.checkpoint_every = 75",
    "train.eval_every = None",
    "train.progress = False",
    "ModelConfig.dtype = 'float32'",
    "ModelConfig.d_model = 64",
    "ModelConfig.d_ff = 128",
    "ModelConfig.num_heads = 2",
    "ModelConfig.head_dim = 32",
    "ModelConfig.num_encoder_layers = 1",
    "ModelConfig.num_decoder_layers = 1",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    late = tmp_path_factory.mktemp("runs") / "late"
    args = ["train", "--gin_file=runs/t5_tiny_synthetic.gin", f"--model_dir={late}"]
    assert cli.main(args + [f"--gin.{b.replace(' = ', '=', 1)}" for b in TINY]) == 0
    early = late.parent / "early"
    shutil.copytree(late, early)
    shutil.rmtree(early / "checkpoints" / "150")  # its latest checkpoint is step 75
    return late, early


@pytest.mark.slow
def test_eval_on_the_multiple_choice_task_writes_rank_accuracy(runs):
    from t5lite import inference, scoring

    late, _ = runs
    assert (
        cli.main(["eval", f"--model_dir={late}", "--task=t5lite_corpus_choice", "--batches=1", "--max_examples=8"]) == 0
    )
    results = json.loads((late / "eval_150_t5lite_corpus_choice.json").read_text())
    run = inference.load_run(late)
    questions = multiple_choice.multiple_choice_examples("validation", 8)
    expected = scoring.evaluate_choices(run.model, run.params, questions, run.vocabulary.encode, add_eos=True)
    assert results["metrics"] == {"t5lite_corpus_choice": pytest.approx(expected)}
    assert results["step"] == 150 and results["validation"]["loss"] > 0


@pytest.mark.slow
def test_compare_writes_judgments_and_the_ratings_they_give(runs, capsys):
    late, early = runs
    assert cli.main(["eval", "--compare", str(late), str(early), "--judge=exact_match", "--max_examples=24"]) == 0
    result = json.loads((late / "compare_late_vs_early.json").read_text())
    assert (result["runs"]["a"]["name"], result["runs"]["a"]["step"]) == ("late", 150)
    assert (result["runs"]["b"]["name"], result["runs"]["b"]["step"]) == ("early", 75)
    judged = result["judgments"]
    assert len(judged) == result["examples"] == 24
    for j in judged:  # exact match of each output, and the outcome it gives
        score_a, score_b = (100.0 * (j[key].strip() == j["target"].strip()) for key in "ab")
        assert (j["score_a"], j["score_b"]) == (score_a, score_b)
        assert j["outcome"] == (1.0 if score_a > score_b else 0.0 if score_a < score_b else 0.5)
    wins, ties = sum(j["outcome"] == 1.0 for j in judged), sum(j["outcome"] == 0.5 for j in judged)
    assert wins > sum(j["outcome"] == 0.0 for j in judged)  # 150 steps copy better than 75
    # Win rate with a Wilson interval, by hand.
    n, p, z = 24, (wins + ties / 2) / 24, stats.norm.ppf(0.975)
    center = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    assert result["win_rate"].pop("run") == "late"
    assert result["win_rate"] == pytest.approx({"value": p, "low": center - half, "high": center + half})
    # Bradley-Terry of two runs with one virtual tie: A's share of the points is its win probability.
    share = (wins + ties / 2 + 0.5) / (n + 1)
    gap = 400 * math.log10(share / (1 - share))
    ratings = result["bradley_terry"]
    assert ratings["late"]["value"] == pytest.approx(1000 + gap / 2)
    assert ratings["early"]["value"] == pytest.approx(1000 - gap / 2)
    assert all(r["low"] < r["value"] < r["high"] for r in ratings.values())
    out = capsys.readouterr().out
    assert "late" in out and f"{p:.3f} [{center - half:.3f}, {center + half:.3f}]" in out


@pytest.mark.slow
def test_compare_and_eval_refuse_bad_input_before_decoding(runs, tmp_path, capsys):
    late, early = runs  # nothing writes into early
    other_task = tmp_path / "reverse"
    shutil.copytree(early, other_task)
    gin = other_task / "config.gin"
    gin.write_text(gin.read_text().replace("'t5lite_synthetic_copy'", "'t5lite_synthetic_reverse'"))
    cases = [
        (["--compare", str(early), str(early)], "names .* twice"),
        (["--compare", str(early), str(other_task)], "different tasks"),
        (["--compare", str(early), str(late), "--task=t5lite_code"], "another vocabulary"),
        (["--compare", str(early), str(late), "--judge=pass_at_k"], "not a metric that scores one output"),
        (["--compare", str(early), str(late), "--step=75"], "--step apply to --model_dir"),
        ([f"--model_dir={early}", "--task=t5lite_code"], "another vocabulary"),
        ([f"--model_dir={early}", "--judge=bleu"], "--judge go with --compare"),
    ]
    for args, message in cases:
        assert cli.main(["eval", *args]) == 2, args
        assert re.search(message, capsys.readouterr().err), (args, message)
    assert not list(early.glob("compare_*")) and not list(early.glob("eval_*"))
