"""Reading what earlier versions of t5lite saved, so that their runs resume.

Train states of runs from before t5lite's own Adafactor (`t5lite.train.adafactor`) hold
`optax.adafactor`'s statistics: they are restored as saved (sharded like the parameters they
belong to) and refit to the current layout by `adafactor.from_optax`.
"""

from __future__ import annotations

import functools

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from t5lite.train import adafactor

OPTAX_ADAFACTOR = {"count", "v_row", "v_col", "v"}  # the fields of optax's FactoredState


def restore_optax_adafactor(manager: ocp.CheckpointManager, step: int, abstract_state):
    """The train state at `step` with its optax.adafactor statistics refit to this run's Adafactor
    (`abstract_state`: ShapeDtypeStructs with shardings); None where the step holds no such state or
    the run does not train with Adafactor."""
    saved = ocp.StandardCheckpointHandler().metadata(manager.directory / str(step) / "state")
    saved = getattr(saved, "tree", saved)  # containers as saved, (shape, dtype) metadata at the leaves
    if _shapes(saved) == _shapes(abstract_state):
        return None  # saved as this run would save it (t5lite's own Adafactor has optax's field names too)
    legacy = _find(saved["opt_state"], lambda node: isinstance(node, dict) and set(node) == OPTAX_ADAFACTOR)
    current = _find(abstract_state.opt_state, lambda node: isinstance(node, adafactor.AdafactorState))
    if legacy is None or current is None or _shapes(saved["params"]) != _shapes(abstract_state.params):
        return None  # another optimizer or model: the plain restore says so
    params = traverse_util.flatten_dict(abstract_state.params, sep="/")
    replicated = jax.sharding.NamedSharding(next(iter(params.values())).sharding.mesh, jax.sharding.PartitionSpec())

    def target(path, leaf):
        keys = [str(getattr(key, "key", getattr(key, "idx", key))) for key in path]
        if keys[0] != "opt_state":  # the step and the parameters, as this run has them
            return _at(getattr(abstract_state, keys[0]), tuple(keys[1:]))
        # opt_state / <legacy path> / v_row|v_col|v / <parameter path>
        param = params.get("/".join(keys[len(legacy) + 2 :]))
        sharding = param.sharding if param is not None and param.shape == tuple(leaf.shape) else replicated
        return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=sharding)

    targets = jax.tree_util.tree_map_with_path(target, saved, is_leaf=lambda x: hasattr(x, "shape"))
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(targets)))["state"]
    like = _at(abstract_state.opt_state, current)
    refit = jax.jit(
        lambda params, old: adafactor.from_optax(old, params, like),
        out_shardings=jax.tree.map(lambda x: x.sharding, like),
    )
    statistics = refit(restored["params"], _at(restored["opt_state"], legacy))
    print(f"Checkpoint {step} holds optax.adafactor's statistics: refit to t5lite's Adafactor.", flush=True)
    return abstract_state.replace(
        step=restored["step"],
        params=restored["params"],
        opt_state=_replace_at(abstract_state.opt_state, current, statistics),
    )


def _shapes(tree) -> list[tuple[int, ...]]:
    """The shapes of a tree's arrays (or array metadata), sorted: what tells optax's layout from ours."""
    return sorted(tuple(leaf.shape) for leaf in jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape")))


def _find(tree, match, path=()) -> tuple | None:
    """The path (keys / indices) of the first node of nested containers that `match`es."""
    if match(tree):
        return path
    children = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, child in children:
        found = _find(child, match, path + (key,))
        if found is not None:
            return found
    return None


def _at(tree, path: tuple):
    return functools.reduce(lambda node, key: node[key], path, tree)


def _replace_at(tree, path: tuple, value):
    """`tree` with the node at `path` replaced (dicts, lists, tuples and named tuples rebuilt)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(tree, dict):
        return {**tree, head: _replace_at(tree[head], rest, value)}
    items = [(_replace_at(child, rest, value) if i == head else child) for i, child in enumerate(tree)]
    return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
