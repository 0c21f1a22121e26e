"""What the command line tells a user who makes a mistake, before it reads or writes a run."""

import json

import pytest

from t5lite import cli, hardware, inference
from t5lite.config import ModelConfig
from t5lite.data.instructions import TEMPLATE


def test_train_help_shows_how_to_set_any_binding(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--gin.NAME=VALUE" in help_text and "--gin.train.init_from=\"'/path/to/run'\"" in help_text


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompt=hi", "--top_k=5"], "set --temperature > 0 (0 is greedy)"),
        (["--prompt=hi", "--top_p=0.9"], "set --temperature > 0 (0 is greedy)"),
        (["--prompt="], "A --prompt is empty"),
        ([], "No prompts"),
    ],
)
def test_generate_refuses_options_that_would_be_ignored(tmp_path, flags, message, capsys):
    assert cli.main(["generate", f"--model_dir={tmp_path}", *flags]) == 2
    assert message in capsys.readouterr().err


def test_generate_prompts_go_through_the_runs_instruction_template():
    class Run:  # what prompts_for reads of a run
        task = "t5lite_instructions"

    assert inference.prompts_for(Run, ["Is 7 even or odd?"]) == [TEMPLATE.format(instruction="Is 7 even or odd?")]
    Run.task = "t5lite_corpus_span_corruption"
    assert inference.prompts_for(Run, ["Is 7 even or odd?"]) == ["Is 7 even or odd?"]


def test_convert_refuses_a_quantised_model_and_writes_nothing(tmp_path, capsys):
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    (quantized / "t5lite_config.json").write_text(ModelConfig().to_json())
    (quantized / inference.QUANTIZATION_FILE).write_text(json.dumps({"source": "/runs/float", "step": 7}))
    assert cli.main(["convert", str(quantized), str(tmp_path / "hf")]) == 2
    error = capsys.readouterr().err
    assert "is a quantised model" in error and "Convert the run it was quantised from (/runs/float)" in error
    assert not (tmp_path / "hf").exists()


def sysfs(root, devices=(), device_files=()):
    """A fake /sys/bus/pci and /dev: `devices` are (vendor, class) pairs."""
    (root / "sys/bus/pci/devices").mkdir(parents=True)
    (root / "dev").mkdir()
    for i, (vendor, kind) in enumerate(devices):
        device = root / f"sys/bus/pci/devices/0000:00:0{i}.0"
        device.mkdir()
        (device / "vendor").write_text(vendor + "\n")
        (device / "class").write_text(kind + "\n")
    for name in device_files:
        (root / "dev" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "dev" / name).write_text("")
    return root


@pytest.mark.parametrize(
    "devices, device_files, expected",
    [
        ([("0x8086", "0x060000"), ("0x1af4", "0x010000")], [], True),  # a CPU VM: Intel bridge, virtio disk
        ([("0x10de", "0x030200")], [], False),  # an NVIDIA 3D controller
        ([("0x1ae0", "0x120000")], [], False),  # a TPU chip
        ([("0x10de", "0x040300")], [], True),  # NVIDIA audio is no GPU
        ([], ["nvidia0"], False),  # a GPU whose PCI entry is hidden from the container
        ([], ["vfio/0"], False),
    ],
)
def test_a_machine_without_accelerators_is_told_apart(tmp_path, devices, device_files, expected):
    assert hardware.no_accelerator_here(sysfs(tmp_path, devices, device_files)) is expected


def test_where_pci_cannot_be_read_an_accelerator_is_assumed(tmp_path):
    assert hardware.no_accelerator_here(tmp_path) is False
