"""Types shared by the data pipeline, the model and the TFF computations."""

from __future__ import annotations

import collections
import enum
from typing import Protocol, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

# Every batch that reaches the model or a TFF computation is an OrderedDict with
# exactly these keys, each `[batch, sequence_length]`:
#   token_ids:    int32, the formatted input followed by the target, then padding.
#   padding_mask: bool, True on real tokens (input and target).
#   target_mask:  bool, True on target tokens only; the loss is computed there.
BATCH_KEYS = ("token_ids", "padding_mask", "target_mask")


def batch_spec(sequence_length: int) -> collections.OrderedDict:
    """`tf.TensorSpec`s of one batch with a dynamic batch dimension."""
    return collections.OrderedDict(
        token_ids=tf.TensorSpec([None, sequence_length], tf.int32),
        padding_mask=tf.TensorSpec([None, sequence_length], tf.bool),
        target_mask=tf.TensorSpec([None, sequence_length], tf.bool),
    )


def batch_type(sequence_length: int) -> tff.StructWithPythonType:
    """TFF type of one batch (TFF 0.87 does not accept `tf.TensorSpec`s).

    Client data is `tff.SequenceType(batch_type(T))`.
    """
    return tff.StructWithPythonType(
        [
            ("token_ids", tff.TensorType(np.int32, [None, sequence_length])),
            ("padding_mask", tff.TensorType(np.bool_, [None, sequence_length])),
            ("target_mask", tff.TensorType(np.bool_, [None, sequence_length])),
        ],
        collections.OrderedDict,
    )


class PromptTemplate(enum.Enum):
    """How an instance is turned into text for a backbone."""

    # SNI style for base models: definition, optional positive examples, input.
    SNI = "sni"
    # ChatML (`<|im_start|>user ... <|im_end|>`), as SmolLM2-Instruct expects.
    CHATML = "chatml"


class TextTokenizer(Protocol):
    """What the data pipeline and decoding need from a tokenizer (eager, Python)."""

    vocabulary_size: int
    eos_token_id: int
    pad_token_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text map to their ids."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens are dropped."""
