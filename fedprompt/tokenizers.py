"""Eager text tokenizers over keras-nlp tokenizers (`fedprompt.data_types.TextTokenizer`).

keras-nlp tokenizers split special tokens only when they were built with
`unsplittable_tokens`, and their BPE pre-tokenizer keeps runs of digits together,
while SmolLM2's own tokenizer splits every digit before byte-level BPE (DESIGN.md
trap 8). `BPETextTokenizer` therefore does both in Python:

    text -> split on special tokens (mapped straight to their ids)
         -> optionally split every digit into its own piece
         -> one batched keras-nlp call on the remaining pieces -> ids

How a preset's tokenizer is wrapped (special tokens, eos/pad/bos, digit
splitting) is stored under `metadata.json["fedprompt"]["text_tokenizer"]` by
`fedprompt.backbones.preset_io.write_preset`; `load_text_tokenizer(preset_dir)`
reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping, Sequence

import keras_nlp
import tensorflow as tf

# Key of the wrapper settings inside a preset's metadata.json.
METADATA_KEY = "fedprompt"
TEXT_TOKENIZER_KEY = "text_tokenizer"


@dataclasses.dataclass(frozen=True)
class TextTokenizerSpec:
    """How to wrap a keras-nlp tokenizer; JSON-serialisable (stored in metadata.json).

    Attributes:
      special_tokens: tokens matched literally in the text and never passed to BPE
        (e.g. "<|im_start|>"); each must be in the vocabulary.
      eos_token: end of sequence / end of turn; generation stops on it.
      pad_token: padding token (may equal `eos_token`, as in GPT-2).
      bos_token: beginning-of-sequence token, or None when the model uses none.
      split_digits: pre-split every digit into its own piece (SmolLM2).
    """

    special_tokens: tuple[str, ...]
    eos_token: str
    pad_token: str
    bos_token: str | None = None
    split_digits: bool = False

    def __post_init__(self):
        # A list from JSON would make specs unequal and unhashable.
        object.__setattr__(self, "special_tokens", tuple(self.special_tokens))

    def to_json(self) -> dict[str, Any]:
        return {
            "special_tokens": list(self.special_tokens),
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "bos_token": self.bos_token,
            "split_digits": self.split_digits,
        }

    @classmethod
    def from_json(cls, config: Mapping[str, Any]) -> TextTokenizerSpec:
        return cls(
            special_tokens=tuple(config["special_tokens"]),
            eos_token=config["eos_token"],
            pad_token=config["pad_token"],
            bos_token=config.get("bos_token"),
            split_digits=bool(config.get("split_digits", False)),
        )


_DIGIT = re.compile(r"(\d)")


class BPETextTokenizer:
    """`TextTokenizer` over a keras-nlp tokenizer (eager Python; not for `tf.function`).

    Attributes:
      tokenizer: the wrapped keras-nlp tokenizer (e.g. `GPT2Tokenizer`,
        `BytePairTokenizer`).
      spec: the `TextTokenizerSpec` used.
      vocabulary_size, eos_token_id, pad_token_id, bos_token_id (or None),
      special_token_ids: frozenset of the ids of `spec.special_tokens`.
    """

    def __init__(self, tokenizer: keras_nlp.tokenizers.Tokenizer, *, spec: TextTokenizerSpec):
        self.tokenizer = tokenizer
        self.spec = spec
        self.vocabulary_size = int(tokenizer.vocabulary_size())
        self._special_to_id = {}
        for token in spec.special_tokens:
            self._special_to_id[token] = self._token_id(token, "special_tokens")
        for name in ("eos_token", "pad_token", "bos_token"):
            token = getattr(spec, name)
            if token is not None and token not in self._special_to_id:
                raise ValueError(
                    f"`spec.{name}` must be one of `spec.special_tokens`, got {token!r} "
                    f"(special tokens: {list(spec.special_tokens)}); add it to special_tokens."
                )
        self.eos_token_id = self._special_to_id[spec.eos_token]
        self.pad_token_id = self._special_to_id[spec.pad_token]
        self.bos_token_id = None if spec.bos_token is None else self._special_to_id[spec.bos_token]
        self.special_token_ids = frozenset(self._special_to_id.values())
        # Longest first so that a special token that prefixes another cannot win.
        ordered = sorted(spec.special_tokens, key=len, reverse=True)
        self._special_pattern = (
            re.compile("(" + "|".join(re.escape(t) for t in ordered) + ")") if ordered else None
        )

    def _token_id(self, token: str, argument: str) -> int:
        try:
            token_id = self.tokenizer.token_to_id(token)
        except KeyError:  # BytePairTokenizer raises, others return None or -1.
            token_id = None
        if token_id is None or int(token_id) < 0:
            raise ValueError(
                f"`{argument}` entry {token!r} is not in the tokenizer vocabulary "
                f"(size {self.vocabulary_size}); add it to the vocabulary or drop it."
            )
        return int(token_id)

    def _pieces(self, text: str) -> list[tuple[bool, str]]:
        """(is_special, piece) in text order; empty pieces dropped."""
        chunks = self._special_pattern.split(text) if self._special_pattern else [text]
        pieces = []
        for chunk in chunks:
            if not chunk:
                continue
            if chunk in self._special_to_id:
                pieces.append((True, chunk))
            elif self.spec.split_digits:
                pieces.extend((False, p) for p in _DIGIT.split(chunk) if p)
            else:
                pieces.append((False, chunk))
        return pieces

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, with one keras-nlp call for the whole batch."""
        all_pieces = [self._pieces(text) for text in texts]
        plain = [piece for pieces in all_pieces for special, piece in pieces if not special]
        encoded = iter(self.tokenizer.tokenize(tf.constant(plain)).to_list() if plain else [])
        outputs = []
        for pieces in all_pieces:
            ids: list[int] = []
            for special, piece in pieces:
                if special:
                    ids.append(self._special_to_id[piece])
                else:
                    ids.extend(int(i) for i in next(encoded))
            outputs.append(ids)
        return outputs

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text map to their ids."""
        return self.encode_batch([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens (and ids outside the vocabulary) are dropped."""
        kept = [
            int(i)
            for i in ids
            if int(i) not in self.special_token_ids and 0 <= int(i) < self.vocabulary_size
        ]
        if not kept:
            return ""
        text = self.tokenizer.detokenize(tf.constant(kept, tf.int32))
        # Byte-level BPE can end mid-character (e.g. a truncated generation).
        return text.numpy().decode("utf-8", errors="replace")

    def id_to_token(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(int(token_id))


def default_spec_for(tokenizer: keras_nlp.tokenizers.Tokenizer) -> TextTokenizerSpec:
    """A spec for a keras-nlp tokenizer whose preset carries no fedprompt metadata.

    Uses the tokenizer's own start/end/pad token attributes (keras-nlp's GPT-2,
    Llama, Gemma, ... tokenizers define them).
    """

    def token(attribute):
        token_id = getattr(tokenizer, attribute, None)
        return None if token_id is None else tokenizer.id_to_token(int(token_id))

    eos = token("end_token_id")
    if eos is None:
        raise ValueError(
            f"Cannot wrap {type(tokenizer).__name__}: it has no `end_token_id`; pass an "
            "explicit `TextTokenizerSpec(eos_token=...)`."
        )
    pad = token("pad_token_id") or eos
    bos = token("start_token_id")
    specials = tuple(dict.fromkeys(t for t in (eos, pad, bos) if t is not None))
    # GPT-2 reuses <|endoftext|> as start token; a BOS equal to EOS is not a BOS.
    return TextTokenizerSpec(
        special_tokens=specials,
        eos_token=eos,
        pad_token=pad,
        bos_token=None if bos == eos else bos,
    )


def load_text_tokenizer(preset_dir: str | os.PathLike) -> BPETextTokenizer:
    """The `BPETextTokenizer` of a local keras-nlp preset directory.

    Reads `tokenizer.json` + `assets/tokenizer/` with keras-nlp's own
    `Tokenizer.from_preset`, and the wrapper settings from
    `metadata.json["fedprompt"]["text_tokenizer"]` when present (else
    `default_spec_for`).
    """
    preset_dir = os.fspath(preset_dir)
    tokenizer = keras_nlp.tokenizers.Tokenizer.from_preset(preset_dir)
    with open(os.path.join(preset_dir, "metadata.json"), encoding="utf-8") as f:
        metadata = json.load(f)
    config = metadata.get(METADATA_KEY, {}).get(TEXT_TOKENIZER_KEY)
    spec = TextTokenizerSpec.from_json(config) if config else default_spec_for(tokenizer)
    return BPETextTokenizer(tokenizer, spec=spec)
