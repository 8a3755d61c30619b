"""A tiny differentiable PromptLoss and matching tff.learning model, for the federated tests.

The "backbone" is two frozen matrices (embedding `[V, H]`, output `[H, V]`)
with fixed values. Each position attends over the prompt rows, so every row
gets its own gradient:

    x_t = E[token_t];  a_t = softmax(x_t P^T);  h_t = tanh(x_t + a_t P);  logits_t = h_t W

and position t predicts token t+1 where `target_mask[t+1]` (next-token CE).
A batch containing `nan_token` multiplies the logits by NaN (a poisoned
client for the non-finite tests).
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedprompt import data_types

VOCAB = 10
HIDDEN = 4
PROMPT_LENGTH = 3
SEQ_LEN = 6
PROMPT_SHAPE = (PROMPT_LENGTH, HIDDEN)
NAN_TOKEN = VOCAB - 1  # never produced by `make_examples` unless asked for


def _backbone_values(seed: int = 0):
    rng = np.random.RandomState(seed)
    emb = rng.normal(scale=0.8, size=(VOCAB, HIDDEN)).astype(np.float32)
    out = rng.normal(scale=0.8, size=(HIDDEN, VOCAB)).astype(np.float32)
    return emb, out


def initial_prompt(seed: int = 1) -> np.ndarray:
    return np.random.RandomState(seed).normal(scale=0.5, size=PROMPT_SHAPE).astype(np.float32)


def toy_loss_sum(prompt, batch, embedding, output):
    """`(loss_sum, num_tokens)` of the toy model (see the module docstring)."""
    token_ids = batch["token_ids"]
    x = tf.gather(embedding, token_ids)  # [B, T, H]
    attention = tf.nn.softmax(tf.einsum("bth,ph->btp", x, prompt), axis=-1)
    h = tf.tanh(x + tf.einsum("btp,ph->bth", attention, prompt))
    logits = tf.einsum("bth,hv->btv", h, output)
    poisoned = tf.reduce_any(tf.equal(token_ids, NAN_TOKEN))
    logits = logits * tf.where(poisoned, tf.constant(float("nan")), tf.constant(1.0))
    labels = token_ids[:, 1:]
    mask = tf.cast(
        tf.logical_and(batch["target_mask"][:, 1:], batch["padding_mask"][:, 1:]), tf.float32
    )
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits[:, :-1])
    return tf.reduce_sum(ce * mask), tf.reduce_sum(mask)


def model_fn():
    """A `PromptLoss` whose frozen weights are tf.Variables created here (as the real one)."""
    emb, out = _backbone_values()
    embedding = tf.Variable(emb, trainable=False, name="embedding")
    output = tf.Variable(out, trainable=False, name="output")

    def loss_fn(prompt, batch):
        return toy_loss_sum(prompt, batch, embedding, output)

    return loss_fn


def eager_loss_fn():
    """The same loss with constant weights, for hand computations outside TFF."""
    emb, out = _backbone_values()
    return lambda prompt, batch: toy_loss_sum(prompt, batch, tf.constant(emb), tf.constant(out))


def make_examples(num_examples: int, seed: int, poison: bool = False) -> collections.OrderedDict:
    """`num_examples` examples of length SEQ_LEN with varied padding and target spans."""
    rng = np.random.RandomState(seed)
    token_ids = rng.randint(0, NAN_TOKEN, size=(num_examples, SEQ_LEN)).astype(np.int32)
    lengths = rng.randint(3, SEQ_LEN + 1, size=num_examples)
    target_starts = np.array([rng.randint(1, n) for n in lengths])
    positions = np.arange(SEQ_LEN)[None, :]
    padding_mask = positions < lengths[:, None]
    target_mask = (positions >= target_starts[:, None]) & padding_mask
    token_ids = np.where(padding_mask, token_ids, 0).astype(np.int32)
    if poison:
        token_ids[0, 0] = NAN_TOKEN
    return collections.OrderedDict(
        token_ids=token_ids, padding_mask=padding_mask, target_mask=target_mask
    )


def make_dataset(examples: collections.OrderedDict, batch_size: int) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(examples).batch(batch_size)


def batch_spec():
    return data_types.batch_spec(SEQ_LEN)


class ToyVariableModel(tff.learning.models.VariableModel):
    """The toy as a `tff.learning` model whose only trainable variable is the prompt.

    `forward_pass(...).loss` is the token mean of the batch (`loss_sum /
    num_tokens`), the same per-step objective as fedprompt's client update.
    """

    def __init__(self, prompt_init: np.ndarray):
        emb, out = _backbone_values()
        self._prompt = tf.Variable(prompt_init, name="prompt")
        self._embedding = tf.Variable(emb, trainable=False, name="embedding")
        self._output = tf.Variable(out, trainable=False, name="output")
        self._examples = tf.Variable(0, dtype=tf.int64, trainable=False, name="num_examples")

    @property
    def trainable_variables(self):
        return [self._prompt]

    @property
    def non_trainable_variables(self):
        return [self._embedding, self._output]

    @property
    def local_variables(self):
        return [self._examples]

    @property
    def input_spec(self):
        return batch_spec()

    @tf.function
    def predict_on_batch(self, batch_input, training=True):
        del training
        return toy_loss_sum(self._prompt, batch_input, self._embedding, self._output)

    @tf.function
    def forward_pass(self, batch_input, training=True):
        loss_sum, num_tokens = self.predict_on_batch(batch_input, training)
        num_examples = tf.shape(batch_input["token_ids"], out_type=tf.int64)[0]
        self._examples.assign_add(num_examples)
        return tff.learning.models.BatchOutput(
            loss=tf.math.divide_no_nan(loss_sum, num_tokens),
            predictions=loss_sum,
            num_examples=num_examples,
        )

    @tf.function
    def report_local_unfinalized_metrics(self):
        return collections.OrderedDict(num_examples=[self._examples.read_value()])

    def metric_finalizers(self):
        return collections.OrderedDict(num_examples=tf.function(lambda x: x[0]))

    @tf.function
    def reset_metrics(self):
        self._examples.assign(0)
