"""Pruning: magnitude, 2:4 and Wanda masks against numpy, structured removal of heads and MLP
channels (a smaller config, exactly the masked model), gradual pruning's schedule and masks under
optimizer steps, and `t5lite prune` end to end."""

import functools
import json

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

from t5lite import cli
from t5lite.models import build, flops, get_config, init_params, param_count
from t5lite.pruning import gradual, structured
from t5lite.pruning.weights import prune_weights
from t5lite.quantization.calibration import calibrate, unrolled

TINY = dict(dtype="float32", vocab_size=64, d_model=32, d_ff=48, num_heads=4, head_dim=8)
CONFIGS = {
    "t5_1_1": get_config("t5_1_1/tiny").replace(**TINY),  # scanned layers, relative position bias
    "llama_gqa_unrolled": get_config("llama/tiny").replace(num_kv_heads=2, scan_layers=False, **TINY),
}
TOKENS = np.random.RandomState(1).randint(2, 64, (2, 10)).astype(np.int32)


@functools.cache
def float_model(name):
    config = CONFIGS[name]
    return config, init_params(config, jax.random.PRNGKey(0))


def features(config):
    if config.is_encoder_decoder:
        return dict(encoder_input_tokens=TOKENS, decoder_input_tokens=TOKENS, decoder_target_tokens=TOKENS)
    return dict(decoder_input_tokens=TOKENS, decoder_target_tokens=TOKENS)


def logits(config, params):
    out = build(config).apply({"params": params}, **features(config), enable_dropout=False, mutable=["moe"])
    return np.asarray(out[0] if isinstance(out, tuple) else out)


def flat_unrolled(config, params):
    return traverse_util.flatten_dict(unrolled(config, params)[1], sep="/")


def kernels(config, params):
    """The attention and MLP kernels of the unrolled model, by path (what pruning may touch)."""
    return {
        p: np.asarray(v)
        for p, v in flat_unrolled(config, params).items()
        if p.endswith("/kernel") and ("attention/" in p or "/mlp/" in p)
    }


def others_unchanged(config, before, after):
    a, b = flat_unrolled(config, before), flat_unrolled(config, after)
    rest = [p for p in a if p not in kernels(config, before)]
    assert rest and all(np.array_equal(a[p], b[p]) for p in rest)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_magnitude_removes_exactly_the_smallest_weights_of_each_tensor(name, sparsity):
    config, params = float_model(name)
    _, pruned = prune_weights(config, params, "magnitude", sparsity)
    before, after = kernels(config, params), kernels(config, pruned)
    assert len(before) >= 7
    for path, w in before.items():
        flat, kept = np.abs(w).ravel(), after[path].ravel() != 0
        assert (~kept).sum() == round(sparsity * w.size), path
        order = np.argsort(flat)  # numpy's ranking: the pruned are the first round(s·size)
        assert set(np.flatnonzero(~kept)) == set(order[: round(sparsity * w.size)]), path
        assert np.array_equal(after[path].ravel()[kept], w.ravel()[kept])
    others_unchanged(config, params, pruned)


@pytest.mark.parametrize("name", CONFIGS)
def test_2_4_keeps_the_two_largest_of_every_four_consecutive_inputs(name):
    config, params = float_model(name)
    _, pruned = prune_weights(config, params, "2:4", 0.5)
    before, after = kernels(config, params), kernels(config, pruned)
    for path, w in before.items():
        # the input axes: [embed, ...] for query/key/value/wi, [mlp, embed] for wo, [heads, kv, embed] for out
        axis = 1 if path.endswith("/out/kernel") else 0
        groups = lambda a: np.moveaxis(a, axis, 0).reshape(a.shape[axis] // 4, 4, -1)  # noqa: E731
        w4, p4 = groups(w), groups(after[path])
        assert ((p4 != 0).sum(axis=1) == 2).all(), path
        top2 = np.sort(np.argsort(-np.abs(w4), axis=1)[:, :2], axis=1)
        kept = np.sort(np.argsort(p4 == 0, axis=1, kind="stable")[:, :2], axis=1)
        assert np.array_equal(kept, top2), path
        assert np.array_equal(p4[p4 != 0], w4[p4 != 0])


@pytest.mark.parametrize("name", CONFIGS)
def test_wanda_prunes_each_output_by_weight_times_input_norm(name):
    config, params = float_model(name)
    batch = {**features(config), "decoder_loss_weights": np.ones_like(TOKENS)}
    stats = calibrate(config, params, [batch], max_samples=4096)  # every token's input kept in `samples`
    _, pruned = prune_weights(config, params, "wanda", 0.5, stats=stats)
    after = kernels(config, pruned)
    differs_from_magnitude = 0
    for path, w in kernels(config, params).items():
        x = stats[path.removesuffix("/kernel")].samples  # [tokens, K] the layer's inputs
        assert x.shape[0] >= TOKENS.size
        matrix = w.reshape(x.shape[1], -1)
        score = np.abs(matrix) * np.sqrt((x.astype(np.float64) ** 2).sum(axis=0))[:, None]
        expected = np.ones_like(matrix, bool)
        for n in range(matrix.shape[1]):
            expected[np.argsort(score[:, n])[: matrix.shape[0] // 2], n] = False
        got = after[path].reshape(matrix.shape) != 0
        assert np.array_equal(got, expected), path
        by_magnitude = np.abs(matrix) >= np.median(np.abs(matrix), axis=0)
        differs_from_magnitude += not np.array_equal(got, by_magnitude)
    assert differs_from_magnitude


def masked_full(config, params, kept):
    """The full model with the removed heads' `out` rows and channels' `wo` rows zeroed."""
    flat = dict(flat_unrolled(config, params))
    groups, per_group = structured.units(config)
    for module, index in kept.items():
        if module.endswith("/mlp"):
            wo = np.array(flat[f"{module}/wo/kernel"])
            wo[np.setdiff1d(np.arange(config.d_ff), index)] = 0
            flat[f"{module}/wo/kernel"] = wo
        else:
            out = np.array(flat[f"{module}/out/kernel"]).reshape(groups, per_group, config.head_dim, -1)
            out[np.setdiff1d(np.arange(groups), index)] = 0
            flat[f"{module}/out/kernel"] = out.reshape(config.num_heads, config.head_dim, -1)
    return config.replace(scan_layers=False), traverse_util.unflatten_dict(flat, sep="/")


@pytest.mark.parametrize("name", CONFIGS)
def test_structured_removes_heads_and_channels_exactly(name):
    config, params = float_model(name)
    batch = {**features(config), "decoder_loss_weights": np.ones_like(TOKENS)}
    stats = calibrate(config, params, [batch])
    small, pruned = prune_weights(config, params, "structured", 0.5, stats=stats)
    assert (small.num_heads, small.d_ff) == (2, 24)
    assert small.num_kv_heads == (1 if config.num_kv_heads else None)

    # parameters: q and out lose 2 heads, k and v 2 (MHA) or 1 (GQA) key/value heads, the MLP 24 channels
    d, dh, gated = config.d_model, config.head_dim, 3  # gated MLPs: wi_0, wi_1, wo
    attention_layers = 3 * 2 if config.is_encoder_decoder else 2  # enc self, dec self + cross; or dec self
    mlp_layers = 4 if config.is_encoder_decoder else 2
    kv_lost = 2 if config.num_kv_heads is None else 1
    relpos = 2 * 2 * config.relative_num_buckets if config.position_encoding == "relative" else 0
    lost = attention_layers * (2 * d * 2 * dh + 2 * d * kv_lost * dh) + mlp_layers * gated * d * 24 + relpos
    assert param_count(config) - param_count(small) == lost
    assert sum(v.size for v in jax.tree_util.tree_leaves(pruned)) == param_count(small)

    # FLOPs of one sequence (inputs 10, targets 10): projections, scores and MLPs of the removed units
    q = k = 10
    per_attention = 2 * 2 * d * 2 * dh * q + 2 * 2 * d * kv_lost * dh * k
    scores = 4 * q * k * 2 * dh
    mlp = 2 * gated * d * 24 * q
    if config.is_encoder_decoder:  # encoder self (full), decoder self (causal) and cross (full)
        expected = 3 * per_attention + scores + scores // 2 + scores + 2 * mlp
    else:
        expected = per_attention + scores // 2 + mlp
    expected *= 2  # two layers of each
    assert flops.forward_flops_per_sequence(config, q, k) - flops.forward_flops_per_sequence(small, q, k) == expected

    flat = flat_unrolled(config, params)
    kept = structured.kept_units(unrolled(config, params)[0], flat, 0.5, ("attention", "mlp"), stats)
    if config.position_encoding == "relative":  # one bias table per stack: its layers keep the same heads
        assert np.array_equal(kept["encoder/layers_0/attention"], kept["encoder/layers_1/attention"])
    reference = logits(*masked_full(config, params, kept))
    assert not np.allclose(reference, logits(config, params), atol=1e-3)
    np.testing.assert_allclose(logits(small, pruned), reference, atol=2e-5, rtol=1e-5)


def test_cubic_schedule_of_zhu_and_gupta():
    s = functools.partial(gradual.cubic_sparsity, final=0.8, begin_step=10, end_step=30)
    assert [float(s(t)) for t in (0, 9, 10, 30, 100)] == pytest.approx([0, 0, 0, 0.8, 0.8])
    assert float(s(20)) == pytest.approx(0.8 * (1 - 0.5**3))
    assert float(gradual.cubic_sparsity(25, 0.8, 10, 30, frequency=10)) == pytest.approx(float(s(20)))


def test_gradual_pruning_keeps_masked_weights_at_zero_through_optimizer_steps():
    config, params = float_model("t5_1_1")
    schedule = functools.partial(gradual.cubic_sparsity, final=0.5, begin_step=1, end_step=5)
    tx = optax.chain(optax.adamw(1e-2, weight_decay=0.1), gradual.gradual_pruning(schedule))
    loss = lambda p: (logits_fn(p) ** 2).mean()  # noqa: E731
    logits_fn = lambda p: build(config).apply({"params": p}, **features(config), enable_dropout=False)  # noqa: E731

    @jax.jit
    def step(params, opt_state):
        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    state, zeros = tx.init(params), {}
    for t in range(8):
        params, state = step(params, state)
        now = {p: w == 0 for p, w in kernels(config, params).items()}
        for p, was in zeros.items():
            assert now[p][was].all(), f"a pruned weight of {p} came back at step {t}"
        zeros = now
    per_layer = [z.mean() for z in zeros.values()]
    assert min(per_layer) >= 0.5 - 1e-3 and max(per_layer) < 0.52
    embedding = np.asarray(params["token_embedder"]["embedding"])
    assert (embedding == 0).mean() < 0.01  # only the attention and MLP kernels are pruned


# ---- `t5lite prune` on a trained run

TRAIN = [
    "ModelConfig.d_model = 32",
    "ModelConfig.d_ff = 64",
    "ModelConfig.num_heads = 4",
    "ModelConfig.head_dim = 8",
    "ModelConfig.num_encoder_layers = 1",
    "ModelConfig.num_decoder_layers = 1",
    "ModelConfig.dtype = 'float32'",
    "train.batch_size = 8",
    "train.num_steps = 2",
    "train.progress = False",
    "train.checkpoint_every = 2",
    "train.task_feature_lengths = {'inputs': 32, 'targets': 8}",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("prune") / "base"
    args = ["train", "--gin_file=runs/t5_tiny_synthetic.gin", f"--model_dir={run}"]
    assert cli.main(args + [f"--gin.{b.replace(' = ', '=', 1)}" for b in TRAIN]) == 0
    return run


@pytest.mark.slow
@pytest.mark.parametrize("method", ["wanda", "structured"])
def test_prune_writes_a_run_that_eval_loads(trained_run, tmp_path, method, capsys):
    from t5lite import inference

    output = tmp_path / method
    args = ["prune", f"--checkpoint={trained_run}", f"--method={method}", "--sparsity=0.5", f"--output={output}"]
    assert cli.main([*args, "--calibration_batches=2"]) == 0
    recipe = json.loads((output / "pruning.json").read_text())
    assert recipe["method"] == method and recipe["step"] == 2
    run = inference.load_run(output)
    if method == "wanda":  # the same model with zeros: its validation loss, as eval computes it
        assert recipe["kernel_sparsity"] == pytest.approx(0.5, abs=0.01)
        assert np.isfinite(inference.validation_metrics(run, 1)["loss"])
        return
    assert (run.model.config.num_heads, run.model.config.d_ff) == (2, 32)  # a smaller model
    assert recipe["params"] < recipe["params_before"]
    assert cli.main(["eval", f"--model_dir={output}", "--batches=1", "--max_examples=1"]) == 0
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.slow
def test_gradual_pruning_from_gin_prunes_the_trained_kernels(tmp_path):
    """`optimizer.sparsity_schedule` chains the masks onto the run's Adafactor: after the schedule ends
    every attention and MLP kernel of the checkpoint is half zeros, per layer."""
    from t5lite import inference

    run = tmp_path / "gradual"
    schedule = [
        "optimizer.sparsity_schedule = @t5lite.pruning.cubic_sparsity",
        "cubic_sparsity.final = 0.5",
        "cubic_sparsity.begin_step = 0",
        "cubic_sparsity.end_step = 1",
    ]
    args = ["train", "--gin_file=runs/t5_tiny_synthetic.gin", f"--model_dir={run}"]
    assert cli.main(args + [f"--gin.{b.replace(' = ', '=', 1)}" for b in [*TRAIN, *schedule]]) == 0
    resumed = [f"--gin.{b.replace(' = ', '=', 1)}" for b in [*TRAIN, *schedule, "train.num_steps = 4"]]
    assert cli.main(args + resumed) == 0  # the masks come back from the checkpoint with the optimizer state
    loaded = inference.load_run(run)
    assert loaded.step == 4
    per_layer = [(w == 0).mean() for w in kernels(loaded.model.config, loaded.params).values()]
    assert per_layer and min(per_layer) >= 0.5 - 1e-3


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--method=magnitude", "--sparsity=1.5"], "must be in (0, 1)"),
        (["--method=magnitude", "--sparsity=0"], "must be in (0, 1)"),
        (["--method=2:4", "--sparsity=0.75"], "its sparsity is 0.5"),
        (["--method=magnitude", "--sparsity=0.5", "--families=embedding"], "families"),
    ],
)
def test_prune_refuses_bad_input_and_writes_nothing(trained_run, tmp_path, flags, message, capsys):
    output = tmp_path / "out"
    assert cli.main(["prune", f"--checkpoint={trained_run}", f"--output={output}", *flags]) == 2
    assert message in capsys.readouterr().err and not output.exists()


@pytest.mark.slow
def test_prune_refuses_a_non_empty_output(trained_run, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    args = ["prune", f"--checkpoint={trained_run}", f"--output={tmp_path}", "--method=magnitude", "--sparsity=0.5"]
    assert cli.main(args) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
