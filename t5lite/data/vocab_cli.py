"""`t5lite vocab`: train (or find in the cache) a SentencePiece vocabulary and say how to use it."""

from __future__ import annotations

import argparse

from t5lite.data import vocab


def add_vocab_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output_dir",
        default=None,
        help="where to write the .model file (default: $T5LITE_CACHE/vocab, ~/.cache/t5lite/vocab)",
    )
    parser.add_argument(
        "--vocab_size",
        type=int,
        default=vocab.DEFAULT_VOCAB_SIZE,
        help="SentencePiece pieces, pad/EOS/UNK and 256 byte pieces included (default %(default)s)",
    )
    parser.add_argument("--model_type", choices=vocab.MODEL_TYPES, default=vocab.DEFAULT_MODEL_TYPE)
    parser.add_argument(
        "--input",
        nargs="+",
        default=None,
        metavar="FILE",
        help=".txt (a line per example) or .jsonl files; default: the embedded corpus",
    )
    parser.add_argument("--text_key", default="text", help="the field holding the text in .jsonl files")
    parser.add_argument(
        "--max_sentences",
        type=int,
        default=vocab.DEFAULT_MAX_SENTENCES,
        help="train on at most this many lines, sampled with a fixed seed (default %(default)s)",
    )
    parser.add_argument(
        "--extra_ids",
        type=int,
        default=vocab.DEFAULT_EXTRA_IDS,
        help="sentinel ids seqio appends when loading, for the suggested model size",
    )


def vocab_command(args: argparse.Namespace) -> None:
    """Train a SentencePiece vocabulary (unigram or BPE) on the embedded corpus or your text files."""
    path = vocab.build_vocabulary(
        args.output_dir,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        input_files=args.input,
        text_key=args.text_key,
        max_sentences=args.max_sentences,
    )
    vocabulary = vocab.get_vocabulary(str(path), extra_ids=args.extra_ids)
    example = "Return the number of items in a sequence."
    pieces = vocabulary.tokenizer.EncodeAsPieces(example)
    print(
        f"Vocabulary: {path}\n"
        f"  {args.model_type}, {vocabulary.vocab_size - args.extra_ids} pieces + {args.extra_ids} extra ids "
        f"= {vocabulary.vocab_size} ids (pad 0, EOS 1, UNK 2)\n"
        f"  {example!r} -> {len(pieces)} pieces: {' '.join(pieces)}\n"
        f"Use it with --gin.ModelConfig.vocab_size={vocab.vocabulary_size_for_model(vocabulary)} and the "
        f"vocabulary '{path}' in register_text_file_task / register_tfds_task."
    )
