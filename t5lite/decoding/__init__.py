"""Generation with the KV cache: greedy, sampling (temperature, top-k, top-p) and beam search.

Generation is one compiled program: encode, allocate the cache, prefill, then a
`lax.while_loop` that feeds one token per step and stops as soon as every row is finished.
It is compiled once per input shape and `DecodingOptions` value (the options are static).

What a row is fed: the model's start token (`ModelConfig.start_id`: T5's 0, Llama's BOS), then
its prompt. This is how seqio's feature converters shift decoder inputs, so a decoder-only model
sees the prompt as it saw text in training, and an empty prompt still leaves a token to condition
on (for the encoder-decoder a prompt is an optional forced start of the output). Prompts come
right-padded with 0.

Prompts of different lengths in one batch: the cache keeps one write position for the whole
batch and masks no keys, so rows cannot be padded to a common length. The batch is prefilled
over its shortest prompt in one chunk, and the rest of each longer prompt is force-fed a token
per step inside the loop before that row starts generating. A prefix-LM prompt has to be in
one chunk (its tokens attend to each other), so `generate` splits a prefix-LM batch into groups
of equal prompt length, one compiled call per group; per-row random keys make the result
independent of that split.

Scores are summed log-probabilities of the generated tokens (EOS included) after the
repetition penalties, before temperature and top-k/top-p; beam search divides them by its
length penalty, which is also what it ranks sequences by.
"""

from t5lite.decoding.generation import generate, sample_traced
from t5lite.decoding.options import DecodingOptions, Generation
from t5lite.decoding.search import NEG_INF, apply_penalties, beam_search, filter_logits, length_penalty, sample

__all__ = [
    "NEG_INF",
    "DecodingOptions",
    "Generation",
    "apply_penalties",
    "beam_search",
    "filter_logits",
    "generate",
    "length_penalty",
    "sample",
    "sample_traced",
]
