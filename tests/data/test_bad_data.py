"""Bad data ends the process with the file and line, before anything is written; it never hangs."""

import json
import subprocess
import sys

import pytest

from t5lite import data
from t5lite.data.pipeline import DataStream

LENGTHS = {"targets": 32}


def stream(name, path, **task):
    data.register_text_file_task(name, str(path), objective="lm", vocabulary="bytes", **task)
    return DataStream(
        name, split="train", task_feature_lengths=LENGTHS, batch_size=2, model_kind="decoder", shuffle=False
    )


def lines(path, *records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"text": "fine"}, {"body": "no text key"}], r"bad.jsonl:2 has no key 'text'"),
        ([{"text": "fine"}, {"text": "fine too"}, "{not json"], r"bad.jsonl:3 is not a line of UTF-8 JSON"),
        ([{"text": None}], r"bad.jsonl:1: 'text' is None, not a string"),
        ([{"text": ["a", "list"]}], r"bad.jsonl:1: 'text' is \['a', 'list'\], not a string"),
    ],
)
def test_a_bad_jsonl_line_is_named_by_file_and_line(tmp_path, records, message):
    path = lines(tmp_path / "bad.jsonl", *records)
    with pytest.raises(
        ValueError, match=rf"input pipeline of task 'test_bad_jsonl' \(train split\) failed: .*{message}"
    ):
        next(stream("test_bad_jsonl", path, validation_files=str(path)))


def test_binary_files_and_broken_vocabularies_are_refused_when_registered(tmp_path):
    binary = tmp_path / "program.txt"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="program.txt is not a UTF-8 text file"):
        data.register_text_file_task("test_binary", str(binary))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.jsonl is not a UTF-8 text file"):
        data.register_text_file_task("test_latin1", str(latin1))
    model = tmp_path / "words.model"
    model.write_text("not a SentencePiece model\n")
    text = lines(tmp_path / "ok.txt", "some text")
    with pytest.raises(ValueError, match="words.model is not a SentencePiece model"):
        data.register_text_file_task("test_vocab", str(text), vocabulary=str(model))


@pytest.mark.slow
def test_a_jsonl_without_the_text_key_ends_the_process_in_time(tmp_path):
    """Once, such a file printed its error and then hung until killed."""
    path = lines(tmp_path / "notes.jsonl", *({"body": f"note {i}"} for i in range(200)))
    gin_file = tmp_path / "run.gin"
    gin_file.write_text(
        "include 'runs/t5_tiny_span_corruption.gin'\n"
        "train.mixture_or_task_name = @notes/t5lite.data.register_text_file_task()\n"
        "notes/t5lite.data.register_text_file_task.name = 'test_notes'\n"
        f"notes/t5lite.data.register_text_file_task.train_files = '{path}'\n"
    )
    command = [sys.executable, "-m", "t5lite.cli", "train", f"--gin_file={gin_file}", f"--model_dir={tmp_path / 'run'}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "notes.jsonl:1 has no key 'text'" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()
