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
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Mapping, Union

import h5py
import keras
import keras_nlp
import tensorflow as tf
from tensorflow.python.autograph.core import ag_ctx

from fedprompt import tokenizers as tokenizers_lib

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
TOKENIZER_CONFIG_FILE = "tokenizer.json"
METADATA_FILE = "metadata.json"
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


@contextlib.contextmanager
def fast_construction():
    """Builds Keras models about 4x faster, for weights that are overwritten anyway.

    Keras 2 autograph-converts every layer `call` while constructing a functional
    model (about 15 s of an 18 s `LlamaBackbone` build for SmolLM2 on 2 cores);
    keras-nlp layers are written for backends without autograph, so construction
    works without it (later `tf.function` tracing still converts). Variables start
    at zero instead of running the random initialisers (135M values). Use only
    when every weight is loaded or assigned afterwards.
    """
    with (
        ag_ctx.ControlStatusCtx(status=ag_ctx.Status.DISABLED),
        tf.variable_creator_scope(_zero_initial_value),
    ):
        yield


def load_backbone(path: PathLike) -> tf.keras.Model:
    """The keras-nlp backbone of a local preset directory, weights loaded.

    Same result as `keras_nlp.models.Backbone.from_preset(path)`, built under
    `fast_construction`. Raises `PresetError` naming `model.weights.h5` when the
    weights do not load into the architecture of config.json.
    """
    directory = validate_preset_dir(path, require_tokenizer=False)
    try:
        with fast_construction():
            backbone = tf.keras.saving.deserialize_keras_object(_read_json(directory, CONFIG_FILE))
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


def is_valid_preset_dir(path: PathLike) -> bool:
    try:
        validate_preset_dir(path)
    except PresetError:
        return False
    return True
