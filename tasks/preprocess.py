"""From `Example`s to model batches: prompt templates, tokenization, truncation.

Templates (`fedprompt.data_types.PromptTemplate`):

- `SNI`, for base models. SNI's layout, kept compact (without positive examples
  the "Now complete the following example-" line is dropped, which saves a
  tiny model ~8 tokens of boilerplate)::

      Definition: {definition}

      Positive Example 1-
      Input: {input}
      Output: {output}

      Now complete the following example-
      Input: {input}
      Output:

  The target is `" {output}"` followed by the tokenizer's EOS id.
- `CHATML`, for instruct models (SmolLM2-Instruct)::

      <|im_start|>user
      {definition}

      [Positive Example 1- ... as above]Input: {input}<|im_end|>
      <|im_start|>assistant

  The target is `"{output}<|im_end|>"` (the tokenizer maps `<|im_end|>` to its id;
  no extra EOS is added).

Training uses an instance's first reference output; generation keeps all of them
as references.

Tokenization is piecewise: the text before the instance input (ending in
`Input:`), `" " + input`, the text after it, and the target are encoded
separately and concatenated, so the input can be truncated at token level. The
pieces are cut at spaces and newlines, where byte-level BPE pre-tokenizers split
anyway, so this matches encoding the whole string in practice. A tokenizer
`bos_token_id` (when the tokenizer has one that is not None) is prepended.

Truncation policy (`Truncation.TRUNCATE`, the default), applied when prompt +
target exceed `sequence_length` (or the prompt exceeds `max_prompt_length`):
1. drop positive examples, last first;
2. then cut tokens from the **left** of the instance input (its end, next to
   `Output:`, is kept);
3. the definition, the template and the target are never cut; if they do not fit
   with at least one input token, `SequenceTooLongError` names `sequence_length`
   and the minimum length needed.
`Truncation.ERROR` raises instead of truncating, `Truncation.SKIP` drops examples
that do not fit (`build_dataset` logs nothing; `encode_examples` reports the count).
"""

from __future__ import annotations

import collections
import enum
from typing import Sequence

import numpy as np
import tensorflow as tf

from fedprompt.data_types import BATCH_KEYS, PromptTemplate, TextTokenizer, batch_spec
from fedprompt.evaluation import GenerationSet, left_pad
from tasks.partition import Example

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


class Truncation(enum.Enum):
    """What to do when a formatted example is longer than allowed (module docstring)."""

    TRUNCATE = "truncate"
    ERROR = "error"
    SKIP = "skip"


class SequenceTooLongError(ValueError):
    """An example cannot fit the allowed length under the truncation policy."""


def _positive_block(example: Example, k: int) -> str:
    blocks = []
    for i, positive in enumerate(example.positive_examples[:k], start=1):
        blocks.append(
            f"Positive Example {i}-\nInput: {positive.input}\nOutput: {positive.output}\n\n"
        )
    if blocks:
        blocks.append("Now complete the following example-\n")
    return "".join(blocks)


def _pieces(example: Example, template: PromptTemplate, k: int) -> tuple[str, str, str, str]:
    """(before input, input, after input, target) texts."""
    positives = _positive_block(example, k)
    target_output = example.outputs[0]
    if template is PromptTemplate.SNI:
        before = f"Definition: {example.definition}\n\n{positives}Input:"
        return before, f" {example.input}", "\nOutput:", f" {target_output}"
    if template is PromptTemplate.CHATML:
        before = f"{IM_START}user\n{example.definition}\n\n{positives}Input:"
        after = f"{IM_END}\n{IM_START}assistant\n"
        return before, f" {example.input}", after, f"{target_output}{IM_END}"
    raise ValueError(f"`template` must be a PromptTemplate, got {template!r}.")


def _check_template(template) -> PromptTemplate:
    if not isinstance(template, PromptTemplate):
        try:
            return PromptTemplate(template)
        except ValueError:
            raise ValueError(
                f"`template` must be one of {[t.value for t in PromptTemplate]}, got {template!r}."
            ) from None
    return template


def format_example(
    example: Example, *, template: PromptTemplate, num_positive_examples: int = 0
) -> tuple[str, str]:
    """`(prompt_text, target_text)` of one example (module docstring layouts).

    The SNI target excludes the EOS token, which `encode_example` appends as an id.
    """
    template = _check_template(template)
    _check_k(num_positive_examples)
    before, text, after, target = _pieces(example, template, num_positive_examples)
    return before + text + after, target


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"`num_positive_examples` must be an int >= 0, got {k!r}.")


class _Encoder:
    """Encodes text pieces, batching tokenizer calls when the tokenizer can."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, list[int]] = {}
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos = [] if bos is None else [int(bos)]

    def prefetch(self, texts: Sequence[str]) -> None:
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if not missing:
            return
        if hasattr(self.tokenizer, "encode_batch"):
            for text, ids in zip(missing, self.tokenizer.encode_batch(missing)):
                self.cache[text] = [int(i) for i in ids]
        else:
            for text in missing:
                self.cache[text] = [int(i) for i in self.tokenizer.encode(text)]

    def __call__(self, text: str) -> list[int]:
        if text not in self.cache:
            self.prefetch([text])
        return self.cache[text]


def _fit(
    example: Example,
    *,
    encoder: _Encoder,
    template: PromptTemplate,
    num_positive_examples: int,
    limit: int,
    limit_name: str,
    with_target: bool,
    truncation: Truncation,
) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids) within `limit` tokens under the truncation policy."""
    eos = [int(encoder.tokenizer.eos_token_id)] if template is PromptTemplate.SNI else []
    k_max = min(num_positive_examples, len(example.positive_examples))
    for k in range(k_max, -1, -1):
        before, text, after, target = _pieces(example, template, k)
        prefix = encoder.bos + encoder(before)
        middle = encoder(text)
        suffix = encoder(after)
        target_ids = encoder(target) + eos if with_target else []
        fixed = len(prefix) + len(suffix) + len(target_ids)
        if fixed + len(middle) <= limit:
            return prefix + middle + suffix, target_ids
        if truncation is not Truncation.TRUNCATE:
            break
    needed = fixed + len(middle)
    minimum = fixed + 1
    if truncation is Truncation.TRUNCATE and minimum <= limit:
        return prefix + middle[len(middle) - (limit - fixed) :] + suffix, target_ids
    if truncation is Truncation.TRUNCATE:
        raise SequenceTooLongError(
            f"`{limit_name}`={limit} is too short for example {example.example_id!r} "
            f"(task {example.task_name}): definition, template and target alone need "
            f"{fixed} tokens, so the minimum is {minimum}; raise `{limit_name}` to at least "
            f"{minimum} (the untruncated example has {needed})."
        )
    raise SequenceTooLongError(
        f"example {example.example_id!r} (task {example.task_name}) needs {needed} tokens, "
        f"more than `{limit_name}`={limit}, and truncation={truncation.value!r}; raise "
        f"`{limit_name}` or use Truncation.TRUNCATE."
    )


def _check_length(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"`{name}` must be an int >= 2, got {value!r}.")


def encode_examples(
    examples: Sequence[Example],
    *,
    tokenizer: TextTokenizer,
    template: PromptTemplate,
    sequence_length: int,
    num_positive_examples: int = 0,
    truncation: Truncation = Truncation.TRUNCATE,
) -> tuple[collections.OrderedDict, int]:
    """Encodes examples into `[N, sequence_length]` numpy arrays.

    Returns:
      `(arrays, num_skipped)`: `arrays` has `BATCH_KEYS` (int32 token ids padded on
      the right with `tokenizer.pad_token_id`; bool padding and target masks, the
      target mask covering the target and its stop token); `num_skipped` counts
      examples dropped under `Truncation.SKIP`.
    """
    template = _check_template(template)
    truncation = Truncation(truncation)
    _check_k(num_positive_examples)
    _check_length("sequence_length", sequence_length)
    encoder = _Encoder(tokenizer)
    k = num_positive_examples
    encoder.prefetch(
        [p for e in examples for p in _pieces(e, template, min(k, len(e.positive_examples)))]
    )
    rows = []
    skipped = 0
    for example in examples:
        try:
            prompt, target = _fit(
                example,
                encoder=encoder,
                template=template,
                num_positive_examples=k,
                limit=sequence_length,
                limit_name="sequence_length",
                with_target=True,
                truncation=truncation,
            )
        except SequenceTooLongError:
            if truncation is Truncation.SKIP:
                skipped += 1
                continue
            raise
        rows.append((prompt, target))
    n = len(rows)
    token_ids = np.full((n, sequence_length), int(tokenizer.pad_token_id), np.int32)
    padding_mask = np.zeros((n, sequence_length), np.bool_)
    target_mask = np.zeros((n, sequence_length), np.bool_)
    for i, (prompt, target) in enumerate(rows):
        length = len(prompt) + len(target)
        token_ids[i, :length] = prompt + target
        padding_mask[i, :length] = True
        target_mask[i, len(prompt) : length] = True
    arrays = collections.OrderedDict(
        token_ids=token_ids, padding_mask=padding_mask, target_mask=target_mask
    )
    return arrays, skipped


def encode_example(
    example: Example,
    *,
    tokenizer: TextTokenizer,
    template: PromptTemplate,
    sequence_length: int,
    num_positive_examples: int = 0,
    truncation: Truncation = Truncation.TRUNCATE,
) -> collections.OrderedDict:
    """One example as `BATCH_KEYS` numpy arrays of shape `[sequence_length]`."""
    if Truncation(truncation) is Truncation.SKIP:
        raise ValueError("`truncation`=SKIP needs several examples; use encode_examples.")
    arrays, _ = encode_examples(
        [example],
        tokenizer=tokenizer,
        template=template,
        sequence_length=sequence_length,
        num_positive_examples=num_positive_examples,
        truncation=truncation,
    )
    return collections.OrderedDict((key, value[0]) for key, value in arrays.items())


def build_dataset(
    examples: Sequence[Example],
    *,
    tokenizer: TextTokenizer,
    template: PromptTemplate,
    sequence_length: int,
    batch_size: int,
    shuffle_seed: int | None = None,
    num_positive_examples: int = 0,
    truncation: Truncation = Truncation.TRUNCATE,
    drop_remainder: bool = False,
    sort_by_length: bool = False,
) -> tf.data.Dataset:
    """A `tf.data.Dataset` of batches matching `batch_spec(sequence_length)`.

    Examples are encoded once (eagerly); with `shuffle_seed` their order is a
    seeded permutation (the same for every iteration: per-epoch reshuffling is the
    client update's choice), else the given order. `sort_by_length` (evaluation
    sets, whose order does not matter) orders them shortest first (stable), so
    each batch holds similar lengths and `PromptTunedLM.loss`, which cuts a
    batch's trailing padding, pays little for the padding.

    Returns:
      Dataset of `OrderedDict(token_ids int32, padding_mask bool, target_mask bool)`,
      each `[batch <= batch_size, sequence_length]`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}.")
    arrays, _ = encode_examples(
        examples,
        tokenizer=tokenizer,
        template=template,
        sequence_length=sequence_length,
        num_positive_examples=num_positive_examples,
        truncation=truncation,
    )
    if shuffle_seed is not None and sort_by_length:
        raise ValueError("`shuffle_seed` and `sort_by_length` are exclusive: pick one order.")
    order = None
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(arrays["token_ids"]))
    elif sort_by_length:
        order = np.argsort(arrays["padding_mask"].sum(axis=1), kind="stable")
    if order is not None:
        arrays = collections.OrderedDict((k, v[order]) for k, v in arrays.items())
    if drop_remainder:
        # Cut the arrays rather than `batch(drop_remainder=True)`, which would make
        # the batch dimension static and break the `[None, T]` spec.
        keep = len(arrays["token_ids"]) // batch_size * batch_size
        arrays = collections.OrderedDict((k, v[:keep]) for k, v in arrays.items())
    dataset = tf.data.Dataset.from_tensor_slices(arrays).batch(batch_size)
    spec = batch_spec(sequence_length)
    if not all(dataset.element_spec[k].is_compatible_with(spec[k]) for k in BATCH_KEYS):
        raise AssertionError(f"element_spec {dataset.element_spec} does not match {spec}.")
    return dataset


def build_generation_inputs(
    examples: Sequence[Example],
    *,
    tokenizer: TextTokenizer,
    template: PromptTemplate,
    max_prompt_length: int,
    num_positive_examples: int = 0,
    truncation: Truncation = Truncation.TRUNCATE,
) -> GenerationSet:
    """Prompts for greedy decoding and their references.

    Returns:
      `fedprompt.evaluation.GenerationSet`: `input_ids` `[N, max_prompt_length]`
      int32 with each prompt right-aligned (left-padded with `pad_token_id`), as
      `PromptTunedLM.greedy_generate` expects; `input_lengths` `[N]`; all reference
      outputs per example; `xlingual` (output language not English); example ids.
      The prompts are exactly the prompt parts of `encode_examples`' rows when the
      same truncation applies.
    """
    template = _check_template(template)
    truncation = Truncation(truncation)
    _check_k(num_positive_examples)
    _check_length("max_prompt_length", max_prompt_length)
    encoder = _Encoder(tokenizer)
    encoder.prefetch(
        [
            p
            for e in examples
            for p in _pieces(e, template, min(num_positive_examples, len(e.positive_examples)))
        ]
    )
    prompts, kept = [], []
    for example in examples:
        try:
            prompt, _ = _fit(
                example,
                encoder=encoder,
                template=template,
                num_positive_examples=num_positive_examples,
                limit=max_prompt_length,
                limit_name="max_prompt_length",
                with_target=False,
                truncation=truncation,
            )
        except SequenceTooLongError:
            if truncation is Truncation.SKIP:
                continue
            raise
        prompts.append(prompt)
        kept.append(example)
    input_ids, input_lengths = left_pad(
        prompts, pad_token_id=int(tokenizer.pad_token_id), width=max_prompt_length
    )
    return GenerationSet(
        input_ids=input_ids,
        input_lengths=input_lengths,
        references=tuple(tuple(e.outputs) for e in kept),
        xlingual=tuple(any(language != "English" for language in e.output_language) for e in kept),
        example_ids=tuple(e.example_id for e in kept),
    )
