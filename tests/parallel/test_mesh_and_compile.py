"""Mesh requests that cannot work fail clearly; the Pallas kernel runs per shard; `t5lite compile`
compiles the real train step for a TPU topology and says whether it fits."""

import jax
import numpy as np
import pytest
from sharded_testing import DECODER, ENCODER_DECODER, MESHES, single_device, train

from t5lite import cli
from t5lite.sharding import MeshShape, Partitioner


@pytest.mark.parametrize(
    "shape, message",
    [
        (
            MeshShape(data=3),
            r"mesh axes \(data=3, stage=1, fsdp=1, tensor=1, expert=1\) need 3 devices, but there are 8",
        ),
        (MeshShape(data=-1, fsdp=3), r"need a multiple of 3 devices, but there are 8"),
        (MeshShape(data=-1, fsdp=-1), r"Only one mesh axis may be -1.*data and fsdp"),
        (MeshShape(data=8, tensor=0), r"positive integers.*'tensor': 0"),
        (MeshShape(data=8, slices=2), r"slices=2 needs multi-slice TPU devices"),
        (
            MeshShape(data=4, slices=3, tensor=2),
            r"slices=3 must be a positive integer dividing the data axis \(data=4\)",
        ),
    ],
)
def test_bad_mesh_shapes_name_the_axes(shape, message):
    with pytest.raises(ValueError, match=message):
        Partitioner.create(ENCODER_DECODER, shape)


def test_tensor_axis_must_divide_heads_and_dimensions():
    with pytest.raises(
        ValueError,
        match=r"tensor axis \(tensor=8\) must divide ModelConfig.num_heads=4; choose "
        r"MeshShape.tensor from \[1, 2, 4\]",
    ):
        Partitioner.create(ENCODER_DECODER, MeshShape(data=1, tensor=8))
    odd_mlp = ENCODER_DECODER.replace(d_ff=66)
    with pytest.raises(ValueError, match=r"has 66 entries along its 'mlp' axis, which the mesh splits over tensor=4"):
        Partitioner.create(odd_mlp, MeshShape(data=2, tensor=4)).params(odd_mlp)
    partitioner = Partitioner.create(ENCODER_DECODER, MeshShape(data=2, fsdp=4))
    with pytest.raises(ValueError, match=r"split over 8 devices \(data=2, fsdp=4, expert=1, stage=1\).*multiple of 8"):
        partitioner.check_batch(batch_size=8, num_microbatches=2)


def test_bad_mesh_in_a_run_fails_before_writing(tmp_path):
    model_dir = tmp_path / "run"
    code = cli.main(
        [
            "train",
            "--gin_file=runs/t5_tiny_span_corruption.gin",
            "--gin_file=sharding/fsdp_tensor.gin",
            f"--model_dir={model_dir}",
            "--gin.MeshShape.tensor=8",
        ]
    )
    assert code == 2 and not model_dir.exists()
    code = cli.main(
        [
            "train",
            "--gin_file=runs/t5_tiny_span_corruption.gin",
            f"--model_dir={model_dir}",
            "--coordinator_address=localhost:1234",
            "--num_processes=2",
        ]
    )
    assert code == 2 and not model_dir.exists()


def test_pallas_attention_runs_per_shard():
    """The flash kernel (interpreted here) under shard_map over data and tensor, with GQA heads the
    rules keep whole, trains like XLA attention on one device."""
    losses, state = train(DECODER.replace(attention_impl="pallas"), MESHES["data2_tensor4"])
    reference_losses, reference = single_device("decoder")
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-4)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
        jax.device_get(state.params),
        reference.params,
    )


def compile_run(capsys, *args):
    code = cli.main(["compile", *args])
    return code, capsys.readouterr().out


def test_compile_for_a_tpu_topology(capsys):
    """Two pipeline stages of tensor-parallel pairs, the flash kernel sharded within each stage."""
    pytest.importorskip("libtpu", reason="libtpu (in the test extras) compiles for TPU topologies")
    code, out = compile_run(
        capsys,
        "--gin_file=runs/t5_tiny_span_corruption.gin",
        "--gin_file=sharding/pipeline.gin",
        "--gin.MeshShape.stage=2",
        "--gin.MeshShape.tensor=2",
        "--gin.ModelConfig.pipeline_microbatches=4",
        "--gin.ModelConfig.pipeline_repeats=1",
        "--topology=v5e:2x2",
        "--gin.ModelConfig.attention_impl='auto'",
        "--gin.train.batch_size=8",
    )
    assert code == 0, out
    assert "4 x TPU v5 lite, mesh data=1 stage=2 fsdp=1 tensor=2 expert=1" in out
    assert "pipeline      2 stages, 4 microbatches, GPipe: each stage idles 20% of the step" in out
    assert "of 16.00 GiB HBM: fits" in out
    kernels = int(out.split("Pallas calls")[1].split()[0])
    assert kernels > 0  # flash attention forward and backward, compiled by Mosaic


def test_compile_sizes_the_dpo_step_with_its_reference_model():
    """`t5lite compile` compiles the step `t5lite train` runs: for DPO, the policy's train state and
    the frozen reference model's parameters are both arguments of the step."""
    pytest.importorskip("libtpu", reason="libtpu (in the test extras) compiles for TPU topologies")
    from t5lite import config as t5config
    from t5lite.models import abstract_params
    from t5lite.train import aot
    from t5lite.train.spec import RunSpec

    t5config.parse_gin(["runs/dpo_instructions.gin"], ["train.batch_size = 8"])
    spec = RunSpec.from_gin()
    report = aot.compile_train_step("v5e:2x2", spec)
    params = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract_params(spec.model_config)))
    assert report.reference_bytes == params  # replicated over the data-parallel chips
    assert report.memory["argument"] >= 2 * params + report.optimizer_state_bytes  # policy + reference
    assert "frozen models" in report.summary()


def test_compile_sizes_the_grpo_step_with_its_sampling_and_reference():
    """An RL step samples its responses inside the step: it compiles for a TPU like any other."""
    pytest.importorskip("libtpu", reason="libtpu (in the test extras) compiles for TPU topologies")
    from t5lite import config as t5config
    from t5lite.models import abstract_params
    from t5lite.train import aot
    from t5lite.train.spec import RunSpec

    t5config.parse_gin(["runs/grpo_synthetic.gin"], ["train.batch_size = 8", "GRPO.group_size = 2"])
    spec = RunSpec.from_gin()
    report = aot.compile_train_step("v5e:2x2", spec)
    params = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract_params(spec.model_config)))
    assert report.error is None and report.reference_bytes == params
    assert report.model_flops == spec.flops_per_step() / 4 and report.xla_flops > 0


def test_compile_reports_a_model_that_does_not_fit(capsys):
    pytest.importorskip("libtpu", reason="libtpu (in the test extras) compiles for TPU topologies")
    # T5 v1.1 XL replicated on each 16 GiB v5e chip: 3B float32 weights, gradients, Adafactor state.
    code, out = compile_run(
        capsys,
        "--gin_file=models/t5_1_1/xl.gin",
        "--gin_file=runs/pretrain_span_corruption.gin",
        "--gin_file=sharding/data_parallel.gin",
        "--topology=v5e:2x2",
        "--gin.train.batch_size=8",
    )
    assert code == 1, out
    assert "DOES NOT FIT" in out and "exceeds available HBM" in out
    code, out = compile_run(capsys, "--gin_file=runs/t5_tiny_span_corruption.gin", "--topology=v9:2x2")
    assert code == 2


def test_topology_names_of_each_generation():
    pytest.importorskip("libtpu", reason="libtpu (in the test extras) describes TPU topologies")
    from t5lite.train import aot

    # v4 and v5p chips are one JAX device each (megacore); v5e and v6e chips have one core.
    counts = {name: len(aot.topology_devices(name)) for name in ("v4:2x2x2", "v5p:2x2x2", "v5e:4x4", "v6e:2x2")}
    assert counts == {"v4:2x2x2": 8, "v5p:2x2x2": 8, "v5e:4x4": 16, "v6e:2x2": 4}
    with pytest.raises(ValueError, match="does not know the TPU topology 'v5e-16'.*e.g. v4:2x2x2"):
        aot.topology_devices("v5e-16")


def test_cluster_environment_decides_multi_process(monkeypatch):
    from t5lite import distributed

    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.cluster_environment() is None
    assert distributed.initialize() is False  # a lone process stays single-process
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.cluster_environment() is None
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.cluster_environment() == "SLURM"
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2,10.0.0.3")
    assert distributed.cluster_environment() == "TPU pod"
    with pytest.raises(ValueError, match=r"--process_id=2 must be in \[0, --num_processes=2\)"):
        distributed.initialize("localhost:1234", 2, 2)


@pytest.mark.parametrize(
    "topology, shape",
    [
        ("v5p:4x4x4", MeshShape(data=1, fsdp=-1, tensor=4)),
        ("v5e:4x4", MeshShape(data=1, fsdp=-1, tensor=4)),
        ("v5e:4x4", MeshShape(data=-1)),
    ],
)
def test_processes_sharing_batch_rows_read_the_same_data_shard(topology, shape):
    """On a pod, a tensor group can span hosts: those hosts hold the same batch rows and must feed
    the same examples, so they read the same shard."""
    pytest.importorskip("libtpu", reason="libtpu (in the test extras) describes TPU topologies")
    from t5lite.train import aot

    devices = aot.topology_devices(topology)
    partitioner = Partitioner.create(ENCODER_DECODER, shape, devices)
    batch_size = 64
    rows = partitioner.sharding(("batch", "length")).devices_indices_map((batch_size, 1))
    processes = sorted({device.process_index for device in devices})
    assert len(processes) > 1
    shards = {process: partitioner.data_shard(batch_size, process) for process in processes}
    count = {count for _, count in shards.values()}.pop()
    assert all(c == count for _, c in shards.values()) and sorted({i for i, _ in shards.values()}) == list(range(count))
    held = {
        process: {rows[device][0].indices(batch_size)[:2] for device in devices if device.process_index == process}
        for process in processes
    }
    for process in processes:
        index, _ = shards[process]
        assert sum(stop - start for start, stop in held[process]) == batch_size // count
        same_shard = [other for other in processes if shards[other][0] == index]
        assert all(held[other] == held[process] for other in same_shard)  # same rows, same examples


def test_sizes_are_printed_with_a_leading_digit():
    from t5lite.train.aot import format_bytes

    assert [format_bytes(n) for n in (2**31, 2**20 * 12.3, 4096, 0)] == ["2.00 GiB", "12.3 MiB", "4.0 KiB", "0.0 KiB"]
