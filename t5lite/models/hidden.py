"""Each layer's output (the residual stream after the layer), for hidden-state losses and probes.

Every encoder and decoder layer sows its output into the "intermediates" collection; nothing is
kept unless a caller makes that collection mutable:

    logits, state = model.apply({"params": params}, ..., mutable=["intermediates"])
    layers = hidden_states(state["intermediates"], config)  # {"encoder": [...], "decoder": [...]}
"""

from __future__ import annotations

from flax import traverse_util

from t5lite.config import ModelConfig
from t5lite.models.params import unstack_layers


def hidden_states(intermediates, config: ModelConfig) -> dict[str, list]:
    """Stack name -> the outputs [batch, length, d_model] of its layers, first to last, whether the
    layers were scanned (one array stacked over layers) or unrolled."""
    flat = {path: sown[0] for path, sown in traverse_util.flatten_dict(intermediates, sep="/").items()}
    if config.scan_layers:
        flat = unstack_layers(flat, config)
    return {
        stack: [flat[f"{stack}/layers_{i}/hidden"] for i in range(depth)]
        for stack, depth in config.layer_stacks.items()
    }
