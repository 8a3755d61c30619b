"""A frozen backbone that can be rebuilt inside a TFF computation.

Variables created inside a TFF computation are re-initialized by TFF's init op
on every call, so weights loaded at trace time are lost, and sending the
backbone through TFF would serialize it over gRPC every round. Instead the
backbone's variables are saved once, in creation order, to a TF checkpoint;
inside the computation the backbone is rebuilt from its config under a
`tf.variable_creator_scope` whose creator replaces each `initial_value` with the
matching `tf.raw_ops.RestoreV2` output. The weights then load inside the worker
from disk, at TFF's init, and never cross gRPC. The checkpoint path must be
readable by every TFF worker (same path on every host for remote workers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import tempfile
from typing import Callable

import keras_nlp
import tensorflow as tf
from keras.src.engine import base_layer_utils
from tensorflow.python.autograph.core import ag_ctx

from fedprompt.backbones import preset_io

MANIFEST_NAME = "manifest.json"
CHECKPOINT_PREFIX = "variables"
_BACKBONE_CLASSES = {
    "GPT2Backbone": keras_nlp.models.GPT2Backbone,
    "LlamaBackbone": keras_nlp.models.LlamaBackbone,
}


class FrozenCheckpointError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class FrozenBackbone:
    """Where a frozen backbone's weights live and how to rebuild it.

    Attributes:
      directory: holds `manifest.json` and the `variables.*` checkpoint files.
      class_name: keras-nlp backbone class (`GPT2Backbone` or `LlamaBackbone`).
      config: the backbone's `get_config()`.
      variable_shapes: shapes of the variables in creation order.
      variable_dtypes: dtype names of the variables in creation order.
    """

    directory: str
    class_name: str
    config: dict
    variable_shapes: tuple
    variable_dtypes: tuple

    @property
    def checkpoint_prefix(self) -> str:
        return os.path.join(self.directory, CHECKPOINT_PREFIX)

    def tensor_name(self, index: int) -> str:
        return f"v{index:05d}"


def _record_creation_order(build: Callable[[], tf.keras.Model]):
    created = []

    def creator(next_creator, **kwargs):
        variable = next_creator(**kwargs)
        created.append(variable)
        return variable

    with tf.variable_creator_scope(creator):
        model = build()
    return model, created


def save_frozen_backbone(backbone: tf.keras.Model, directory: str | os.PathLike) -> FrozenBackbone:
    """Saves `backbone`'s variables in creation order plus a manifest.

    Must run eagerly (before any TFF tracing in this process: DESIGN.md trap 2).
    Writes into a temporary directory and renames it into place.
    """
    class_name = type(backbone).__name__
    if class_name not in _BACKBONE_CLASSES:
        raise FrozenCheckpointError(
            f"Cannot freeze a {class_name}; supported: {sorted(_BACKBONE_CLASSES)}."
        )
    config = backbone.get_config()
    cls = _BACKBONE_CLASSES[class_name]
    # A fresh instance tells the creation order; `.weights` order is the same for
    # two instances of one config, so copy the trained values across by it.
    fresh, created = _record_creation_order(lambda: cls.from_config(config))
    fresh.set_weights(backbone.get_weights())
    # Eager Keras models also create int64 step counters (not weights, and not
    # created in graph mode): keep only the weights.
    weight_ids = {id(w) for w in fresh.weights}
    created = [v for v in created if id(v) in weight_ids]
    directory = pathlib.Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=directory.name + ".tmp", dir=directory.parent))
    names = [f"v{i:05d}" for i in range(len(created))]
    tf.raw_ops.SaveV2(
        prefix=str(tmp / CHECKPOINT_PREFIX),
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[v.read_value() for v in created],
    )
    manifest = {
        "format": "fedprompt-frozen-backbone/1",
        "class_name": class_name,
        "config": config,
        "variable_shapes": [list(v.shape) for v in created],
        "variable_dtypes": [v.dtype.name for v in created],
        "variable_names": [v.name for v in created],
    }
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return load_frozen_backbone(directory)


def load_frozen_backbone(directory: str | os.PathLike) -> FrozenBackbone:
    """Reads and validates a manifest written by `save_frozen_backbone`."""
    directory = pathlib.Path(directory)
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FrozenCheckpointError(
            f"Frozen backbone checkpoint {directory} has no {MANIFEST_NAME}; it is missing or "
            "incomplete. Delete it and rerun to rebuild it from the backbone preset."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise FrozenCheckpointError(
            f"{manifest_path} is not valid JSON ({e}); delete {directory} and rerun to rebuild it."
        ) from e
    if not list(directory.glob(CHECKPOINT_PREFIX + ".index")):
        raise FrozenCheckpointError(
            f"Frozen backbone checkpoint {directory} has no {CHECKPOINT_PREFIX}.index; delete "
            "the directory and rerun to rebuild it."
        )
    if manifest.get("class_name") not in _BACKBONE_CLASSES:
        raise FrozenCheckpointError(
            f"{manifest_path}: unknown class_name {manifest.get('class_name')!r}."
        )
    return FrozenBackbone(
        directory=str(directory.resolve()),
        class_name=manifest["class_name"],
        config=manifest["config"],
        variable_shapes=tuple(tuple(s) for s in manifest["variable_shapes"]),
        variable_dtypes=tuple(manifest["variable_dtypes"]),
    )


def fingerprint(frozen: FrozenBackbone) -> str:
    """A short content hash of the manifest (identifies the backbone in results)."""
    data = (pathlib.Path(frozen.directory) / MANIFEST_NAME).read_bytes()
    return hashlib.sha256(data).hexdigest()[:16]


@contextlib.contextmanager
def _fast_graph_construction():
    """Builds a Keras functional model in a TF1 graph about 15x faster, same graph values.

    Inside `tff.tensorflow.computation` (a TF1 graph, so Keras' v1 functional
    path), Keras evaluates every constant input of a raw TF op through a Session
    that it extends with the whole graph so far and re-initialises variables in
    (420 session calls, about 55 s of a 66 s SmolLM2 restore on 2 cores). Keras'
    own switch `_UNSAFE_GRAPH_OP_LAYER_CREATION` (what it does under XLA and
    tf.distribute) keeps those constants as graph tensors instead; its only
    downside, a model `get_config` cannot serialize, does not matter for a
    backbone rebuilt from its manifest. Autograph is off during construction only
    (as in `preset_io.fast_construction`); calls of the model are converted as
    usual. Restore then takes about 4 s; outputs are bit-identical (the test
    compares both ways). Private Keras 2.14 API: fine on the pinned stack.
    """
    previous = base_layer_utils._UNSAFE_GRAPH_OP_LAYER_CREATION
    base_layer_utils._UNSAFE_GRAPH_OP_LAYER_CREATION = True
    try:
        with ag_ctx.ControlStatusCtx(status=ag_ctx.Status.DISABLED):
            yield
    finally:
        base_layer_utils._UNSAFE_GRAPH_OP_LAYER_CREATION = previous


def restore_backbone(frozen: FrozenBackbone) -> tf.keras.Model:
    """Builds the backbone with every variable initialised from the checkpoint.

    Works eagerly and in graph mode (inside `tff.tensorflow.computation`), where
    the `RestoreV2` ops become the variables' initializers, so they run in the
    worker when TFF initializes the computation.
    """
    cls = _BACKBONE_CLASSES[frozen.class_name]
    index = [0]
    num_variables = len(frozen.variable_shapes)

    def creator(next_creator, **kwargs):
        if preset_io.is_step_counter(kwargs):
            return next_creator(**kwargs)
        i = index[0]
        if i >= num_variables:
            raise FrozenCheckpointError(
                f"Backbone {frozen.class_name} creates more variables than the "
                f"{num_variables} in {frozen.directory}; the checkpoint was written for a "
                "different keras-nlp version or config. Delete it and rerun."
            )
        index[0] += 1
        dtype = tf.as_dtype(frozen.variable_dtypes[i])
        restored = tf.raw_ops.RestoreV2(
            prefix=frozen.checkpoint_prefix,
            tensor_names=[frozen.tensor_name(i)],
            shape_and_slices=[""],
            dtypes=[dtype],
        )[0]
        restored = tf.ensure_shape(restored, frozen.variable_shapes[i])
        kwargs["initial_value"] = restored
        kwargs["trainable"] = False
        return next_creator(**kwargs)

    with tf.variable_creator_scope(creator), _fast_graph_construction():
        backbone = cls.from_config(frozen.config)
    if index[0] != num_variables:
        raise FrozenCheckpointError(
            f"Backbone {frozen.class_name} created {index[0]} variables but {frozen.directory} "
            f"holds {num_variables}; delete the checkpoint and rerun to rebuild it."
        )
    backbone.trainable = False
    return backbone
