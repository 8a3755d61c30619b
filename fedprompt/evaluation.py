"""Evaluation of a prompt: token loss and greedy-decoded ROUGE-L / exact match.

The TF part (`dataset_loss`, `generate`) is pure TF and runs eagerly, in
`tf.function` or inside a TFF computation (which then returns token ids);
scoring the decoded text (`score_generations`) is Python, outside TF.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from fedprompt import client_update, metrics
from fedprompt.data_types import TextTokenizer
from fedprompt.prompt_model import PromptTunedLM


@dataclasses.dataclass(frozen=True)
class GenerationSet:
    """Inputs and references for generation-based scoring.

    Attributes:
      input_ids: `[N, L]` int32, each row's formatted prompt right-aligned
        (left-padded), as `PromptTunedLM.greedy_generate` expects.
      input_lengths: `[N]` int32 real tokens per row.
      references: N lists of reference outputs.
      xlingual: N flags, True where the output language is not English.
      example_ids: N ids, to trace every score back to its instance.
    """

    input_ids: np.ndarray
    input_lengths: np.ndarray
    references: tuple
    xlingual: tuple
    example_ids: tuple

    def __len__(self) -> int:
        return len(self.references)

    def take(self, n: Optional[int]) -> GenerationSet:
        if n is None or n >= len(self):
            return self
        return GenerationSet(
            self.input_ids[:n],
            self.input_lengths[:n],
            self.references[:n],
            self.xlingual[:n],
            self.example_ids[:n],
        )


def left_pad(rows: Sequence[Sequence[int]], *, pad_token_id: int, width: Optional[int] = None):
    """Right-aligns token rows into `[N, width]` (`width` defaults to the longest)."""
    width = width or max((len(r) for r in rows), default=1)
    out = np.full((len(rows), width), pad_token_id, np.int32)
    lengths = np.zeros(len(rows), np.int32)
    for i, row in enumerate(rows):
        if len(row) > width:
            raise ValueError(f"row {i} has {len(row)} tokens, more than width {width}.")
        if row:
            out[i, width - len(row) :] = row
        lengths[i] = len(row)
    return out, lengths


def dataset_loss(model: PromptTunedLM, prompt: tf.Tensor, dataset: tf.data.Dataset):
    """`(loss_sum, num_tokens)` of `prompt` over a dataset of batches.

    A `tf.while_loop` over the dataset's iterator, not `dataset.reduce`
    (`client_update.iterate_batches` says why); eager mode or a `tf.function`.
    """
    iterator = client_update.iterate_batches(dataset)

    def body(loss_sum, count, next_batch):
        batch_loss, batch_count = model.loss(prompt, next_batch.get_value())
        return loss_sum + batch_loss, count + batch_count, iterator.get_next_as_optional()

    loss_sum, count, _ = tf.while_loop(
        lambda loss_sum, count, next_batch: next_batch.has_value(),
        body,
        (tf.constant(0.0), tf.constant(0.0), iterator.get_next_as_optional()),
    )
    return loss_sum, count


def generate_in_length_order(
    model: PromptTunedLM,
    prompt: tf.Tensor,
    input_ids: tf.Tensor,
    input_lengths: tf.Tensor,
    *,
    chunk_size: Optional[int],
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    pad_token_id: int,
) -> tuple[tf.Tensor, tf.Tensor]:
    """`PromptTunedLM.greedy_generate` of left-padded rows, shortest rows first.

    Rows are sorted by length and decoded `chunk_size` at a time (all at once
    when None), each chunk cut to its own longest row, so a set padded to a long
    width for its longest example pays that width only in the chunk holding it.
    Graph-mode friendly (TFF computations): the chunk loop is a `tf.while_loop`.
    The shorter layout only removes left padding, which is masked out of
    attention; outputs come back in the input's row order.

    Returns:
      `(tokens [N, max_new_tokens] int32, lengths [N] int32)`.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1 or None, got {chunk_size}.")
    input_ids = tf.convert_to_tensor(input_ids, tf.int32)
    input_lengths = tf.convert_to_tensor(input_lengths, tf.int32)
    num_rows = tf.shape(input_ids)[0]
    width = tf.shape(input_ids)[1]
    order = tf.argsort(input_lengths, stable=True)
    ids = tf.gather(input_ids, order)
    lengths = tf.gather(input_lengths, order)
    size = num_rows if chunk_size is None else tf.constant(chunk_size, tf.int32)
    size = tf.maximum(size, 1)
    num_chunks = (num_rows + size - 1) // size

    def body(chunk, tokens_array, lengths_array):
        start = chunk * size
        stop = tf.minimum(start + size, num_rows)
        chunk_lengths = lengths[start:stop]
        chunk_width = tf.maximum(tf.reduce_max(chunk_lengths), 1)
        tokens, generated = model.greedy_generate(
            prompt,
            ids[start:stop, width - chunk_width :],
            chunk_lengths,
            max_new_tokens=max_new_tokens,
            stop_token_ids=stop_token_ids,
            pad_token_id=pad_token_id,
        )
        return chunk + 1, tokens_array.write(chunk, tokens), lengths_array.write(chunk, generated)

    arrays = (
        tf.TensorArray(
            tf.int32, size=num_chunks, infer_shape=False, element_shape=[None, max_new_tokens]
        ),
        tf.TensorArray(tf.int32, size=num_chunks, infer_shape=False, element_shape=[None]),
    )

    def generate_all():
        _, tokens_array, lengths_array = tf.while_loop(
            lambda chunk, *_: chunk < num_chunks, body, (tf.constant(0), *arrays)
        )
        inverse = tf.math.invert_permutation(order)
        tokens = tf.reshape(tokens_array.concat(), [-1, max_new_tokens])
        return tf.gather(tokens, inverse), tf.gather(lengths_array.concat(), inverse)

    def nothing():  # TensorArray.concat of zero chunks fails
        return tf.zeros([0, max_new_tokens], tf.int32), tf.zeros([0], tf.int32)

    return tf.cond(num_rows > 0, generate_all, nothing)


class Generator:
    """Batched greedy decoding compiled once per (batch width, token budget).

    Reusing one `Generator` across a sweep avoids retracing: shapes are
    `[None, None]` so every batch reuses the same concrete function.
    """

    def __init__(
        self,
        model: PromptTunedLM,
        *,
        max_new_tokens: int,
        stop_token_ids: Sequence[int],
        pad_token_id: int,
        batch_size: int = 16,
        jit_compile: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        self.model = model
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.pad_token_id = int(pad_token_id)
        stop_token_ids = tuple(int(t) for t in stop_token_ids)

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, model.hidden_dim], tf.float32),
                tf.TensorSpec([None, None], tf.int32),
                tf.TensorSpec([None], tf.int32),
            ],
            jit_compile=jit_compile,
        )
        def _generate(prompt, input_ids, input_lengths):
            return model.greedy_generate(
                prompt,
                input_ids,
                input_lengths,
                max_new_tokens=self.max_new_tokens,
                stop_token_ids=stop_token_ids,
                pad_token_id=self.pad_token_id,
            )

        self._generate = _generate

    def __call__(self, prompt, generation_set: GenerationSet):
        """Returns `(tokens [N, max_new_tokens], lengths [N])` as numpy."""
        prompt = tf.convert_to_tensor(prompt, tf.float32)
        tokens, lengths = [], []
        for start in range(0, len(generation_set), self.batch_size):
            ids = generation_set.input_ids[start : start + self.batch_size]
            lens = generation_set.input_lengths[start : start + self.batch_size]
            # Trim common left padding so short batches do less work.
            width = max(int(lens.max()), 1)
            t, n = self._generate(prompt, ids[:, ids.shape[1] - width :], lens)
            tokens.append(t.numpy())
            lengths.append(n.numpy())
        if not tokens:
            return np.zeros((0, self.max_new_tokens), np.int32), np.zeros((0,), np.int32)
        return np.concatenate(tokens), np.concatenate(lengths)


def decode_generations(tokenizer: TextTokenizer, tokens: np.ndarray, lengths: np.ndarray):
    return [tokenizer.decode(list(row[:n])).strip() for row, n in zip(tokens, lengths)]


def score_generations(
    tokenizer: TextTokenizer,
    tokens: np.ndarray,
    lengths: np.ndarray,
    generation_set: GenerationSet,
) -> dict[str, np.ndarray]:
    """Per-example ROUGE-L and exact match of decoded generations."""
    predictions = decode_generations(tokenizer, tokens, lengths)
    return metrics.score_predictions(
        predictions, generation_set.references, xlingual=generation_set.xlingual
    )
