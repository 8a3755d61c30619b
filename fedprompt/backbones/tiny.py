"""`tiny`: fedprompt's embedded default backbone, built and pre-trained on first use.

A small GPT-2 (`keras_nlp.models.GPT2Backbone`) with a byte-level BPE vocabulary,
both trained here, deterministically, on fedprompt's synthetic instruction suite
(`tasks.synthetic`), so the whole benchmark runs offline on a laptop:

1. Corpus: every instance of `generate_synthetic_suite(seed=seed + DATA_SEED_OFFSET)`
   formatted as `format_instance` does (the SNI layout for base models). The
   offset keeps the pre-training draw apart from the suite that experiments use
   with their own seed (instances may still coincide: the input spaces are small).
2. Tokenizer: byte-level BPE (GPT-2's byte-to-unicode alphabet, 256 symbols +
   `<|endoftext|>`), merges learnt in pure Python (SentencePiece must not be
   trained in a process that imported TF: DESIGN.md trap 4). Digits are pre-split
   like SmolLM2's tokenizer, so numbers are digit sequences.
3. Model: plain next-token cross-entropy on the formatted instances (all real
   tokens), Adam with warmup + cosine decay, fixed seeds, XLA train step.

The loss curve, timings and the config are stored in the preset's metadata
(`metadata.json["fedprompt"]["pretraining"]`). `build_or_load_tiny` caches the
preset directory at `<cache_dir>/tiny-<config hash>/`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import time
from typing import Any, Sequence, Union

import keras_nlp
import numpy as np
import tensorflow as tf

from fedprompt import tokenizers as tokenizers_lib
from fedprompt.backbones import preset_io

NAME = "tiny"
EOS_TOKEN = "<|endoftext|>"
# Bump when the build changes in a way the config does not capture.
BUILD_VERSION = 1
DATA_SEED_OFFSET = 1000

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    """Everything that determines the `tiny` backbone (hashed into its cache key)."""

    vocabulary_size: int = 512
    num_layers: int = 2
    num_heads: int = 4
    hidden_dim: int = 128
    intermediate_dim: int = 512
    max_sequence_length: int = 256
    # Training sequences are padded/truncated to this many tokens.
    train_sequence_length: int = 48
    instances_per_task: int = 120
    batch_size: int = 32
    steps: int = 1500
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    log_every: int = 50

    def __post_init__(self):
        for name in (
            "num_layers",
            "num_heads",
            "hidden_dim",
            "intermediate_dim",
            "batch_size",
            "steps",
            "log_every",
            "instances_per_task",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.vocabulary_size < 257:
            raise ValueError(
                f"`vocabulary_size` must be >= 257 (256 byte symbols + {EOS_TOKEN}), got "
                f"{self.vocabulary_size}"
            )
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"`hidden_dim` ({self.hidden_dim}) must be divisible by `num_heads` "
                f"({self.num_heads})"
            )
        if not 2 <= self.train_sequence_length <= self.max_sequence_length:
            raise ValueError(
                "`train_sequence_length` must be in [2, max_sequence_length="
                f"{self.max_sequence_length}], got {self.train_sequence_length}"
            )
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"`warmup_steps` must be in [0, steps={self.steps}), got {self.warmup_steps}"
            )
        if self.learning_rate <= 0:
            raise ValueError(f"`learning_rate` must be > 0, got {self.learning_rate}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_hash(config: TinyConfig, seed: int) -> str:
    payload = json.dumps(
        {"config": config.to_json(), "seed": seed, "build_version": BUILD_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def format_instance(definition: str, input_text: str, output: str) -> tuple[str, str]:
    """(prompt, target) of one instance in the SNI layout used for pre-training.

    prompt = "Definition: {definition}\\n\\nInput: {input}\\nOutput:",
    target = " {output}" (the caller appends EOS). This mirrors
    `tasks/preprocess.py`'s SNI template for base models.
    """
    return f"Definition: {definition}\n\nInput: {input_text}\nOutput:", f" {output}"


def pretraining_texts(*, seed: int, instances_per_task: int) -> list[str]:
    """The formatted pre-training corpus (one text per instance, EOS appended)."""
    from tasks import synthetic  # Imported here: `tasks` is only needed to build.

    texts = []
    for task in synthetic.generate_synthetic_suite(
        seed=seed + DATA_SEED_OFFSET, instances_per_task=instances_per_task
    ):
        for instance in task.instances:
            prompt, target = format_instance(task.definition, instance.input, instance.outputs[0])
            texts.append(prompt + target + EOS_TOKEN)
    return texts


# --- Byte-level BPE training (pure Python) -----------------------------------

# GPT-2's pre-tokenizer (ASCII version: the synthetic suite is ASCII), applied
# after splitting off every digit, as `BPETextTokenizer(split_digits=True)` does.
_PRETOKENIZE = re.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""
)
_DIGIT = re.compile(r"([0-9])")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def train_byte_level_bpe(
    texts: Sequence[str], *, vocabulary_size: int, special_tokens: Sequence[str] = (EOS_TOKEN,)
) -> tuple[dict[str, int], list[str]]:
    """Learns byte-level BPE merges (GPT-2 format), deterministically.

    Ties between equally frequent pairs are broken by the pair itself, so the
    result does not depend on dict ordering.

    Args:
      texts: training text; special tokens in it are removed before counting.
      vocabulary_size: total size: special tokens + 256 byte symbols + merges
        (fewer when the corpus runs out of pairs).
      special_tokens: tokens placed first in the vocabulary (ids 0, 1, ...).

    Returns:
      (vocabulary: token -> id, merges: ["a b", ...] in merge order), as
      `keras_nlp.tokenizers.BytePairTokenizer` / `GPT2Tokenizer` take them.
    """
    byte_map = _bytes_to_unicode()
    vocabulary = {token: i for i, token in enumerate(special_tokens)}
    for b in range(256):
        vocabulary[byte_map[b]] = len(vocabulary)
    special = re.compile("|".join(re.escape(t) for t in special_tokens)) if special_tokens else None
    word_counts: collections.Counter = collections.Counter()
    for text in texts:
        for chunk in special.split(text) if special else [text]:
            for piece in _DIGIT.split(chunk):
                for word in _PRETOKENIZE.findall(piece):
                    word_counts["".join(byte_map[b] for b in word.encode("utf-8"))] += 1
    words = [(list(word), count) for word, count in sorted(word_counts.items())]
    merges: list[str] = []
    while len(vocabulary) < vocabulary_size:
        pair_counts: collections.Counter = collections.Counter()
        for symbols, count in words:
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = min(pair_counts.items(), key=lambda item: (-item[1], item[0]))[0]
        merged = best[0] + best[1]
        merges.append(f"{best[0]} {best[1]}")
        vocabulary.setdefault(merged, len(vocabulary))
        for symbols, _ in words:
            i = 0
            while i < len(symbols) - 1:
                if symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    symbols[i : i + 2] = [merged]
                i += 1
    return vocabulary, merges


def build_tokenizer(
    vocabulary: dict[str, int], merges: Sequence[str]
) -> tokenizers_lib.BPETextTokenizer:
    tokenizer = keras_nlp.models.GPT2Tokenizer(vocabulary=dict(vocabulary), merges=list(merges))
    spec = tokenizers_lib.TextTokenizerSpec(
        special_tokens=(EOS_TOKEN,), eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, split_digits=True
    )
    return tokenizers_lib.BPETextTokenizer(tokenizer, spec=spec)


# --- Pre-training ---------------------------------------------------------------


def _encode_corpus(
    tokenizer: tokenizers_lib.BPETextTokenizer, texts: Sequence[str], length: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """(token_ids [n, length] int32, padding_mask [n, length] bool, truncated count)."""
    ids = np.full([len(texts), length], tokenizer.pad_token_id, np.int32)
    mask = np.zeros([len(texts), length], bool)
    truncated = 0
    for row, encoded in enumerate(tokenizer.encode_batch(texts)):
        truncated += len(encoded) > length
        encoded = encoded[:length]
        ids[row, : len(encoded)] = encoded
        mask[row, : len(encoded)] = True
    return ids, mask, truncated


def next_token_loss(
    backbone: keras_nlp.models.GPT2Backbone, token_ids: tf.Tensor, padding_mask: tf.Tensor
) -> tf.Tensor:
    """Mean next-token cross-entropy over real (non-padding) target positions.

    Args:
      token_ids: `[batch, T]` int32; padding_mask: `[batch, T]` bool.

    Returns:
      scalar float32.
    """
    hidden = backbone({"token_ids": token_ids, "padding_mask": padding_mask}, training=True)
    logits = backbone.token_embedding(hidden[:, :-1], reverse=True)
    losses = tf.keras.losses.sparse_categorical_crossentropy(
        token_ids[:, 1:], tf.cast(logits, tf.float32), from_logits=True
    )
    weights = tf.cast(padding_mask[:, 1:], tf.float32)
    return tf.reduce_sum(losses * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)


def pretrain(
    backbone: keras_nlp.models.GPT2Backbone,
    token_ids: np.ndarray,
    padding_mask: np.ndarray,
    *,
    config: TinyConfig,
    seed: int,
) -> list[list[float]]:
    """Trains `backbone` in place; returns the loss curve `[[step, mean loss], ...]`.

    Entry 0 is the loss of the first batch before any update; each later entry
    is the mean training loss of the `log_every` steps ending at `step`.
    """
    schedule = tf.keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if config.warmup_steps else config.learning_rate,
        decay_steps=config.steps - config.warmup_steps,
        alpha=0.1,
        warmup_target=config.learning_rate if config.warmup_steps else None,
        warmup_steps=config.warmup_steps,
    )
    optimizer = tf.keras.optimizers.Adam(learning_rate=schedule, global_clipnorm=1.0)
    variables = backbone.trainable_variables
    optimizer.build(variables)

    @tf.function(jit_compile=True)
    def train_step(ids, mask):
        with tf.GradientTape() as tape:
            loss = next_token_loss(backbone, ids, mask)
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    rng = np.random.default_rng(seed)
    n = len(token_ids)
    order, position = rng.permutation(n), 0
    curve, window = [], []
    for step in range(1, config.steps + 1):
        if position + config.batch_size > n:
            order, position = rng.permutation(n), 0
        batch = order[position : position + config.batch_size]
        position += config.batch_size
        ids, mask = tf.constant(token_ids[batch]), tf.constant(padding_mask[batch])
        if step == 1:
            curve.append([0, float(next_token_loss(backbone, ids, mask))])
        window.append(train_step(ids, mask))
        if step % config.log_every == 0 or step == config.steps:
            curve.append([step, float(tf.reduce_mean(tf.stack(window)))])
            window = []
    return curve


def build_tiny(
    *,
    output_dir: PathLike,
    seed: int = 0,
    config: TinyConfig = TinyConfig(),
    overwrite: bool = False,
) -> pathlib.Path:
    """Trains the tokenizer and the backbone and writes the preset to `output_dir`."""
    start = time.perf_counter()
    texts = pretraining_texts(seed=seed, instances_per_task=config.instances_per_task)
    vocabulary, merges = train_byte_level_bpe(texts, vocabulary_size=config.vocabulary_size)
    tokenizer = build_tokenizer(vocabulary, merges)
    token_ids, padding_mask, truncated = _encode_corpus(
        tokenizer, texts, config.train_sequence_length
    )
    tokenizer_seconds = time.perf_counter() - start

    tf.keras.utils.set_random_seed(seed)
    backbone = keras_nlp.models.GPT2Backbone(
        vocabulary_size=tokenizer.vocabulary_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        hidden_dim=config.hidden_dim,
        intermediate_dim=config.intermediate_dim,
        dropout=0.0,
        max_sequence_length=config.max_sequence_length,
    )
    train_start = time.perf_counter()
    curve = pretrain(backbone, token_ids, padding_mask, config=config, seed=seed)
    train_seconds = time.perf_counter() - train_start
    metadata = {
        "name": NAME,
        "seed": seed,
        "config": config.to_json(),
        "config_hash": config_hash(config, seed),
        "build_version": BUILD_VERSION,
        "prompt_template": "sni",
        "pretraining": {
            "objective": "next-token cross-entropy on formatted synthetic-suite instances",
            "format": "Definition: {definition}\\n\\nInput: {input}\\nOutput: {output}<|endoftext|>",
            "data": f"tasks.synthetic.generate_synthetic_suite(seed={seed + DATA_SEED_OFFSET}, "
            f"instances_per_task={config.instances_per_task})",
            "num_sequences": len(texts),
            "num_tokens": int(padding_mask.sum()),
            "truncated_sequences": int(truncated),
            "loss_curve": curve,
            "initial_loss": curve[0][1],
            "final_loss": curve[-1][1],
            "tokenizer_seconds": round(tokenizer_seconds, 3),
            "train_seconds": round(train_seconds, 3),
            "total_seconds": round(time.perf_counter() - start, 3),
        },
    }
    return preset_io.write_preset(
        output_dir, backbone=backbone, tokenizer=tokenizer, metadata=metadata, overwrite=overwrite
    )


def cached_preset_dir(cache_dir: PathLike, *, seed: int = 0, config: TinyConfig = TinyConfig()):
    return pathlib.Path(cache_dir) / f"{NAME}-{config_hash(config, seed)}"


def build_or_load_tiny(
    *,
    cache_dir: PathLike | None = None,
    seed: int = 0,
    config: TinyConfig = TinyConfig(),
) -> pathlib.Path:
    """Path of the cached `tiny` preset directory, building it on first use.

    Args:
      cache_dir: fedprompt cache folder; `preset_io.default_cache_dir()` if None.
      seed: seeds the data draw, the initialisation and the batch order.
      config: model and training configuration.

    Returns:
      `<cache_dir>/tiny-<hash of config, seed, build version>/`.
    """
    cache_dir = preset_io.default_cache_dir() if cache_dir is None else pathlib.Path(cache_dir)
    path = cached_preset_dir(cache_dir, seed=seed, config=config)
    if preset_io.is_valid_preset_dir(path):
        return path
    with preset_io.cache_entry_lock(path):
        if preset_io.is_valid_preset_dir(path):  # built while we waited for the lock
            return path
        return build_tiny(output_dir=path, seed=seed, config=config, overwrite=path.exists())
