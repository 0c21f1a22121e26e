import gin
import pytest

from t5lite import data
from t5lite.data import synthetic


def solve(text):
    """The right answer for a synthetic input, e.g. "reverse: 3 1 4" -> "4 1 3"."""
    operation, digits = text.split(": ")
    return " ".join(synthetic.OPERATIONS[operation](digits.split()))


def test_examples_are_deterministic_and_splits_disjoint():
    for operation in synthetic.OPERATIONS:
        train, validation = synthetic.examples(operation, "train"), synthetic.examples(operation, "validation")
        assert len(train) == 20_000 and len(validation) == 500
        assert not {r["inputs"] for r in train} & {r["inputs"] for r in validation}
        assert all(solve(r["inputs"]) == r["targets"] for r in validation)
    assert synthetic.examples("sort", "validation")[0] == {"inputs": "sort: 2 9 6", "targets": "2 6 9"}  # fixed


def test_exact_match_metric():
    assert data.exact_match(["1 2", "3"], ["1 2 ", "4"]) == {"exact_match": 50.0}
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        data.exact_match(["1"], ["1", "2"])


def test_evaluate_predictions_scores_a_perfect_and_a_wrong_model(vocabulary):
    perfect = data.evaluate_predictions(
        "t5lite_synthetic_reverse", "validation", lambda xs: [solve(x) for x in xs], max_examples=50
    )
    assert perfect == {"t5lite_synthetic_reverse": {"exact_match": 100.0}}
    copying = data.evaluate_predictions(
        "t5lite_synthetic", "validation", lambda xs: [x.split(": ")[1] for x in xs], max_examples=100
    )
    assert set(copying) == {"t5lite_synthetic_copy", "t5lite_synthetic_reverse", "t5lite_synthetic_sort"}
    assert copying["t5lite_synthetic_copy"]["exact_match"] == 100.0
    assert copying["t5lite_synthetic_reverse"]["exact_match"] < 10.0
    with pytest.raises(ValueError, match="3 predictions for 100 inputs"):
        data.evaluate_predictions("t5lite_synthetic_sort", "validation", lambda xs: ["1", "2", "3"], max_examples=100)


def test_gin_registers_a_text_task_by_evaluated_reference(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("A first line of text for the task.\nAnd a second one, somewhat longer than the first.\n")

    @gin.configurable
    def fake_train(mixture_or_task_name):
        return mixture_or_task_name

    with gin.unlock_config():
        gin.parse_config(f"""
            fake_train.mixture_or_task_name = @notes/t5lite.data.register_text_file_task()
            notes/t5lite.data.register_text_file_task.name = "test_gin_notes"
            notes/t5lite.data.register_text_file_task.train_files = "{tmp_path}/*.txt"
            notes/t5lite.data.register_text_file_task.validation_files = "{path}"
            notes/t5lite.data.register_text_file_task.objective = "lm"
            notes/t5lite.data.register_text_file_task.vocabulary = "bytes"
        """)
    try:
        name = fake_train()
        assert name == "test_gin_notes" and name in data.registered_names()
        batch = next(
            data.DataStream(
                name, split="validation", task_feature_lengths={"targets": 128}, batch_size=2, model_kind="decoder"
            )
        )
        assert data.get_vocabulary("bytes").decode(batch["decoder_target_tokens"][0].tolist()).startswith("A first")
    finally:
        gin.clear_config()
