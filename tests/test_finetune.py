"""Fine-tuning: LoRA adapters (also on an int8 base), trainable subsets in the train step, adapters
saved alone, SFT loss masks, and the distillation / DPO / reward-model losses."""

import functools
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from scipy.special import log_softmax

from t5lite import data
from t5lite.config import AdapterConfig, ModelConfig, MoeConfig, WeightQuantConfig
from t5lite.models import abstract_params, build, init_params, param_count
from t5lite.models.lora import merge_lora
from t5lite.models.params import ADAPTERS, BIASES, PROMPT, PROMPT_PATH, split_params, trainable_pattern
from t5lite.train import checkpoint, losses, optimizers
from t5lite.train.pretrained import pretrained_params
from t5lite.train.step import eval_step, init_state, train_step

ALL = ("query", "key", "value", "out", "mlp_in", "mlp_out")
BASE = ModelConfig(
    architecture="encoder_decoder",
    vocab_size=64,
    d_model=32,
    num_heads=2,
    head_dim=16,
    d_ff=64,
    num_encoder_layers=1,
    num_decoder_layers=2,
    mlp_activation="geglu",
    dtype="float32",
    tie_embeddings=False,
)
LORA = AdapterConfig(lora_rank=4, lora_targets=ALL)
ADAPTED = BASE.replace(adapters=LORA)


def batch(size=4, seed=0):
    rs = np.random.RandomState(seed)
    targets = rs.randint(1, 64, (size, 6))
    return {
        "encoder_input_tokens": jnp.asarray(rs.randint(1, 64, (size, 7))),
        "decoder_input_tokens": jnp.asarray(np.concatenate([np.zeros((size, 1), int), targets[:, :-1]], 1)),
        "decoder_target_tokens": jnp.asarray(targets),
    }


@functools.partial(jax.jit, static_argnums=0)
def logits(config, params, data_batch):
    features = {k: v for k, v in data_batch.items() if k != "decoder_target_tokens"}
    return build(config).apply({"params": params}, **features, enable_dropout=False)


@functools.partial(jax.jit, static_argnums=0)
def loss_sum(config, params, data_batch):
    return eval_step(params, data_batch, config=config)["loss_sum"]


def flat(params):
    return traverse_util.flatten_dict(params, sep="/")


def base_of(params):
    return traverse_util.unflatten_dict({p: x for p, x in flat(params).items() if "lora_" not in p}, sep="/")


@pytest.fixture(scope="module")
def adapted_params():
    return init_params(ADAPTED, jax.random.PRNGKey(0))


def test_lora_starts_as_its_base_and_counts_r_times_in_plus_out(adapted_params):
    np.testing.assert_array_equal(
        logits(ADAPTED, adapted_params, batch()), logits(BASE, base_of(adapted_params), batch())
    )
    pairs = {p.removesuffix("/lora_a"): p for p in flat(adapted_params) if p.endswith("/lora_a")}
    assert len(pairs) == 3 * 4 + 2 * 3  # q, k, v, o of 3 attentions; wi_0, wi_1, wo of 2 MLPs (scanned)
    params = flat(adapted_params)
    for module in pairs:
        kernel, a, b = params[f"{module}/kernel"], params[f"{module}/lora_a"], params[f"{module}/lora_b"]
        assert not b.any()
        layers = kernel.shape[0] if module.split("/")[1] == "layers" else 1
        k = math.prod(a.shape[:-1]) // layers
        assert a.size + b.size == layers * 4 * (k + kernel.size // layers // k)
    trainable, _ = split_params(adapted_params, ADAPTERS)
    counted = sum(x.size for x in jax.tree.leaves(trainable))
    assert counted == param_count(ADAPTED) - param_count(BASE)
    assert counted == sum(x.size for p, x in params.items() if "lora_" in p)


def adapter_step(config, tx, **kwargs):
    schedule = optimizers.learning_rate_schedule("constant", 1e-2)
    return jax.jit(functools.partial(train_step, config=config, tx=tx, schedule=schedule, trainable=ADAPTERS, **kwargs))


@pytest.mark.parametrize("int8_weights", [(), ("attention", "mlp")], ids=["float_base", "int8_base"])
def test_lora_trains_adapters_only_and_merges(int8_weights, tmp_path):
    config = BASE.replace(
        weight_quant=WeightQuantConfig(families=int8_weights), adapters=LORA.replace(rslora=bool(int8_weights))
    )
    tx = optimizers.optimizer("adamw", 1e-2)
    state = init_state(config, tx, jax.random.PRNGKey(0), trainable=ADAPTERS)
    # The optimizer state holds the adapters' moments, nothing of the base.
    adam = state.opt_state[0]
    assert jax.tree.structure(adam.mu) == jax.tree.structure(split_params(state.params, ADAPTERS)[0])
    step = adapter_step(config, tx)
    before = loss_sum(config, state.params, batch())
    trained = state
    for i in range(8):
        trained, metrics = step(trained, batch(seed=i % 2), jax.random.PRNGKey(1))
    assert loss_sum(config, trained.params, batch()) < before
    for path, value in flat(trained.params).items():
        changed = not np.array_equal(value, flat(state.params)[path])
        assert changed == ("lora_b" in path or "lora_a" in path), path  # base bit-identical; a and b move
    if int8_weights:
        assert flat(trained.params)["encoder/layers/attention/query/kernel"].dtype == jnp.int8
        with pytest.raises(ValueError, match="adapters merge into float kernels only"):
            merge_lora(config, trained.params)
        return
    merged_config, merged = merge_lora(config, trained.params)
    assert merged_config.adapters.lora_rank == 0 and not any("lora_" in p for p in flat(merged))
    np.testing.assert_allclose(
        logits(merged_config, merged, batch()), logits(config, trained.params, batch()), atol=1e-5, rtol=0
    )
    # Adapters alone on disk, and the base + them computes the same logits.
    checkpoint.save_adapters(tmp_path / "adapters", config, trained.params)
    with ocp.StandardCheckpointer() as checkpointer:
        saved = flat(checkpointer.restore(tmp_path / "adapters" / checkpoint.ADAPTERS_DIR))
    assert sorted(saved) == sorted(p for p in flat(trained.params) if "lora_" in p)
    loaded_config, loaded = checkpoint.load_adapters(tmp_path / "adapters", base_of(trained.params))
    assert loaded_config == config
    np.testing.assert_array_equal(logits(config, loaded, batch()), logits(config, trained.params, batch()))
    with pytest.raises(ValueError, match="do not fit the adapters' model"):
        checkpoint.load_adapters(
            tmp_path / "adapters", base_of(init_params(BASE.replace(d_ff=32), jax.random.PRNGKey(0)))
        )


def test_bitfit_and_prompt_tuning_train_what_they_add(tmp_path):
    """BitFit's zero biases leave the outputs as they were; together with a soft prompt, only what
    the two add trains (counted by param_count), and it saves and loads alone."""
    config = BASE.replace(adapters=AdapterConfig(bitfit=True, prompt_length=3))
    pattern = trainable_pattern(config, None)
    assert pattern == f"{BIASES}|{PROMPT}"
    tx = optimizers.optimizer("adamw", 3e-2)
    state = init_state(config, tx, jax.random.PRNGKey(0), trainable=pattern)
    added = {p: x for p, x in flat(state.params).items() if re.search(pattern, p)}
    base = traverse_util.unflatten_dict({p: x for p, x in flat(state.params).items() if p not in added}, sep="/")
    assert sum(x.size for x in added.values()) == param_count(config) - param_count(BASE)
    # Biases of q, k, v, o in 5 attention layers and of wi_0, wi_1, wo in 3 MLPs (scanned); a [3, d] prompt.
    biases = {p: x for p, x in added.items() if p != PROMPT_PATH}
    assert len(biases) == 3 * 4 + 2 * 3 and not any(x.any() for x in biases.values())
    assert sum(x.size for x in biases.values()) == 5 * (4 * 32) + 3 * (2 * 64 + 32)
    assert added[PROMPT_PATH].shape == (3, 32)
    prompted = traverse_util.unflatten_dict({p: x for p, x in flat(state.params).items() if p not in biases}, sep="/")
    without_biases = config.replace(adapters=config.adapters.replace(bitfit=False))
    np.testing.assert_array_equal(logits(config, state.params, batch()), logits(without_biases, prompted, batch()))
    encoded = build(config).apply(
        {"params": state.params}, batch()["encoder_input_tokens"], enable_dropout=False, method="encode"
    )
    assert encoded.shape[1] == 3 + batch()["encoder_input_tokens"].shape[1]
    assert jax.tree.structure(state.opt_state[0].mu) == jax.tree.structure(split_params(state.params, pattern)[0])
    step = jax.jit(functools.partial(train_step, config=config, tx=tx, schedule=lambda step: 3e-2, trainable=pattern))
    before, trained = loss_sum(config, state.params, batch()), state
    for _ in range(5):
        trained, _ = step(trained, batch(), jax.random.PRNGKey(1))
    assert loss_sum(config, trained.params, batch()) < before
    for path, value in flat(trained.params).items():
        assert (path in added) == (not np.array_equal(value, flat(state.params)[path])), path
    checkpoint.save_adapters(tmp_path / "peft", config, trained.params)
    _, loaded = checkpoint.load_adapters(tmp_path / "peft", base)
    np.testing.assert_array_equal(logits(config, loaded, batch()), logits(config, trained.params, batch()))


def test_prompt_tuning_starts_from_token_embeddings_and_refuses_what_it_cannot_do(tmp_path):
    params = init_params(BASE, jax.random.PRNGKey(0))
    checkpoint.save_params(tmp_path / "base", BASE, params)
    table = flat(params)["token_embedder/embedding"]
    prompt = pretrained_params(BASE.replace(adapters=AdapterConfig(prompt_length=4)), str(tmp_path / "base"))[
        PROMPT_PATH
    ]
    rows = [int(np.flatnonzero((table == row).all(1))[0]) for row in prompt]
    assert len(set(rows)) == 4 and all(3 <= r < 64 for r in rows)
    with pytest.raises(ValueError, match="has no encoder"):
        BASE.replace(architecture="decoder", adapters=AdapterConfig(prompt_length=4))
    prompted = BASE.replace(adapters=AdapterConfig(prompt_length=2))
    packed = dict(batch(), encoder_segment_ids=jnp.ones((4, 7), jnp.int32))
    with pytest.raises(ValueError, match="train.pack=False"):
        jax.eval_shape(functools.partial(eval_step, config=prompted), abstract_params(prompted), packed)


def test_lora_dropout_and_bad_configs():
    config = BASE.replace(adapters=LORA.replace(lora_dropout=0.5, lora_targets=("query",)))
    params = init_params(config, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: x + 0.1, params)  # nonzero B, so the adapter path shows
    features = {k: v for k, v in batch().items() if k != "decoder_target_tokens"}
    dropped = jax.jit(
        lambda key: build(config).apply({"params": params}, **features, enable_dropout=True, rngs={"dropout": key})
    )
    a, b = (dropped(key) for key in jax.random.split(jax.random.PRNGKey(0)))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(logits(config, params, batch()), logits(config, params, batch()))
    for changes, message in [
        (dict(lora_targets=("queries",)), "lora_targets"),
        (dict(lora_rank=-1), "lora_rank"),
        (dict(lora_dropout=1.0), "lora_dropout"),
    ]:
        with pytest.raises(ValueError, match=message):
            ADAPTED.replace(adapters=LORA.replace(**changes))
    with pytest.raises(ValueError, match="mixture of experts"):
        ADAPTED.replace(moe=MoeConfig(num_experts=2, encoder_every=1, decoder_every=1))


def test_sft_loss_falls_on_response_tokens_only(tmp_path):
    """Two prompts of the same length with one response: the same loss mask and target tokens; the
    loss itself differs, because the instruction conditions the response."""
    records = [
        {"instruction": "Is 12 even or odd?", "response": "even"},
        {"instruction": "Is 13 even or odd?", "response": "even"},
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data.register_instruction_task("t5lite_test_sft", str(path), str(path))
    config = BASE.replace(architecture="decoder", vocab_size=4224)
    lengths = {"inputs": 24, "targets": 6}
    stream = data.DataStream(
        "t5lite_test_sft",
        split="validation",
        task_feature_lengths=lengths,
        batch_size=2,
        model_kind="prefix_lm",
        pack=False,
        shuffle=False,
    )
    rows = next(stream)
    weights, targets, inputs = rows["decoder_loss_weights"], rows["decoder_target_tokens"], rows["decoder_input_tokens"]
    np.testing.assert_array_equal(weights[0], weights[1])
    np.testing.assert_array_equal(targets[0] * weights[0], targets[1] * weights[1])
    assert not np.array_equal(inputs[0], inputs[1])
    response = stream.vocabulary.encode("even") + [1]  # and EOS
    assert targets[0][weights[0] > 0].tolist() == response
    prompt_end = int(np.argmax(weights[0]))
    assert prompt_end > 8 and rows["decoder_causal_attention"][0][:prompt_end].all()
    # A causal prefix: the same rows and loss weights, and no bidirectional region.
    causal = next(
        data.DataStream(
            "t5lite_test_sft",
            split="validation",
            task_feature_lengths=lengths,
            batch_size=2,
            model_kind="causal_prefix_lm",
            pack=False,
            shuffle=False,
        )
    )
    assert sorted(causal) == sorted(set(rows) - {"decoder_causal_attention"})
    for name, value in causal.items():
        np.testing.assert_array_equal(value, rows[name])
    params = init_params(config, jax.random.PRNGKey(0))
    per_row = [float(loss_sum(config, params, {k: v[i : i + 1] for k, v in rows.items()})) for i in range(2)]
    assert per_row[0] != per_row[1]
    # A prompt longer than its feature length keeps its end: the template's response marker.
    long = {"instruction": "word " * 40, "response": "even"}
    path.write_text(json.dumps(long) + "\n")
    data.register_instruction_task("t5lite_test_sft", str(path), str(path))
    row = next(
        data.DataStream(
            "t5lite_test_sft",
            split="validation",
            task_feature_lengths=lengths,
            batch_size=1,
            model_kind="encoder_decoder",
            pack=False,
            shuffle=False,
        )
    )
    assert stream.vocabulary.decode(row["encoder_input_tokens"][0].tolist()).endswith("### Response:")
    with pytest.raises(ValueError, match="needs the keys 'instruction', 'response'"):
        path.write_text(json.dumps({"prompt": "x"}) + "\n")
        data.register_instruction_task("t5lite_test_sft", str(path))


def test_builtin_instructions_are_fixed_and_disjoint():
    from t5lite.data import instructions

    train, validation = instructions.builtin_examples("train"), instructions.builtin_examples("validation")
    assert len(train) == 5000 and len(validation) == 200
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in validation}
    sums = [r for r in validation if " plus " in r["instruction"]]
    assert sums and all(int(r["response"]) == sum(map(int, r["instruction"][8:-1].split(" plus "))) for r in sums)


def test_distillation_loss():
    rs = np.random.RandomState(0)
    teacher, student = rs.randn(2, 5, 11).astype(np.float32), rs.randn(2, 5, 11).astype(np.float32)
    targets, weights = rs.randint(0, 11, (2, 5)), (rs.rand(2, 5) > 0.3).astype(np.float32)
    temperature, alpha = 2.0, 0.7
    loss, kl = losses.distillation(teacher, teacher, targets, weights, temperature, alpha=1.0)
    assert abs(float(loss)) < 1e-5 and abs(float(kl)) < 1e-5  # a student equal to its teacher
    # Against float64: alpha·T²·KL + (1 - alpha)·CE.
    p = np.exp(log_softmax(teacher.astype(np.float64) / temperature, -1))
    q = log_softmax(student.astype(np.float64) / temperature, -1)
    kl64 = np.sum(p * (np.log(p) - q), -1)
    ce64 = -np.take_along_axis(log_softmax(student.astype(np.float64), -1), targets[..., None], -1)[..., 0]
    expected = np.sum((alpha * temperature**2 * kl64 + (1 - alpha) * ce64) * weights)
    loss, _ = losses.distillation(student, teacher, targets, weights, temperature, alpha)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # The soft term's gradient pulls the student's logits towards the teacher's.
    grad = jax.grad(lambda s: losses.distillation(s, teacher, targets, weights, temperature, 1.0)[0])(student)
    moved = np.sign(np.asarray(grad))[weights > 0]
    want = np.sign(np.exp(q) - p)[weights > 0]  # d T²·KL / d student logits = T·(q - p)
    np.testing.assert_array_equal(moved, want)
    step = student - 0.1 * np.asarray(grad)
    assert float(losses.distillation(step, teacher, targets, weights, temperature, 1.0)[1]) < np.sum(kl64 * weights)


def test_distillation_temperature_schedule_and_bad_settings():
    from t5lite.train.distillation import Distillation

    schedule = Distillation("teacher_dir", temperature=4.0, final_temperature=1.0).schedule(30)
    np.testing.assert_allclose([schedule(0), schedule(15), schedule(30), schedule(40)], [4.0, 2.5, 1.0, 1.0])
    assert float(Distillation("teacher_dir", temperature=2.0).schedule(30)(29)) == 2.0
    with pytest.raises(ValueError, match="alpha"):
        Distillation("teacher_dir", alpha=1.5)
    with pytest.raises(ValueError, match="final_temperature"):
        Distillation("teacher_dir", final_temperature=0.0)


def test_hidden_state_distillation_in_the_step():
    """The hidden-state term is zero against an identical teacher, positive against another, and a
    step on it alone brings the mapped student layers towards the teacher's; bad maps are refused."""
    from t5lite.train.distillation import Distillation, Teacher, hidden_layer_map

    teacher_config = BASE.replace(num_decoder_layers=4)
    # Default map: student decoder layers 0, 1 onto teacher layers 1, 3; encoder 0 onto 0.
    assert hidden_layer_map(Distillation("t", hidden_weight=1.0), BASE, teacher_config) == (
        ("decoder", 0, 1),
        ("decoder", 1, 3),
        ("encoder", 0, 0),
    )
    with pytest.raises(ValueError, match=r"teacher layer in 0..3"):
        hidden_layer_map(Distillation("t", hidden_weight=1.0, layer_map={"decoder": [(0, 4)]}), BASE, teacher_config)
    with pytest.raises(ValueError, match="d_model"):
        hidden_layer_map(Distillation("t", hidden_weight=1.0), BASE, teacher_config.replace(d_model=48))
    with pytest.raises(ValueError, match="hidden_weight > 0"):
        Distillation("t", layer_map={"decoder": [(0, 0)]})

    rs = np.random.RandomState(0)
    student, teacher, valid = rs.randn(2, 5, 8), 3.0 * rs.randn(2, 5, 8), rs.rand(2, 5) > 0.3
    cosine = np.sum(student * teacher, -1) / np.linalg.norm(student, axis=-1) / np.linalg.norm(teacher, axis=-1)
    np.testing.assert_allclose(losses.hidden_distance(student, teacher, valid), np.mean((1 - cosine)[valid]), rtol=1e-5)
    tx = optax.sgd(0.5)
    state = init_state(BASE, tx, jax.random.PRNGKey(0))
    hidden_only = Teacher(
        BASE,
        alpha=0.0,
        temperature=lambda step: 1.0,
        hidden_weight=1.0,
        layer_map=(("decoder", 1, 1), ("encoder", 0, 0)),
    )
    step = jax.jit(
        functools.partial(train_step, config=BASE, tx=tx, schedule=lambda step: 0.5, teacher=hidden_only, z_loss=0.0)
    )
    _, metrics = step(state, batch(), jax.random.PRNGKey(1), state.params)
    assert abs(float(metrics["distill_hidden"])) < 1e-5 and abs(float(metrics["distill_kl"])) < 1e-5
    other = init_params(BASE, jax.random.PRNGKey(7))
    distances = []
    for _ in range(3):
        state, metrics = step(state, batch(), jax.random.PRNGKey(1), other)
        distances.append(float(metrics["distill_hidden"]))
    assert distances[0] > 0.1 and distances[-1] < distances[0], distances


def test_dpo_and_reward_losses():
    rs = np.random.RandomState(0)
    policy = jnp.asarray(rs.randn(2, 8))
    loss, margin = losses.dpo(policy[0], policy[1], policy[0], policy[1], beta=0.1)
    np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)  # the policy equals its reference
    np.testing.assert_allclose(margin, 0.0)
    chosen, rejected, ref_c, ref_r = (jnp.asarray(rs.randn(8)) for _ in range(4))
    loss, margin = losses.dpo(chosen, rejected, ref_c, ref_r, beta=0.5)
    expected = np.log1p(np.exp(-0.5 * ((chosen - ref_c) - (rejected - ref_r))))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    grad = jax.grad(lambda c: losses.dpo(c, rejected, ref_c, ref_r, 0.5)[0].sum())(chosen)
    assert (np.asarray(grad) < 0).all()  # raising the chosen log-probability lowers the loss
    np.testing.assert_allclose(
        losses.pairwise_reward(jnp.asarray([2.0, 0.0]), jnp.asarray([0.0, 0.0])),
        [np.log1p(np.exp(-2.0)), np.log(2.0)],
        rtol=1e-6,
    )


def test_preference_pairs_are_neighbouring_rows_after_one_prompt():
    from t5lite.data import DataStream
    from t5lite.data.preferences import builtin_pairs

    pairs = builtin_pairs("validation")
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    stream = DataStream(
        "t5lite_preferences",
        split="validation",
        task_feature_lengths={"inputs": 32, "targets": 16},
        batch_size=8,
        model_kind="prefix_lm",
        pack=False,
        shuffle=False,
    )
    rows = next(stream)
    targets, weights = rows["decoder_target_tokens"], rows["decoder_loss_weights"]
    prompt = rows["decoder_causal_attention"]
    for i in range(0, 8, 2):
        np.testing.assert_array_equal(prompt[i], prompt[i + 1])
        np.testing.assert_array_equal(targets[i][prompt[i] > 0], targets[i + 1][prompt[i + 1] > 0])
        chosen, rejected = (
            stream.vocabulary.decode([int(t) for t, w in zip(targets[r], weights[r]) if w and t > 1])
            for r in (i, i + 1)
        )
        assert (chosen, rejected) == (pairs[i // 2]["chosen"], pairs[i // 2]["rejected"])
    with pytest.raises(ValueError, match="train.pack=False"):
        DataStream(
            "t5lite_preferences",
            split="validation",
            task_feature_lengths={"inputs": 32, "targets": 8},
            batch_size=8,
            model_kind="prefix_lm",
            pack=True,
        )
    from t5lite.train.preference import Preference

    with pytest.raises(ValueError, match="needs the head"):
        Preference(objective="reward").check(BASE)
    with pytest.raises(ValueError, match="Allowed values: dpo, reward"):
        Preference(objective="ppo")
