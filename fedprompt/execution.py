"""The one place that owns TFF's execution context and the processes behind it.

TFF's local C++ context starts a `worker_binary` child that inherits stdout and
outlives the Python driver unless it is stopped (DESIGN.md section 5, trap 1):
`python x.py | tail` and CI steps then hang. Every entry point (driver, tests,
benchmarks) enters `local_context()`, which resets the context on exit and stops
every `worker_binary` descendant of this process by pid.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import signal
from typing import Iterator

import psutil
import tensorflow_federated as tff
from tensorflow_federated.python.core.impl.context_stack import runtime_error_context

WORKER_BINARY_NAME = "worker_binary"


def worker_binary_path() -> str:
    """Path of the C++ worker shipped inside the TFF wheel."""
    return os.path.join(os.path.dirname(tff.__file__), "data", WORKER_BINARY_NAME)


def _worker_children() -> list[psutil.Process]:
    try:
        children = psutil.Process(os.getpid()).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            if child.name() == WORKER_BINARY_NAME or WORKER_BINARY_NAME in " ".join(
                child.cmdline()[:1]
            ):
                found.append(child)
    return found


def stop_worker_processes(timeout: float = 5.0) -> int:
    """SIGTERMs (then SIGKILLs) every worker_binary this process started.

    Returns the number of processes that were stopped.
    """
    workers = _worker_children()
    for proc in workers:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(workers, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=timeout)
    return len(workers)


def reset_context() -> None:
    """Drops the current TFF context (and its executors) and stops workers."""
    tff.framework.set_default_context(runtime_error_context.RuntimeErrorContext())
    gc.collect()
    stop_worker_processes()


def set_local_context(*, max_concurrent_computation_calls: int = -1) -> None:
    """Installs TFF's local C++ context; `reset_context()` (or exit) undoes it.

    Args:
      max_concurrent_computation_calls: how many client computations the worker
        runs at once; <= 0 means no limit. Each concurrent SmolLM2 client holds
        about 1 GiB (DESIGN.md trap 7), so bound it for big backbones.
    """
    tff.backends.native.set_sync_local_cpp_execution_context(
        max_concurrent_computation_calls=max_concurrent_computation_calls
    )


@contextlib.contextmanager
def local_context(*, max_concurrent_computation_calls: int = -1) -> Iterator[None]:
    """Context manager form of `set_local_context` with guaranteed cleanup."""
    set_local_context(max_concurrent_computation_calls=max_concurrent_computation_calls)
    try:
        yield
    finally:
        reset_context()


# Safety net for programs that exit without leaving the context manager. Resetting
# (not only killing workers) also collects the executor TFF installs at import while
# the interpreter is whole; otherwise its __del__ fails at shutdown ("'NoneType'
# object has no attribute 'Popen'").
atexit.register(reset_context)
