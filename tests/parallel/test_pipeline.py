"""Pipeline parallelism on 8 virtual CPU devices: the staged step equals one device's, activations
really pass between stages, checkpoints move between stage counts unchanged, and meshes or
schedules that cannot work are refused before anything runs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sharded_testing import (
    MOE_CONFIGS,
    PIPELINE_CONFIGS,
    batches,
    lowered,
    save_and_restore,
    train_like_one_device,
    train_step,
)

from t5lite.config import AdapterConfig
from t5lite.models import build, dummy_inputs, pipeline
from t5lite.sharding import MeshShape, Partitioner
from t5lite.train.distillation import Teacher
from t5lite.train.step import init_state

DECODER, ENCODER_DECODER = PIPELINE_CONFIGS["decoder_4_layers"], PIPELINE_CONFIGS["encoder_decoder_4_layers"]
# kind, mesh, config changes: GPipe and circular schedules, 2 and 4 stages, with and without fsdp and tensor.
CASES = {
    "decoder-stage4-data2": ("decoder_4_layers", MeshShape(data=2, stage=4), {}),
    # Four microbatches on two stages: each waits on stage 0 before its second round.
    "encoder_decoder-stage2-fsdp2-tensor2-circular": (
        "encoder_decoder_4_layers",
        MeshShape(data=1, stage=2, fsdp=2, tensor=2),
        {"pipeline_repeats": 2, "pipeline_microbatches": 4},
    ),
    # Rematerialised: each stage keeps only its iterations' inputs and recomputes the rest.
    "encoder_decoder-stage4-tensor2-remat": (
        "encoder_decoder_4_layers",
        MeshShape(data=1, stage=4, tensor=2),
        {"remat_policy": "full"},
    ),
}


@functools.cache
def trained(case):
    kind, mesh, changes = CASES[case]
    return train_like_one_device(kind, mesh, **changes)


@pytest.mark.parametrize("case", CASES)
def test_pipelined_training_matches_one_device(case):
    state = trained(case)
    kernel = state.params["decoder"]["layers"]["mlp"]["wo"]["kernel"]  # [layers, mlp, embed]
    assert kernel.sharding.spec[0] == "stage"


def test_activations_pass_between_stages_only_on_a_staged_mesh():
    """The equality above would also hold if the layers ran unpipelined on stage-split weights; the
    collective permutes (forward, and its transpose backward) show they do not."""
    for mesh, permutes in ((MeshShape(data=2, stage=4), 2), (MeshShape(data=8), 0)):
        assert lowered(train_step(DECODER, mesh), DECODER).as_text().count("collective_permute") == permutes


def test_a_checkpoint_moves_between_stage_counts_unchanged(tmp_path):
    """A state made on two stages (layers split over them) restores bitwise on one and on four."""

    def step_on(mesh):
        return train_step(ENCODER_DECODER, mesh, num_microbatches=1, z_loss=0.0)

    staged = step_on(MeshShape(data=1, stage=2, fsdp=2, tensor=2))
    state = init_state(ENCODER_DECODER, staged.tx, jax.random.PRNGKey(0), staged.state_shardings)
    meshes = (MeshShape(data=8), MeshShape(data=2, stage=4))
    for mesh, restored in zip(meshes, save_and_restore(tmp_path, state, [step_on(mesh) for mesh in meshes])):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
        kernel = restored.params["decoder"]["layers"]["mlp"]["wo"]["kernel"]
        assert kernel.sharding.spec[0] == ("stage" if mesh.stage > 1 else None)


@pytest.mark.parametrize(
    "config, mesh, message",
    [
        (MOE_CONFIGS["switch"], MeshShape(data=4, stage=2), "Mixtures of experts do not run in pipeline stages"),
        (DECODER.replace(scan_layers=False), MeshShape(data=4, stage=2), "set ModelConfig.scan_layers=True"),
        (
            DECODER.replace(pipeline_repeats=2),
            MeshShape(data=2, stage=4),
            r"decoder's 4 layers cannot be cut into stage=4 x pipeline_repeats=2 equal chunks",
        ),
        (
            ENCODER_DECODER.replace(num_encoder_layers=2),
            MeshShape(data=2, stage=4),
            r"encoder's 2 layers cannot be cut into stage=4",
        ),
        (
            DECODER.replace(pipeline_repeats=2, pipeline_microbatches=1),
            MeshShape(data=4, stage=2),
            r"needs at least one microbatch per stage: pipeline_microbatches=1 < stage=2",
        ),
    ],
)
def test_schedules_that_cannot_run_are_refused(config, mesh, message):
    with pytest.raises(ValueError, match=message):
        Partitioner.create(config, mesh)


@pytest.mark.parametrize(
    "teacher, message",
    [
        (Teacher(DECODER.replace(num_decoder_layers=2), 0.5, lambda step: 1.0), r"decoder's 2 layers cannot be cut"),
        (Teacher(DECODER, 0.5, lambda step: 1.0, hidden_weight=1.0), r"hidden_weight compares layer outputs"),
    ],
)
def test_a_teacher_that_cannot_run_in_the_stages_is_refused(teacher, message):
    with pytest.raises(ValueError, match=message):
        train_step(DECODER, MeshShape(data=2, stage=4), teacher=teacher)


def test_dropout_in_the_stages_draws_its_own_masks():
    """LoRA's dropout (the model's own rate is 0) runs in the stages, from the step's dropout key."""
    config = DECODER.replace(adapters=AdapterConfig(lora_rank=2, lora_dropout=0.5))
    model = build(config)
    params = model.init(jax.random.PRNGKey(0), **dummy_inputs(config), enable_dropout=False)
    params = jax.tree.map(lambda p: p + 0.1, params)  # LoRA's up-projection starts at zero: no effect to drop
    tokens = jnp.asarray(batches(config)[0]["decoder_input_tokens"])
    forward = jax.jit(lambda key: model.apply(params, tokens, enable_dropout=True, rngs={"dropout": key}))
    with Partitioner.create(config, MeshShape(data=2, stage=4)).context():
        first, again, other = (forward(jax.random.PRNGKey(k)) for k in (1, 1, 2))
    np.testing.assert_array_equal(first, again)
    assert np.abs(np.asarray(first) - np.asarray(other)).max() > 1e-3


def test_a_batch_the_pipeline_cannot_cut_is_refused():
    partitioner = Partitioner.create(DECODER.replace(pipeline_microbatches=4), MeshShape(data=1, stage=2, fsdp=4))
    partitioner.check_batch(32, num_microbatches=2)
    with pytest.raises(ValueError, match=r"rows must be a multiple of 16.*pipeline_microbatches"):
        partitioner.check_batch(16, num_microbatches=2)


@pytest.mark.parametrize("stages, microbatches, repeats", [(4, 4, 1), (4, 8, 1), (4, 8, 2), (2, 3, 3)])
def test_the_bubble_is_the_idle_share_of_the_schedule(stages, microbatches, repeats):
    """Stage s runs work item t - s at iteration t (items: R rounds of M microbatches); every
    other slot of the R·M + S - 1 iterations is idle."""
    iterations = repeats * microbatches + stages - 1
    idle = sum(not 0 <= t - s < repeats * microbatches for t in range(iterations) for s in range(stages))
    assert pipeline.bubble_fraction(stages, microbatches, repeats) == pytest.approx(idle / (iterations * stages))
