"""SNI task data for fedprompt: loader, synthetic suite, federated partitions, tf.data.

`tasks.sni`, `tasks.synthetic` and `tasks.partition` need only numpy and are
imported here; `tasks.preprocess` (TensorFlow, fedprompt) is loaded on first use of
its names, and `tasks.tfds_sni` (tensorflow-datasets) only when imported.
"""

from tasks.partition import (
    EvaluationClient,
    Example,
    FederatedSplit,
    PartitionScheme,
    TrainClient,
    build_federated_split,
    examples_from_tasks,
    partition_statistics,
)
from tasks.sni import (
    SniCollection,
    SniFormatError,
    SniInstance,
    SniPositiveExample,
    SniTask,
    load_sni,
    open_sni,
    write_category_index,
)
from tasks.synthetic import generate_synthetic_suite, synthetic_task_names, write_synthetic_suite

_PREPROCESS_NAMES = (
    "SequenceTooLongError",
    "Truncation",
    "build_dataset",
    "build_generation_inputs",
    "encode_example",
    "encode_examples",
    "format_example",
)


def __getattr__(name):
    if name in _PREPROCESS_NAMES:
        from tasks import preprocess

        return getattr(preprocess, name)
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")


__all__ = [
    "EvaluationClient",
    "Example",
    "FederatedSplit",
    "PartitionScheme",
    "SniCollection",
    "SniFormatError",
    "SniInstance",
    "SniPositiveExample",
    "SniTask",
    "TrainClient",
    "build_federated_split",
    "examples_from_tasks",
    "generate_synthetic_suite",
    "load_sni",
    "open_sni",
    "partition_statistics",
    "synthetic_task_names",
    "write_category_index",
    "write_synthetic_suite",
    *_PREPROCESS_NAMES,
]
