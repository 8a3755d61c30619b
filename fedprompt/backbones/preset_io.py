"""Writing and checking keras-nlp preset directories on Keras 2.

keras-nlp 0.12.1's `save_to_preset` refuses Keras 2 (`check_keras_3`), but its
`from_preset(local_dir)` reads a preset fine on Keras 2. `write_preset` writes the
same layout as keras_nlp/src/utils/preset_utils.py:

    <dir>/config.json            serialize_keras_object(backbone), no build/compile config
    <dir>/model.weights.h5       backbone weights (tf.keras HDF5 weights file)
    <dir>/tokenizer.json         serialize_keras_object(tokenizer)
    <dir>/assets/tokenizer/      tokenizer.save_assets (BPE: vocabulary.json, merges.txt)
    <dir>/metadata.json          keras_version, keras_nlp_version, parameter_count,
                                 date_saved (required by from_preset) and, under
                                 "fedprompt", our own metadata and the wrapper
                                 settings of the text tokenizer.

so that `keras_nlp.models.GPT2Backbone.from_preset(dir)` (or `LlamaBackbone`,
`Backbone`) and `keras_nlp.tokenizers.Tokenizer.from_preset(dir)` load it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Mapping, Union

import h5py
import keras
import keras_nlp
import numpy as np
import tensorflow as tf
from absl import logging
from keras.src.engine import keras_tensor
from keras.src.saving import saving_lib
from keras.src.utils import generic_utils
from keras_nlp.src.models.llama import llama_decoder
from tensorflow.python.autograph.core import ag_ctx

from fedprompt import tokenizers as tokenizers_lib

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
TOKENIZER_CONFIG_FILE = "tokenizer.json"
METADATA_FILE = "metadata.json"
# metadata.json["fedprompt"] key: the `WEIGHTS_FILE` dataset of each variable, in
# the order `load_backbone` creates them (see `weight_paths_in_creation_order`).
WEIGHT_PATHS_KEY = "weight_paths_in_creation_order"
TOKENIZER_ASSET_DIR = os.path.join("assets", "tokenizer")

PathLike = Union[str, os.PathLike]


class PresetError(ValueError):
    """A preset directory is missing a file or holds a corrupt one."""


class MissingPresetFileError(PresetError, FileNotFoundError):
    """A preset directory (or a file in it) does not exist."""


def default_cache_dir() -> pathlib.Path:
    """`$FEDPROMPT_CACHE`, else `$XDG_CACHE_HOME/fedprompt`, else `~/.cache/fedprompt`."""
    if os.environ.get("FEDPROMPT_CACHE"):
        return pathlib.Path(os.environ["FEDPROMPT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return pathlib.Path(base).expanduser() / "fedprompt"


@contextlib.contextmanager
def cache_entry_lock(path: PathLike):
    """Holds an exclusive lock on the cache entry `path` (a `<path>.lock` file).

    Several runs sharing one cache (a sweep, parallel tests, two terminals) would
    otherwise all build the same missing entry at once, wasting minutes of CPU
    each, and the later ones would find the directory already written. Callers
    check the entry again after acquiring the lock: the lock's previous holder may
    have built it.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _serialize(layer) -> dict[str, Any]:
    config = tf.keras.saving.serialize_keras_object(layer)
    # preset_utils.save_serialized_object drops these; from_preset rebuilds lazily.
    for key in ("build_config", "compile_config"):
        config.pop(key, None)
    return config


def _write_json(path: str, value: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)


def write_preset(
    directory: PathLike,
    *,
    backbone: tf.keras.Model,
    tokenizer: Union[tokenizers_lib.BPETextTokenizer, keras_nlp.tokenizers.Tokenizer],
    metadata: Mapping[str, Any],
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes `backbone` + `tokenizer` as a keras-nlp preset directory, atomically.

    The files are written to a temporary sibling directory that is renamed to
    `directory` at the end, so a crash never leaves a half-written preset that a
    cache would later trust.

    Args:
      directory: the preset directory to create.
      backbone: a built keras-nlp backbone (e.g. `GPT2Backbone`, `LlamaBackbone`).
      tokenizer: a `BPETextTokenizer` (its spec is stored too) or a keras-nlp tokenizer.
      metadata: JSON-serialisable metadata, stored under `metadata.json["fedprompt"]`.
      overwrite: replace an existing `directory`; if False an existing one is an error.

    Returns:
      `directory` as a `pathlib.Path`.
    """
    directory = pathlib.Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(
            f"`directory` {directory} already exists; pass overwrite=True to replace it "
            "or choose another directory."
        )
    if isinstance(tokenizer, tokenizers_lib.BPETextTokenizer):
        spec, keras_tokenizer = tokenizer.spec, tokenizer.tokenizer
    else:
        spec, keras_tokenizer = None, tokenizer
    fedprompt_metadata = dict(metadata)
    if spec is not None:
        fedprompt_metadata[tokenizers_lib.TEXT_TOKENIZER_KEY] = spec.to_json()
    json.dumps(fedprompt_metadata)  # Fail before writing anything if not serialisable.

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        _write_json(str(tmp / CONFIG_FILE), _serialize(backbone))
        backbone.save_weights(str(tmp / WEIGHTS_FILE))
        weight_paths = weight_paths_in_creation_order(backbone, tmp / WEIGHTS_FILE)
        if weight_paths is not None:
            fedprompt_metadata[WEIGHT_PATHS_KEY] = weight_paths
        _write_json(str(tmp / TOKENIZER_CONFIG_FILE), _serialize(keras_tokenizer))
        asset_dir = tmp / TOKENIZER_ASSET_DIR
        asset_dir.mkdir(parents=True)
        keras_tokenizer.save_assets(str(asset_dir))
        _write_json(
            str(tmp / METADATA_FILE),
            {
                "keras_version": keras.__version__,
                "keras_nlp_version": keras_nlp.__version__,
                "parameter_count": int(backbone.count_params()),
                "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
                tokenizers_lib.METADATA_KEY: fedprompt_metadata,
            },
        )
        if directory.exists():
            trash = pathlib.Path(
                tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent)
            )
            os.rename(directory, trash / directory.name)
            os.rename(tmp, directory)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


_FIX = "delete the directory and rebuild it (fedprompt rebuilds cached presets it finds invalid)"


def _read_json(directory: pathlib.Path, name: str) -> dict[str, Any]:
    path = directory / name
    if not path.is_file():
        raise MissingPresetFileError(
            f"Preset directory {directory} has no `{name}`; {_FIX}, or point at a complete "
            "keras-nlp preset directory."
        )
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PresetError(
            f"`{name}` in preset directory {directory} is not valid JSON ({e}); {_FIX}."
        ) from e
    if not isinstance(value, dict):
        raise PresetError(
            f"`{name}` in preset directory {directory} must hold a JSON object, got "
            f"{type(value).__name__}; {_FIX}."
        )
    return value


def validate_preset_dir(path: PathLike, *, require_tokenizer: bool = True) -> pathlib.Path:
    """Checks that `path` is a complete keras-nlp preset directory, cheaply.

    Checks existence and JSON syntax of config.json / metadata.json /
    tokenizer.json, the tokenizer assets listed by keras-nlp, and that
    model.weights.h5 is a readable HDF5 file with weights in it. Whether the
    weights match the architecture is only known by loading them: see
    `load_backbone`.

    Raises:
      MissingPresetFileError: the directory or a required file is missing.
      PresetError: a file is corrupt.
    """
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise MissingPresetFileError(
            f"Preset directory {directory} does not exist (or is not a directory); pass the "
            "path of a keras-nlp preset directory (with config.json, model.weights.h5, "
            "metadata.json, tokenizer.json, assets/)."
        )
    config = _read_json(directory, CONFIG_FILE)
    if "registered_name" not in config or "config" not in config:
        raise PresetError(
            f"`{CONFIG_FILE}` in preset directory {directory} is not a serialized keras-nlp "
            f"backbone (needs `registered_name` and `config`); {_FIX}."
        )
    metadata = _read_json(directory, METADATA_FILE)
    if "keras_version" not in metadata:
        raise PresetError(
            f"`{METADATA_FILE}` in preset directory {directory} lacks `keras_version`, which "
            f"keras-nlp's from_preset requires; {_FIX}."
        )
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise MissingPresetFileError(
            f"Preset directory {directory} has no `{WEIGHTS_FILE}`; {_FIX}."
        )
    try:
        with h5py.File(weights, "r") as f:
            if not list(f.keys()):
                raise PresetError(f"`{WEIGHTS_FILE}` holds no weights")
    except (OSError, PresetError) as e:
        raise PresetError(
            f"`{WEIGHTS_FILE}` in preset directory {directory} is corrupt or truncated ({e}); "
            f"{_FIX}."
        ) from e
    if require_tokenizer:
        tokenizer_config = _read_json(directory, TOKENIZER_CONFIG_FILE)
        try:
            layer = tf.keras.saving.deserialize_keras_object(tokenizer_config)
        except Exception as e:  # Keras raises many types for a bad config.
            raise PresetError(
                f"`{TOKENIZER_CONFIG_FILE}` in preset directory {directory} does not describe "
                f"a keras-nlp tokenizer ({e}); {_FIX}."
            ) from e
        for asset in getattr(layer, "file_assets", None) or []:
            if not (directory / TOKENIZER_ASSET_DIR / asset).is_file():
                raise MissingPresetFileError(
                    f"Preset directory {directory} has no tokenizer asset "
                    f"`{os.path.join(TOKENIZER_ASSET_DIR, asset)}`; {_FIX}."
                )
    return directory


def read_metadata(path: PathLike) -> dict[str, Any]:
    """fedprompt's metadata of a preset (`metadata.json["fedprompt"]`; {} if absent)."""
    return _read_json(pathlib.Path(path), METADATA_FILE).get(tokenizers_lib.METADATA_KEY, {})


def _zero_initial_value(next_creator, **kwargs):
    shape, dtype = kwargs.get("shape"), kwargs.get("dtype")
    if shape is not None and dtype is not None and callable(kwargs.get("initial_value")):
        kwargs["initial_value"] = lambda: tf.zeros(shape, dtype)
    return next_creator(**kwargs)


# Transformer blocks whose output, when a backbone's constructor calls them (no
# cache arguments), is a tensor of the input's shape and the layer's compute
# dtype, and whose `build` creates every variable. Not GPT-2's
# `keras_nlp.layers.TransformerDecoder`: its attention builds the key/value
# projections on the first call.
_SHAPE_PRESERVING_BLOCKS = (llama_decoder.LlamaTransformerDecoder,)
_BLOCK_CACHE_ARGUMENTS = ("self_attention_cache", "cross_attention_cache")


def _build_without_tracing(original):
    """`Layer._infer_output_signature` that builds shape-preserving blocks untraced.

    Constructing a functional model calls every layer on symbolic inputs, which
    traces the layer's whole `call` into a scratch graph only to learn the output
    shape (about 400 ops per Llama block). For the transformer blocks of
    `_SHAPE_PRESERVING_BLOCKS` the shape is the input's, so this builds the layer
    (its variables, under the same name scope as Keras uses) and returns that
    spec; every other layer, and any block call with a cache argument, is traced
    as usual. The layers, their connectivity and their variables (names, order)
    are those of the traced construction (tests/test_preset_io.py).
    """

    def infer_output_signature(self, inputs, args, kwargs, input_masks):
        if (
            not isinstance(self, _SHAPE_PRESERVING_BLOCKS)
            or args
            or any(kwargs.get(name) is not None for name in _BLOCK_CACHE_ARGUMENTS)
            or not isinstance(inputs, keras_tensor.KerasTensor)
        ):
            return original(self, inputs, args, kwargs, input_masks)
        scratch_graph = tf.__internal__.FuncGraph(f"{self.name}_build_graph")
        with scratch_graph.as_default(), keras.backend.name_scope(self._name_scope()):
            placeholder = keras_tensor.keras_tensor_to_placeholder(inputs)
            self._maybe_build(placeholder)
        return keras_tensor.KerasTensor(tf.TensorSpec(inputs.shape, self.compute_dtype))

    return infer_output_signature


@contextlib.contextmanager
def fast_construction():
    """Builds keras-nlp backbones about 10x faster, for weights that are overwritten anyway.

    Three costs of constructing a Keras 2 functional model go: autograph
    converting every layer `call` (keras-nlp layers are written for backends
    without autograph, so construction works without it; later `tf.function`
    tracing still converts), tracing each transformer block only to learn its
    output shape (`_build_without_tracing`), and the random initialisers
    (variables start at zero). Use only when every weight is loaded or assigned
    afterwards. Not thread-safe: it swaps a `tf.keras.layers.Layer` method for
    the duration of the block.
    """
    original = keras.layers.Layer._infer_output_signature
    keras.layers.Layer._infer_output_signature = _build_without_tracing(original)
    try:
        with (
            ag_ctx.ControlStatusCtx(status=ag_ctx.Status.DISABLED),
            tf.variable_creator_scope(_zero_initial_value),
        ):
            yield
    finally:
        keras.layers.Layer._infer_output_signature = original


def _h5_weight_paths(model: tf.keras.Model) -> dict[int, str]:
    """`id(variable)` -> its dataset in a Keras 2 `.weights.h5` file of `model`.

    Mirrors `keras.src.saving.saving_lib._save_state`: the same walk over
    trackables and containers, and `Layer.save_own_variables`' numbering of a
    layer's own trainable then non-trainable weights. A layer that numbers its
    weights otherwise is caught by the value check of the caller.
    """
    paths: dict[int, str] = {}
    visited: set[int] = set()

    def visit(trackable, inner_path):
        if id(trackable) in visited:
            return
        if isinstance(trackable, tf.keras.layers.Layer):
            own = trackable._trainable_weights + trackable._non_trainable_weights
            for i, variable in enumerate(own):
                paths.setdefault(id(variable), "/".join(filter(None, [inner_path, "vars", str(i)])))
        visited.add(id(trackable))
        for attr, child in saving_lib._walk_trackable(trackable):
            if saving_lib._is_keras_trackable(child):
                visit(child, tf.io.gfile.join(inner_path, attr))
            elif isinstance(child, (list, dict, tuple, set)):
                visit_container(child, tf.io.gfile.join(inner_path, attr))

    def visit_container(container, inner_path):
        used_names: dict[str, int] = {}
        for trackable in list(container.values()) if isinstance(container, dict) else container:
            if not saving_lib._is_keras_trackable(trackable) or id(trackable) in visited:
                continue
            name = generic_utils.to_snake_case(trackable.__class__.__name__)
            if name in used_names:
                used_names[name] += 1
                name = f"{name}_{used_names[name]}"
            else:
                used_names[name] = 0
            visit(trackable, tf.io.gfile.join(inner_path, name))

    visit(model, "")
    return paths


def _construct_from_config(config: Mapping[str, Any]) -> tf.keras.Model:
    return tf.keras.saving.deserialize_keras_object(dict(config))


def weight_paths_in_creation_order(
    backbone: tf.keras.Model, weights_file: PathLike
) -> list[str] | None:
    """The `weights_file` dataset of each variable, in the order a rebuild creates them.

    `load_backbone` then builds the backbone with every variable initialised
    straight from its dataset: no zero-filled variables overwritten by
    `load_weights`, and no walk over the model (2.7 s -> 1.6 s for SmolLM2).
    The order is taken from an actual rebuild of `backbone`'s config under
    `fast_construction`, the way `load_backbone` builds it, and each path is
    checked against the file: `backbone`'s variable at that path must hold
    exactly the stored values. Returns None (load_backbone then uses
    `load_weights`) if any check fails.
    """
    created: list[tf.Variable] = []

    def record(next_creator, **kwargs):
        variable = next_creator(**kwargs)
        if not is_step_counter(kwargs):
            created.append(variable)
        return variable

    with fast_construction(), tf.variable_creator_scope(record):
        rebuilt = _construct_from_config(_serialize(backbone))
    rebuilt_paths = _h5_weight_paths(rebuilt)
    original_paths = _h5_weight_paths(backbone)
    by_path = {path: v for v in backbone.weights if (path := original_paths.get(id(v)))}
    paths = [rebuilt_paths.get(id(v)) for v in created]
    if None in paths or len(set(paths)) != len(paths) or set(paths) != set(by_path):
        return None
    with h5py.File(weights_file, "r") as f:
        for path in paths:
            if path not in f or not np.array_equal(f[path][()], by_path[path].numpy()):
                return None
    return paths


def is_step_counter(kwargs) -> bool:
    """Whether a variable creator's `kwargs` make one of Keras' train/test/predict
    counters (int64 scalars), which are not model weights and are never saved."""
    dtype = kwargs.get("dtype")
    return dtype is not None and tf.as_dtype(dtype) == tf.int64


class _CreationOrderMismatch(Exception):
    pass


def _build_with_stored_weights(
    directory: pathlib.Path, config: Mapping[str, Any], paths: list[str]
) -> tf.keras.Model:
    """Builds the backbone with each variable's initial value read from the weights file."""
    remaining = iter(paths)
    with h5py.File(directory / WEIGHTS_FILE, "r") as f:

        def initialise_from_file(next_creator, **kwargs):
            if is_step_counter(kwargs):
                return next_creator(**kwargs)
            path = next(remaining, None)
            value = f[path][()] if path is not None and path in f else None
            if value is None or list(value.shape) != list(tf.TensorShape(kwargs.get("shape"))):
                raise _CreationOrderMismatch(path)
            kwargs["initial_value"] = value
            return next_creator(**kwargs)

        with fast_construction(), tf.variable_creator_scope(initialise_from_file):
            backbone = _construct_from_config(config)
    if next(remaining, None) is not None:
        raise _CreationOrderMismatch("fewer variables than stored")
    return backbone


def load_backbone(path: PathLike) -> tf.keras.Model:
    """The keras-nlp backbone of a local preset directory, weights loaded.

    Same result as `keras_nlp.models.Backbone.from_preset(path)`, built under
    `fast_construction`. Presets that fedprompt wrote record each variable's
    dataset in creation order (`weight_paths_in_creation_order`), so their
    variables start from the stored values; any other preset, or one whose
    record does not fit its config, loads with `load_weights`. Raises
    `PresetError` naming `model.weights.h5` when the weights do not load into
    the architecture of config.json.
    """
    directory = validate_preset_dir(path, require_tokenizer=False)
    config = _read_json(directory, CONFIG_FILE)
    paths = read_metadata(directory).get(WEIGHT_PATHS_KEY)
    try:
        if isinstance(paths, list) and paths:
            try:
                return _build_with_stored_weights(directory, config, paths)
            except _CreationOrderMismatch as e:
                # Only slower: the standard path below loads it or names what is wrong.
                logging.warning(
                    "%s: the %s record in %s does not fit %s (%s); loading the weights "
                    "with load_weights instead.",
                    directory, WEIGHT_PATHS_KEY, METADATA_FILE, CONFIG_FILE, e,
                )  # fmt: skip
        with fast_construction():
            backbone = _construct_from_config(config)
        backbone.load_weights(str(directory / WEIGHTS_FILE))
        return backbone
    except (ValueError, OSError, KeyError) as e:
        raise PresetError(
            f"`{WEIGHTS_FILE}` in preset directory {directory} does not load into the "
            f"backbone described by `{CONFIG_FILE}` ({type(e).__name__}: {e}); {_FIX}."
        ) from e


def load_preset(
    path: PathLike,
) -> tuple[tf.keras.Model, tokenizers_lib.BPETextTokenizer]:
    """(backbone, text tokenizer) of a local keras-nlp preset directory."""
    directory = validate_preset_dir(path)
    return load_backbone(directory), tokenizers_lib.load_text_tokenizer(directory)


def weights_fingerprint(path: PathLike) -> str:
    """SHA-256 of a preset's weight values, for telling backbones apart.

    Hashes every dataset of `model.weights.h5` (its path, dtype, shape and bytes) in
    path order, so unlike the file's own bytes it does not depend on when or how the
    file was written: two presets with equal weights have equal fingerprints. Runs
    record it (`config.json["resolved_backbone"]`) because a cache key does not pin
    the weights: `tiny` is pre-trained on first use on each machine, and float
    rounding differs between CPUs and kernels.
    """
    digest = hashlib.sha256()
    with h5py.File(pathlib.Path(path) / WEIGHTS_FILE, "r") as weights:
        names = []
        weights.visititems(
            lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None
        )
        for name in sorted(names):
            array = np.ascontiguousarray(weights[name][()])
            digest.update(f"{name}|{array.dtype.str}|{array.shape}\n".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def is_valid_preset_dir(path: PathLike) -> bool:
    try:
        validate_preset_dir(path)
    except PresetError:
        return False
    return True
