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

from fedprompt import metrics
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
    """`(loss_sum, num_tokens)` of `prompt` over a dataset of batches."""

    def step(acc, batch):
        loss_sum, count = model.loss(prompt, batch)
        return acc[0] + loss_sum, acc[1] + count

    return dataset.reduce((tf.constant(0.0), tf.constant(0.0)), step)


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
