"""Soft-prompt tuning over a frozen keras-nlp backbone (GPT-2 or Llama).

A soft prompt `P` is a `[prompt_length, hidden_dim]` float32 matrix prepended to
the token embeddings (Lester et al. 2021). The backbone stays frozen; only `P` is
trained and communicated. The forward pass walks the backbone's own sublayers:

    token embedding -> concat(P, tokens) -> position embedding (GPT-2 only;
    Llama uses RoPE inside attention) -> transformer layers with the padding mask
    extended by `prompt_length` ones -> final norm -> reverse embedding.

The prompt is an explicit argument of every function (not a layer variable) so
that the same code runs eagerly, in `tf.function`, under XLA and inside TFF
computations, where the prompt arrives as a tensor from the server.
"""

from __future__ import annotations

import contextlib
import enum
from typing import Optional, Sequence

import keras_nlp
import numpy as np
import tensorflow as tf
from keras_core.src.backend.tensorflow import core as keras_tf_core


def _strided_slice_update(inputs, start_indices, updates):
    """`keras_core.ops.slice_update` with a core TF op instead of an XLA op.

    keras-nlp writes its key/value caches with `ops.slice_update`, which the TF
    backend implements with `XlaDynamicUpdateSlice`. TFF's C++ worker does not
    register that op ("Op type not registered 'XlaDynamicUpdateSlice'"), so decoding
    inside a TFF computation fails. `TensorStridedSliceUpdate` is a core kernel.
    """
    inputs = tf.convert_to_tensor(inputs)
    updates = tf.convert_to_tensor(updates, dtype=inputs.dtype)
    begin = tf.stack([tf.cast(i, tf.int32) for i in start_indices])
    end = begin + tf.shape(updates, out_type=tf.int32)
    strides = tf.ones_like(begin)
    return tf.raw_ops.TensorStridedSliceUpdate(
        input=inputs, begin=begin, end=end, strides=strides, value=updates
    )


@contextlib.contextmanager
def _cache_updates_without_xla_ops():
    original = keras_tf_core.slice_update
    keras_tf_core.slice_update = _strided_slice_update
    try:
        yield
    finally:
        keras_tf_core.slice_update = original


class Architecture(enum.Enum):
    GPT2 = "gpt2"
    LLAMA = "llama"


class PromptInit(enum.Enum):
    """Prompt initialisation modes of Lester et al. 2021."""

    # Uniform in [-init_range, init_range].
    RANDOM_UNIFORM = "random_uniform"
    # Embeddings of token ids drawn uniformly (without replacement where the
    # vocabulary allows) from the non-special vocabulary.
    VOCAB_SAMPLE = "vocab_sample"
    # Embeddings of the tokens of an init text, cycled to fill `prompt_length`.
    TEXT = "text"


def trim_right_padding(batch):
    """Cuts the trailing columns that are padding in every row of `batch`.

    A column is kept up to the last one where any row has a real or a target
    token, so nothing a loss reads is dropped. At least one column is kept.
    Shapes become data-dependent: for XLA use `static_shape_loss` instead.
    """
    used = tf.reduce_any(
        tf.cast(batch["padding_mask"], tf.bool) | tf.cast(batch["target_mask"], tf.bool), axis=0
    )
    width = tf.maximum(tf.reduce_max(tf.where(used)[:, 0]) + 1, 1)
    # reduce_max of an empty set is the int64 minimum: the maximum with 1 covers it.
    return {key: value[:, :width] for key, value in batch.items()}


def architecture_of(backbone: tf.keras.Model) -> Architecture:
    if isinstance(backbone, keras_nlp.models.GPT2Backbone):
        return Architecture.GPT2
    if isinstance(backbone, keras_nlp.models.LlamaBackbone):
        return Architecture.LLAMA
    raise TypeError(
        f"Unsupported backbone {type(backbone).__name__}: fedprompt prompt-tunes "
        "keras_nlp.models.GPT2Backbone and keras_nlp.models.LlamaBackbone (and subclasses)."
    )


def validate_prompt_length(prompt_length: int, *, name: str = "prompt_length") -> int:
    if not isinstance(prompt_length, (int, np.integer)) or isinstance(prompt_length, bool):
        raise TypeError(f"`{name}` must be an int, got {prompt_length!r}.")
    if prompt_length < 1:
        raise ValueError(f"`{name}` must be >= 1, got {prompt_length}. Use e.g. {name}=20.")
    return int(prompt_length)


def create_initial_prompt(
    *,
    embedding_matrix: np.ndarray,
    prompt_length: int,
    init: PromptInit,
    seed: int,
    init_range: float = 0.5,
    init_token_ids: Optional[Sequence[int]] = None,
    excluded_token_ids: Sequence[int] = (),
) -> np.ndarray:
    """Returns an initial prompt `[prompt_length, hidden_dim]` (float32).

    Args:
      embedding_matrix: `[vocabulary_size, hidden_dim]` token embeddings.
      prompt_length: number of soft-prompt positions (>= 1).
      init: the initialisation mode.
      seed: seeds the random modes (numpy `default_rng`).
      init_range: half-width of the uniform range for `RANDOM_UNIFORM`.
      init_token_ids: token ids of the init text for `TEXT` (cycled to fill the
        prompt when shorter, truncated when longer).
      excluded_token_ids: ids never sampled by `VOCAB_SAMPLE` (special tokens).
    """
    prompt_length = validate_prompt_length(prompt_length)
    embedding_matrix = np.asarray(embedding_matrix, dtype=np.float32)
    vocabulary_size, hidden_dim = embedding_matrix.shape
    rng = np.random.default_rng(seed)
    init = PromptInit(init)
    if init is PromptInit.RANDOM_UNIFORM:
        if init_range <= 0:
            raise ValueError(f"`init_range` must be > 0, got {init_range}.")
        return rng.uniform(-init_range, init_range, size=(prompt_length, hidden_dim)).astype(
            np.float32
        )
    if init is PromptInit.VOCAB_SAMPLE:
        candidates = np.setdiff1d(np.arange(vocabulary_size), np.asarray(excluded_token_ids))
        replace = len(candidates) < prompt_length
        ids = rng.choice(candidates, size=prompt_length, replace=replace)
        return embedding_matrix[ids].copy()
    if not init_token_ids:
        raise ValueError(
            "`prompt_init=text` needs a non-empty init text (`prompt_init_text`), got none."
        )
    ids = np.resize(np.asarray(init_token_ids, dtype=np.int64), prompt_length)
    if ids.max() >= vocabulary_size or ids.min() < 0:
        raise ValueError(f"init text token ids out of range [0, {vocabulary_size}).")
    return embedding_matrix[ids].copy()


class PromptTunedLM:
    """Pure-TF forward pass, loss and decoding of a prompt-tuned frozen backbone.

    Holds no trainable state: every method takes the prompt `[P, H]` explicitly.
    The backbone is frozen (`trainable = False`) and only read.
    """

    def __init__(self, backbone: tf.keras.Model):
        self.backbone = backbone
        self.architecture = architecture_of(backbone)
        backbone.trainable = False
        self.hidden_dim = int(backbone.hidden_dim)
        self.num_layers = int(backbone.num_layers)
        self.vocabulary_size = int(backbone.vocabulary_size)
        if self.architecture is Architecture.GPT2:
            self.num_cache_heads = int(backbone.num_heads)
            self.head_dim = self.hidden_dim // int(backbone.num_heads)
            self.max_sequence_length = int(backbone.max_sequence_length)
        else:
            self.num_cache_heads = int(backbone.num_key_value_heads)
            self.head_dim = self.hidden_dim // int(backbone.num_query_heads)
            self.max_sequence_length = None  # RoPE: no learned position table.

    # ------------------------------------------------------------------ layers
    @property
    def embedding_matrix(self) -> tf.Variable:
        return self.backbone.token_embedding.embeddings

    def embed_tokens(self, token_ids: tf.Tensor) -> tf.Tensor:
        # tf.identity drops the Keras mask the embedding attaches (mask_zero): the
        # layers get the explicit, prompt-extended padding mask instead, and Keras
        # would warn on every call that the attached mask is ignored.
        return tf.identity(self.backbone.token_embedding(token_ids))

    def _check_length(self, total_length: int) -> None:
        if self.max_sequence_length is not None and total_length > self.max_sequence_length:
            raise ValueError(
                f"prompt_length + sequence length = {total_length} exceeds the backbone's "
                f"max_sequence_length {self.max_sequence_length}; shorten `sequence_length` or "
                "`prompt_length`."
            )

    def _add_positions(self, x: tf.Tensor, positions: Optional[tf.Tensor]) -> tf.Tensor:
        """GPT-2 only: adds learned position embeddings (`positions` `[B, S]` or 0..S-1)."""
        if self.architecture is not Architecture.GPT2:
            return x
        table = tf.convert_to_tensor(self.backbone.position_embedding.position_embeddings)
        if positions is None:
            pos = table[: tf.shape(x)[1]][tf.newaxis]
        else:
            pos = tf.gather(table, positions)
        return x + tf.cast(pos, x.dtype)

    def _final_norm(self, x: tf.Tensor) -> tf.Tensor:
        return self.backbone.layer_norm(x)

    def logits_from_hidden(self, hidden: tf.Tensor) -> tf.Tensor:
        return self.backbone.token_embedding(hidden, reverse=True)

    # ---------------------------------------------------------------- training
    def hidden_states(
        self, prompt: tf.Tensor, token_ids: tf.Tensor, padding_mask: tf.Tensor
    ) -> tf.Tensor:
        """Final hidden states `[B, P + T, H]` of `[prompt; tokens]`.

        Args:
          prompt: `[P, H]` float32.
          token_ids: `[B, T]` int32.
          padding_mask: `[B, T]` bool or int, True/1 on real tokens.
        """
        prompt_length = prompt.shape[0]
        if prompt_length is not None and token_ids.shape[1] is not None:
            self._check_length(prompt_length + token_ids.shape[1])
        tokens = self.embed_tokens(token_ids)
        batch_size = tf.shape(tokens)[0]
        prompt = tf.cast(prompt, tokens.dtype)
        prompts = tf.broadcast_to(
            prompt[tf.newaxis], [batch_size, tf.shape(prompt)[0], tf.shape(prompt)[1]]
        )
        x = tf.concat([prompts, tokens], axis=1)
        mask = tf.concat(
            [tf.ones([batch_size, tf.shape(prompt)[0]], tf.int32), tf.cast(padding_mask, tf.int32)],
            axis=1,
        )
        x = self._add_positions(x, None)
        for layer in self.backbone.transformer_layers:
            x = layer(x, decoder_padding_mask=mask, training=False)
        return self._final_norm(x)

    def loss(self, prompt: tf.Tensor, batch) -> tuple[tf.Tensor, tf.Tensor]:
        """Summed next-token cross-entropy on target tokens and their count.

        Token `t` is predicted from position `P + t - 1` (the prompt's last position
        predicts token 0). The LM head is applied only at target positions, which
        saves a `[B, T, V]` matmul for large vocabularies.

        Rows are right-padded, so the columns after the batch's longest row are
        padding in every row; they are cut off first. Under the causal mask no
        real position attends to a later one, so the loss is unchanged (up to
        float summation order) while a batch of short examples padded to a long
        `sequence_length` costs only its own length.

        Returns:
          `(loss_sum, num_target_tokens)`, both float32 scalars; the mean loss is
          their ratio.
        """
        if prompt.shape[0] is not None and batch["token_ids"].shape[1] is not None:
            self._check_length(prompt.shape[0] + batch["token_ids"].shape[1])
        batch = trim_right_padding(batch)
        token_ids = batch["token_ids"]
        hidden = self.hidden_states(prompt, token_ids, batch["padding_mask"])
        prompt_length = tf.shape(prompt)[0]
        seq_len = tf.shape(token_ids)[1]
        predicting = hidden[:, prompt_length - 1 : prompt_length - 1 + seq_len]
        selected = tf.cast(batch["target_mask"], tf.bool)
        target_hidden = tf.boolean_mask(predicting, selected)
        labels = tf.boolean_mask(token_ids, selected)
        logits = tf.cast(self.logits_from_hidden(target_hidden), tf.float32)
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        return tf.reduce_sum(losses), tf.cast(tf.size(labels), tf.float32)

    def static_shape_loss(self, prompt: tf.Tensor, batch) -> tuple[tf.Tensor, tf.Tensor]:
        """`loss` with static shapes only, for XLA (`fedprompt.xla_runtime`).

        `tf.boolean_mask` gives a data-dependent shape, which XLA cannot compile
        ("Fail to proof the equality of two dimensions at compile time"). Here
        the LM head runs at every position and the per-token losses outside
        `target_mask` are zeroed with `tf.where` (not multiplied, so a non-finite
        logit off target cannot leak in). The value equals `loss` up to float
        summation order (tests/test_xla_runtime.py); the cost is the LM head on
        all `B * T` positions instead of the targets only, so `loss` stays the
        default where shapes may be dynamic (TFF, eager).

        Returns:
          `(loss_sum, num_target_tokens)`, float32 scalars.
        """
        token_ids = batch["token_ids"]
        hidden = self.hidden_states(prompt, token_ids, batch["padding_mask"])
        prompt_length = prompt.shape[0] if prompt.shape[0] is not None else tf.shape(prompt)[0]
        seq_len = token_ids.shape[1] if token_ids.shape[1] is not None else tf.shape(token_ids)[1]
        predicting = hidden[:, prompt_length - 1 : prompt_length - 1 + seq_len]
        selected = tf.cast(batch["target_mask"], tf.bool)
        logits = tf.cast(self.logits_from_hidden(predicting), tf.float32)
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=token_ids, logits=logits)
        losses = tf.where(selected, losses, tf.zeros_like(losses))
        return tf.reduce_sum(losses), tf.reduce_sum(tf.cast(selected, tf.float32))

    def mean_loss(self, prompt: tf.Tensor, batch) -> tf.Tensor:
        loss_sum, count = self.loss(prompt, batch)
        return tf.math.divide_no_nan(loss_sum, count)

    # ---------------------------------------------------------------- decoding
    def _empty_cache(self, batch_size, max_length, dtype):
        shape = [batch_size, self.num_layers, 2, max_length, self.num_cache_heads, self.head_dim]
        return tf.zeros(shape, dtype=dtype)

    def _run_layers_with_cache(self, x, attention_mask, cache, index):
        caches = []
        for i, layer in enumerate(self.backbone.transformer_layers):
            x, layer_cache = layer(
                x,
                decoder_attention_mask=attention_mask,
                self_attention_cache=cache[:, i],
                self_attention_cache_update_index=index,
                training=False,
            )
            caches.append(layer_cache)
        return self._final_norm(x), tf.stack(caches, axis=1)

    def greedy_generate(
        self,
        prompt: tf.Tensor,
        input_ids: tf.Tensor,
        input_lengths: tf.Tensor,
        *,
        max_new_tokens: int,
        stop_token_ids: Sequence[int],
        pad_token_id: int = 0,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Batched greedy decoding with a key/value cache.

        Rows are laid out as `[left padding][soft prompt][input tokens][generated]`
        so every row's prompt + input is contiguous: with GPT-2, position ids are
        counted from the first prompt position of each row (as in training); with
        Llama, RoPE depends only on relative positions, which this layout keeps.
        Padding keys are masked out of attention.

        Args:
          prompt: `[P, H]`.
          input_ids: `[B, L]` int32, each row's tokens right-aligned (left-padded).
          input_lengths: `[B]` int32, number of real tokens per row.
          max_new_tokens: upper bound on generated tokens (>= 1).
          stop_token_ids: generation of a row ends after one of these ids.
          pad_token_id: written after a row has stopped.

        Returns:
          `(tokens [B, max_new_tokens] int32, lengths [B] int32)`; `lengths` count
          generated tokens before the stop token (the stop token is excluded).
        """
        if max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}.")
        with _cache_updates_without_xla_ops():
            return self._greedy_generate(
                prompt,
                input_ids,
                input_lengths,
                max_new_tokens=max_new_tokens,
                stop_token_ids=stop_token_ids,
                pad_token_id=pad_token_id,
            )

    def _greedy_generate(
        self, prompt, input_ids, input_lengths, *, max_new_tokens, stop_token_ids, pad_token_id
    ):
        input_ids = tf.convert_to_tensor(input_ids, tf.int32)
        input_lengths = tf.convert_to_tensor(input_lengths, tf.int32)
        batch_size = tf.shape(input_ids)[0]
        input_width = tf.shape(input_ids)[1]
        prompt_length = tf.shape(prompt)[0]
        seed_length = prompt_length + input_width
        total_length = seed_length + max_new_tokens
        if prompt.shape[0] is not None and input_ids.shape[1] is not None:
            self._check_length(prompt.shape[0] + input_ids.shape[1] + max_new_tokens)

        tokens = self.embed_tokens(input_ids)
        prompts = tf.broadcast_to(
            tf.cast(prompt, tokens.dtype)[tf.newaxis],
            [batch_size, prompt_length, tf.shape(prompt)[1]],
        )
        stacked = tf.concat([prompts, tokens], axis=1)  # [prompt][pads][tokens]
        num_pads = input_width - input_lengths  # [B]
        j = tf.range(seed_length)[tf.newaxis]  # [1, S]
        k = num_pads[:, tf.newaxis]  # [B, 1]
        source = tf.where(j < k, 0, tf.where(j < k + prompt_length, j - k, j))
        x = tf.gather(stacked, source, batch_dims=1)  # [pads][prompt][tokens]
        key_valid = tf.concat(
            [tf.cast(j >= k, tf.int32), tf.ones([batch_size, max_new_tokens], tf.int32)], axis=1
        )  # [B, S + N]
        x = self._add_positions(x, tf.maximum(j - k, 0))
        cache = self._empty_cache(batch_size, total_length, x.dtype)
        hidden, cache = self._run_layers_with_cache(
            x, tf.tile(key_valid[:, tf.newaxis], [1, seed_length, 1]), cache, 0
        )
        logits = self.logits_from_hidden(hidden[:, -1])
        stop_ids = tf.constant(list(stop_token_ids), tf.int32)

        def is_stop(token):
            # tf.equal, not `==`: inside TFF's graph-mode computations `Tensor.__eq__`
            # can fall back to Python identity and return a bool.
            return tf.reduce_any(tf.equal(token[:, tf.newaxis], stop_ids[tf.newaxis]), axis=1)

        next_token = tf.argmax(logits, axis=-1, output_type=tf.int32)
        output = tf.TensorArray(tf.int32, size=0, dynamic_size=True, element_shape=[None])
        done = tf.zeros([batch_size], tf.bool)
        lengths = tf.zeros([batch_size], tf.int32)
        step_mask = key_valid[:, tf.newaxis]  # [B, 1, S + N]

        def cond(step, next_token, done, lengths, cache, output):
            return tf.logical_and(step < max_new_tokens, tf.logical_not(tf.reduce_all(done)))

        def body(step, next_token, done, lengths, cache, output):
            stopped_now = is_stop(next_token)
            emitted = tf.where(done | stopped_now, pad_token_id, next_token)
            lengths += tf.cast(~(done | stopped_now), tf.int32)
            done = done | stopped_now
            output = output.write(step, emitted)
            index = seed_length + step
            x = self.embed_tokens(next_token[:, tf.newaxis])
            x = self._add_positions(x, (index - num_pads)[:, tf.newaxis])
            hidden, cache = self._run_layers_with_cache(x, step_mask, cache, index)
            logits = self.logits_from_hidden(hidden[:, -1])
            next_token = tf.argmax(logits, axis=-1, output_type=tf.int32)
            return step + 1, next_token, done, lengths, cache, output

        step, _, _, lengths, _, output = tf.while_loop(
            cond,
            body,
            (tf.constant(0), next_token, done, lengths, cache, output),
            maximum_iterations=max_new_tokens,
        )
        # Rows still running when every other row stopped early: pad the tail.
        written = output.stack()  # [steps, B]
        generated = tf.transpose(written)
        pad_tail = tf.fill([batch_size, max_new_tokens - step], pad_token_id)
        return tf.concat([generated, pad_tail], axis=1), lengths
