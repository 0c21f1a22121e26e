"""Adafactor as T5X runs it: checked against a float64 reference written from the paper, layer by
layer, and invariant to scanning the layers."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from t5lite.config import ModelConfig
from t5lite.models import init_params, param_axes
from t5lite.models.params import unstack_layers
from t5lite.train import optimizers
from t5lite.train.step import TrainState, train_step

LAYERS, EXPERTS = 3, 2
# name -> (logical axes, shape, [rows, columns] of the matrix each layer / expert is, or None: unfactored)
PARAMS = {
    "query": (("layers", "embed", "heads", "kv"), (LAYERS, 128, 4, 32), (128, 128)),  # heads x kv joined
    "out": (("layers", "heads", "kv", "embed"), (LAYERS, 4, 32, 128), (128, 128)),
    "mlp": (("layers", "embed", "mlp"), (LAYERS, 128, 256), (128, 256)),
    "experts": (("layers", "expert", "embed", "expert_mlp"), (LAYERS, EXPERTS, 128, 160), (128, 160)),
    "small": (("layers", "embed", "mlp"), (LAYERS, 16, 200), None),  # 16 rows < 128: not factored
    "scale": (("layers", "embed"), (LAYERS, 128), None),
    "relpos": (("heads", "relpos_buckets"), (4, 32), None),  # one tensor, never factored
}
STEPS = 20


def learning_rate(step):
    """An rsqrt schedule of the step (0 first): numpy for the reference, jax.numpy for the optimizer."""
    xp = np if isinstance(step, int) else jnp
    return 0.05 / xp.sqrt(xp.maximum(step + 1.0, 5.0))


def reference_adafactor(x, grads, factored):
    """Shazeer & Stern (2018), Algorithms 4 and 5, with T5X's constants, for one matrix (or vector)
    `x` in float64: decay 1 - t^-0.8, eps1 = 1e-30, update clipping d = 1, relative step with
    eps2 = 1e-3. Returns the parameters after each step, and how often clipping acted."""
    x = x.astype(np.float64)
    r = c = v = 0.0
    clipped = 0
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64).reshape(x.shape)
        beta2 = 1.0 - t**-0.8
        if factored:
            r = beta2 * r + (1 - beta2) * np.sum(g**2 + 1e-30, axis=1)  # row sums, [n]
            c = beta2 * c + (1 - beta2) * np.sum(g**2 + 1e-30, axis=0)  # column sums, [m]
            v_hat = np.outer(r, c) / np.sum(r)
        else:
            v = beta2 * v + (1 - beta2) * (g**2 + 1e-30)
            v_hat = v
        u = g / np.sqrt(v_hat)
        rms_u = np.sqrt(np.mean(u**2))
        clipped += rms_u > 1.0
        u = u / max(1.0, rms_u / 1.0)
        alpha = max(1e-3, np.sqrt(np.mean(x**2))) * learning_rate(t - 1)
        x = x - alpha * u
    return x, clipped


def as_matrices(array, axes, matrix):
    """The independent tensors of a parameter (one per layer and expert), each as the matrix the
    reference factors: rows = the embed axis, columns = the others joined."""
    batch = [i for i, name in enumerate(axes) if name in ("layers", "expert")]
    rest = [i for i in range(array.ndim) if i not in batch]
    if matrix:  # put embed first among the rest
        rest = sorted(rest, key=lambda i: axes[i] != "embed")
    moved = np.transpose(array, batch + rest)
    count = int(np.prod([array.shape[i] for i in batch]))
    return moved.reshape(count, *(matrix or moved.shape[len(batch) :])) if batch else moved[None]


def test_adafactor_matches_a_float64_reference_per_layer_and_expert():
    rs = np.random.RandomState(0)
    params, grads = {}, [{} for _ in range(STEPS)]
    for name, (axes, shape, _) in PARAMS.items():
        # Layers (and experts) at different scales: per-tensor statistics must not mix them.
        scales = np.exp(rs.uniform(-2, 1, shape[:2] if axes[:2] == ("layers", "expert") else shape[:1]))
        scales = scales.reshape(scales.shape + (1,) * (len(shape) - scales.ndim))
        params[name] = (rs.randn(*shape) * scales).astype(np.float32)
        for step in range(STEPS):  # heavy-tailed gradients, so that update clipping acts
            grads[step][name] = (rs.standard_t(2, shape) * scales * rs.uniform(0.1, 10)).astype(np.float32)
    tx = optimizers.optimizer("adafactor", learning_rate, param_axes={n: p[0] for n, p in PARAMS.items()})
    state = tx.init(params)

    @jax.jit
    def update(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return jax.tree.map(jnp.add, params, updates), state

    ours = params
    for step in range(STEPS):
        ours, state = update(ours, state, grads[step])
    clipped = 0
    for name, (axes, _, matrix) in PARAMS.items():
        start, final = as_matrices(params[name], axes, matrix), as_matrices(np.asarray(ours[name]), axes, matrix)
        steps = [as_matrices(g[name], axes, matrix) for g in grads]
        for index in range(len(start)):
            expected, times = reference_adafactor(start[index], [g[index] for g in steps], matrix is not None)
            clipped += times
            np.testing.assert_allclose(
                final[index], expected, rtol=1e-5, atol=1e-7 * np.abs(expected).max(), err_msg=f"{name}[{index}]"
            )
    assert clipped > 0  # the reference's clipping was exercised


def test_attention_kernels_keep_factored_moments_per_layer():
    axes = PARAMS["query"][0]
    tx = optimizers.optimizer("adafactor", 1e-2, param_axes={"query": axes})
    state = jax.eval_shape(tx.init, {"query": jax.ShapeDtypeStruct((LAYERS, 128, 4, 32), jnp.float32)})
    assert state.v_row["query"].shape == (LAYERS, 128, 1, 1)  # [layers, embed]
    assert state.v_col["query"].shape == (LAYERS, 1, 4, 32)  # [layers, joined_kv]
    assert state.v["query"].size == 1  # no full second moment


# Every side of every kernel at least 128: the rules factor them all (heads x head_dim = 128).
SCAN_CONFIG = ModelConfig(
    architecture="decoder",
    vocab_size=256,
    d_model=128,
    num_heads=2,
    head_dim=64,
    d_ff=256,
    num_decoder_layers=3,
    mlp_activation="geglu",
    dtype="float32",
    tie_embeddings=False,
)


def scanned_start():
    """Scanned parameters whose layers differ in scale, as trained ones would: each layer's output
    projections (attention `out`, MLP `wo`) x0.5, x1, x2, which changes its residual updates linearly."""
    params = init_params(SCAN_CONFIG, jax.random.PRNGKey(0))
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    layer_scale = np.array([0.5, 1.0, 2.0], np.float32)
    return {
        path: value * layer_scale.reshape(-1, *(1,) * (value.ndim - 1))
        if re.search(r"/layers/.*/(out|wo)/", path)
        else value
        for path, value in flat.items()
    }


def train_steps(config, flat, steps=8):
    schedule = optimizers.learning_rate_schedule("constant", 1e-2)
    tx = optimizers.optimizer("adafactor", schedule, param_axes=param_axes(config))
    params = traverse_util.unflatten_dict(flat, sep="/")
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    step = jax.jit(functools.partial(train_step, config=config, tx=tx, schedule=schedule))
    rs = np.random.RandomState(0)
    targets = rs.randint(1, 256, (4, 12))
    batch = {
        "decoder_target_tokens": targets,
        "decoder_input_tokens": np.concatenate([np.zeros((4, 1), int), targets[:, :-1]], 1),
    }
    losses = []
    for _ in range(steps):  # memorising one batch
        state, metrics = step(state, batch, jax.random.PRNGKey(1))
        losses.append(float(metrics["loss"]))
    return losses, traverse_util.flatten_dict(jax.device_get(state.params), sep="/")


def test_scanned_and_unrolled_layers_train_alike():
    start = scanned_start()
    scanned_losses, scanned = train_steps(SCAN_CONFIG, start)
    unrolled_config = SCAN_CONFIG.replace(scan_layers=False)
    unrolled_losses, unrolled = train_steps(unrolled_config, unstack_layers(start, SCAN_CONFIG))
    assert scanned_losses[-1] < scanned_losses[0]
    np.testing.assert_allclose(unrolled_losses, scanned_losses, rtol=2e-5)
    for path, value in unstack_layers(scanned, SCAN_CONFIG).items():
        np.testing.assert_allclose(unrolled[path], value, rtol=1e-4, atol=1e-6, err_msg=path)


def test_runs_saved_with_optax_adafactor_resume_with_their_statistics(tmp_path):
    """A checkpoint holding optax.adafactor's state (what t5lite saved before its own Adafactor):
    restoring it refits each second-moment estimate to this layout and keeps the step."""
    import optax
    import orbax.checkpoint as ocp

    from t5lite.sharding import MeshShape
    from t5lite.train.checkpoint import TrainCheckpoints
    from t5lite.train.loop import TrainStep

    params = init_params(SCAN_CONFIG, jax.random.PRNGKey(0))
    old_tx = optax.adafactor(1e-2, decay_rate=0.8)
    old = old_tx.init(params)
    rs = np.random.RandomState(0)
    for _ in range(2):
        grads = jax.tree.map(lambda p: jnp.asarray(rs.randn(*p.shape), jnp.float32), params)
        updates, old = old_tx.update(grads, old, params)
        params = optax.apply_updates(params, updates)
    checkpoints = TrainCheckpoints(tmp_path, save_every=1, keep=None)
    checkpoints.manager.save(
        2,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(TrainState(step=jnp.asarray(2, jnp.int32), params=params, opt_state=old))
        ),
    )
    checkpoints.close()

    tx = optimizers.optimizer("adafactor", 1e-2, param_axes=param_axes(SCAN_CONFIG))
    step = TrainStep.create(
        SCAN_CONFIG,
        MeshShape(),
        tx,
        lambda s: 1e-2,
        seed=0,
        batch_size=4,
        num_microbatches=1,
        z_loss=0.0,
        label_smoothing=0.0,
        devices=jax.devices()[:1],
    )
    checkpoints = TrainCheckpoints(tmp_path, save_every=1, keep=None)
    restored = checkpoints.restore(step.abstract_state)
    # Saved again as this run saves it (factored kernels, the same field names), it restores as it is.
    checkpoints.manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(restored)))
    checkpoints.manager.wait_until_finished()
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(checkpoints.restore(step.abstract_state, 3)),
        jax.device_get(restored),
    )
    checkpoints.close()
    assert int(restored.step) == 2 and int(restored.opt_state.count) == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), jax.device_get(params))
    factored = old[0]
    # optax kept the query kernel's [3, 128, 2, 64] moments whole: ours are their means.
    query = ("decoder", "layers", "self_attention", "query", "kernel")
    whole = np.asarray(functools.reduce(lambda t, k: t[k], query, factored.v))
    ours = {
        name: np.asarray(functools.reduce(lambda t, k: t[k], query, getattr(restored.opt_state, name)))
        for name in ("v_row", "v_col")
    }
    np.testing.assert_allclose(ours["v_row"], whole.mean(axis=(2, 3), keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(ours["v_col"], whole.mean(axis=1, keepdims=True), rtol=1e-6)
    # optax factored the MLP kernel [3, 128, 256] along its two axes, as ours does: the same moments.
    wi = ("decoder", "layers", "mlp", "wi_0", "kernel")
    row, col = (np.asarray(functools.reduce(lambda t, k: t[k], wi, getattr(factored, n))) for n in ("v_row", "v_col"))
    ours = {
        name: np.asarray(functools.reduce(lambda t, k: t[k], wi, getattr(restored.opt_state, name)))
        for name in ("v_row", "v_col")
    }
    np.testing.assert_allclose(
        ours["v_row"][..., 0], row * col.mean(-1, keepdims=True) / row.mean(-1, keepdims=True), rtol=1e-5
    )
    np.testing.assert_allclose(ours["v_col"][:, 0], col, rtol=1e-5)
