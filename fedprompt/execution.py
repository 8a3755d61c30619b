"""The one place that owns TFF's execution context and the processes behind it.

TFF's local C++ context starts a `worker_binary` child that inherits stdout and
outlives the Python driver unless it is stopped (DESIGN.md section 5, trap 1):
`python x.py | tail` and CI steps then hang. Every entry point (driver, tests,
benchmarks) enters `local_context()`, which resets the context on exit and stops
every `worker_binary` descendant of this process by pid.

Scale-out: `remote_context(addresses)` runs every computation over TFF's C++
`worker_binary` services at `host:port` addresses (started with
`python -m fedprompt.worker --port=N` on each host), splitting a round's clients
across them with TFF's mergeable execution context; `local_workers(n)` starts n
such workers on 127.0.0.1 and stops them by pid on exit. A worker that stops
answering fails the call with `WorkerError` naming it, instead of TFF's default
of retrying forever.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import logging
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import grpc
import psutil
import tensorflow_federated as tff
from tensorflow_federated.python.core.impl.context_stack import runtime_error_context

# Private TFF helpers used by `_OrderedMergeableContext`; the stack is pinned at 0.87.
from tensorflow_federated.python.core.impl.execution_contexts import (
    mergeable_comp_execution_context as mergeable,
)

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


def _wait_until_exited(procs: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Waits (without reaping) until `procs` have exited; returns the ones still running.

    Not reaping matters: TFF's own `ServiceManager.__del__` later signals and
    `wait()`s on its worker; a zombie answers both at once, a reaped pid makes
    `os.kill` fail with ProcessLookupError inside `__del__`.
    """
    deadline = time.monotonic() + timeout
    alive = list(procs)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _is_running(p)]
        if alive:
            time.sleep(0.05)
    return alive


def _is_running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _stop_without_reaping(procs: Sequence[psutil.Process], timeout: float) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    for proc in _wait_until_exited(procs, timeout):
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _wait_until_exited(procs, timeout)


def stop_worker_processes(timeout: float = 5.0) -> int:
    """SIGTERMs (then SIGKILLs) every worker_binary this process started, and reaps them.

    Returns the number of processes that were stopped.
    """
    workers = _worker_children()
    _stop_without_reaping(workers, timeout)
    psutil.wait_procs(workers, timeout=timeout)
    return len(workers)


def _drop_context() -> None:
    tff.framework.set_default_context(runtime_error_context.RuntimeErrorContext())
    _close_remote_contexts()
    gc.collect()


def reset_context() -> None:
    """Stops this process's workers, then drops the TFF context (and its executors).

    Workers are stopped first because dropping TFF's local context runs
    `ServiceManager.__del__`, which SIGINTs its worker_binary and waits for it
    with no timeout. A driver started as a background job (`cmd &` in a script,
    nohup) inherits SIGINT as ignored and so does its worker, which then never
    exits: the driver hung there after personalization (seen twice, with the
    results not yet written). A stopped (zombie) worker makes that
    wait return at once.
    """
    _stop_without_reaping(_worker_children(), timeout=2.0)
    _drop_context()
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


# ----------------------------------------------------------------------------- scale-out

logger = logging.getLogger("fedprompt")

# gRPC caps one message at 2**31 - 1 bytes; TFF's own local context asks for 2 GB.
MAX_GRPC_MESSAGE_MB = 2047
DEFAULT_GRPC_MAX_MESSAGE_MB = 2000
DEFAULT_WORKER_TIMEOUT_S = 60.0

_HOST = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_]([A-Za-z0-9._-]*[A-Za-z0-9_])?)$")


class WorkerError(RuntimeError):
    """A TFF worker is unreachable or failed a call; `addresses` names the worker(s)."""

    def __init__(self, message: str, addresses: Sequence[str] = ()):
        super().__init__(message)
        self.addresses = tuple(addresses)


def parse_worker_addresses(value) -> tuple[str, ...]:
    """`"host:port,host:port"` (or a sequence of them) -> validated addresses.

    Raises:
      ValueError: an address is not `host:port` with a port in 1-65535, or is
        repeated, or none is given; the message names the offending entry.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    addresses: list[str] = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not (sep and _HOST.match(host) and port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(
                f"{item!r} is not host:port with a port in 1-65535 (e.g. 10.0.0.2:8000, [::1]:8000)"
            )
        if item in addresses:
            raise ValueError(f"{item!r} is listed twice (each worker once)")
        addresses.append(item)
    if not addresses:
        raise ValueError("no worker address given (e.g. 10.0.0.2:8000,10.0.0.3:8000)")
    return tuple(addresses)


def _grpc_options(max_message_mb: int) -> list[tuple[str, int]]:
    size = int(max_message_mb) * 1024 * 1024
    size = min(size, 2**31 - 1)
    return [
        ("grpc.max_message_length", size),
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
    ]


def _describe_grpc_error(error: Exception) -> str:
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    if callable(code) and callable(details):
        with contextlib.suppress(Exception):
            name = getattr(code(), "name", code())
            return f"{name}: {details()}"
    return f"{type(error).__name__}: {error}"


class _WorkerStub(tff.framework.RemoteExecutorGrpcStub):
    """TFF's gRPC stub, except that failures name the worker and are final.

    TFF retries UNAVAILABLE forever (its remote contexts expect workers to be
    restarted under them); a worker that died mid-round loses the round's
    values anyway, so the program stops and resumes from its checkpoint.
    """

    def __init__(self, channel: grpc.Channel, address: str):
        super().__init__(channel)
        self.address = address

    def _call(self, method: Callable, request):
        try:
            return method(request)
        except (grpc.RpcError, tff.framework.RetryableError) as e:
            raise WorkerError(
                f"TFF worker {self.address} failed: {_describe_grpc_error(e)}", [self.address]
            ) from e

    def get_executor(self, request):
        return self._call(super().get_executor, request)

    def create_value(self, request):
        return self._call(super().create_value, request)

    def create_struct(self, request):
        return self._call(super().create_struct, request)

    def create_call(self, request):
        return self._call(super().create_call, request)

    def create_selection(self, request):
        return self._call(super().create_selection, request)

    def compute(self, request):
        return self._call(super().compute, request)

    # Disposal on a worker that is gone has nothing left to free; raising there
    # (often from a finalizer) would only hide the error that matters.
    def dispose(self, request):
        with contextlib.suppress(grpc.RpcError, tff.framework.RetryableError):
            return super().dispose(request)

    def dispose_executor(self, request):
        with contextlib.suppress(grpc.RpcError, tff.framework.RetryableError):
            return super().dispose_executor(request)


class _WorkerContext(tff.framework.AsyncContext):
    """TFF's async context on one remote worker, on an event loop of its own.

    TFF's remote executor makes blocking gRPC calls inside its coroutines, so
    contexts sharing one event loop (as the mergeable context's do) would run
    their workers one after another; a loop thread per worker runs them at once.
    """

    def __init__(self, address: str, *, max_message_mb: int):
        self.address = address
        self._channel = grpc.insecure_channel(address, _grpc_options(max_message_mb))
        stub = _WorkerStub(self._channel, address)

        def stack_fn(cardinalities):
            # As TFF's local factory: a computation without CLIENTS arguments
            # still needs a CLIENTS cardinality on the worker.
            cardinalities.setdefault(tff.CLIENTS, 0)
            executor = tff.framework.RemoteExecutor(stub)
            executor.set_cardinalities(cardinalities)
            return executor

        self._context = tff.framework.AsyncExecutionContext(
            executor_fn=tff.framework.ResourceManagingExecutorFactory(executor_stack_fn=stack_fn),
            compiler_fn=tff.backends.native.desugar_and_transform_to_native,
            transform_args=tff.tensorflow.transform_args,
            transform_result=tff.tensorflow.transform_result,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"tff-worker-{address}", daemon=True
        )
        self._thread.start()

    async def invoke(self, comp, arg):
        future = asyncio.run_coroutine_threadsafe(self._context.invoke(comp, arg), self._loop)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5.0)
        with contextlib.suppress(Exception):
            self._channel.close()


class _OrderedMergeableContext(tff.framework.MergeableCompExecutionContext):
    """TFF's mergeable context, but with results in client order and a fixed merge order.

    TFF 0.87 concatenates the CLIENTS-placed results of the subrounds in the order
    the workers *finish*, so a per-client result (the personalization sweep) can
    come back permuted across clients, and it merges partial aggregates in
    completion order, so float sums depend on timing. Here every subround runs at
    once and the results are taken in submission order: the same output as local
    execution, every run.
    """

    def invoke(self, comp, arg=None):
        if not isinstance(comp, mergeable.MergeableCompForm):
            comp = self._compiler_pipeline.compile(comp)
        if arg is not None:
            arg = mergeable.MergeableCompExecutionContextValue(
                arg, comp.up_to_merge.type_signature.parameter, self._num_subrounds
            )
        result = self._async_runner.run_coro_and_return_result(self._invoke(comp, arg))
        return tff.types.type_to_py_container(result, comp.after_merge.type_signature.result)

    async def _invoke(self, comp, arg):
        contexts = list(self._async_execution_contexts)
        args = arg.value() if arg is not None else [None] * len(contexts)
        # One slice per worker: the value is split into at most num_subrounds ==
        # len(contexts) slices.
        pairs = list(zip(args, contexts))
        partials = await asyncio.gather(
            *(context.invoke(comp.up_to_merge, a) for a, context in pairs)
        )
        merged = partials[0]
        for partial in partials[1:]:
            merged = await contexts[0].invoke(
                comp.merge, tff.structure.Struct.unnamed(merged, partial)
            )

        def after_merge(a, context):
            return context.invoke(
                comp.after_merge,
                merged if a is None else tff.structure.Struct.unnamed(a, merged),
            )

        result_type = comp.after_merge.type_signature.result
        if tff.types.contains_only(
            result_type,
            lambda t: not isinstance(t, tff.types.FederatedType) or t.all_equal,
        ):
            # Nothing per client in the result: every slice would return the same.
            return await after_merge(args[0], contexts[0])
        results = await asyncio.gather(*(after_merge(a, context) for a, context in pairs))
        return mergeable._repackage_partitioned_values(list(results), result_type_spec=result_type)


_remote_contexts: list[_WorkerContext] = []


def _close_remote_contexts() -> None:
    while _remote_contexts:
        _remote_contexts.pop().close()


def remote_worker_addresses() -> tuple[str, ...]:
    """The workers of the remote contexts created since the last reset."""
    return tuple(c.address for c in _remote_contexts)


def unreachable_workers(addresses: Sequence[str], *, timeout: float = 5.0) -> list[str]:
    """The addresses whose gRPC server does not answer within `timeout` seconds."""

    def answers(address: str) -> bool:
        with grpc.insecure_channel(address) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=timeout)
                return True
            except grpc.FutureTimeoutError:
                return False

    # Probed at once, so n dead workers cost one timeout, not n.
    results: dict[str, bool] = {}
    threads = [
        threading.Thread(target=lambda a=a: results.__setitem__(a, answers(a)), daemon=True)
        for a in addresses
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [a for a in addresses if not results.get(a, False)]


def wait_for_workers(
    addresses: Sequence[str], *, timeout: float = DEFAULT_WORKER_TIMEOUT_S
) -> None:
    """Returns once every worker answers; raises `WorkerError` naming the others."""
    missing = unreachable_workers(addresses, timeout=timeout)
    if missing:
        raise WorkerError(
            f"TFF worker(s) {', '.join(missing)} did not answer within {timeout:g} s; start "
            "one with `python -m fedprompt.worker --port=PORT` on each host and check the host, "
            "port and firewall.",
            missing,
        )


def create_remote_context(
    addresses: Sequence[str], *, max_message_mb: int = DEFAULT_GRPC_MAX_MESSAGE_MB
) -> tff.framework.MergeableCompExecutionContext:
    """TFF's mergeable context over the workers at `addresses` (`host:port`).

    Each call's CLIENTS-placed arguments are split into one contiguous slice per
    worker, every slice runs up to the aggregation on its worker, and the partial
    aggregates are merged in worker order; computations without an aggregation (the
    personalization sweep) are split the same way. The frozen backbone is restored
    from disk inside the client computation, so its checkpoint path must be
    readable on every worker.
    """
    addresses = parse_worker_addresses(addresses)
    if not isinstance(max_message_mb, int) or not 0 < max_message_mb <= MAX_GRPC_MESSAGE_MB:
        raise ValueError(
            f"`max_message_mb` must be an integer in 1-{MAX_GRPC_MESSAGE_MB}, got {max_message_mb!r}."
        )
    contexts = [_WorkerContext(a, max_message_mb=max_message_mb) for a in addresses]
    _remote_contexts.extend(contexts)
    return _OrderedMergeableContext(
        async_contexts=contexts, compiler_fn=tff.backends.native.compile_to_mergeable_comp_form
    )


def set_remote_context(
    addresses: Sequence[str],
    *,
    max_message_mb: int = DEFAULT_GRPC_MAX_MESSAGE_MB,
    timeout: float = DEFAULT_WORKER_TIMEOUT_S,
) -> None:
    """Waits for the workers, then installs `create_remote_context(addresses)`."""
    addresses = parse_worker_addresses(addresses)
    wait_for_workers(addresses, timeout=timeout)
    tff.framework.set_default_context(
        create_remote_context(addresses, max_message_mb=max_message_mb)
    )


@contextlib.contextmanager
def remote_context(
    addresses: Sequence[str],
    *,
    max_message_mb: int = DEFAULT_GRPC_MAX_MESSAGE_MB,
    timeout: float = DEFAULT_WORKER_TIMEOUT_S,
) -> Iterator[None]:
    """Context manager form of `set_remote_context`; the workers keep running."""
    set_remote_context(addresses, max_message_mb=max_message_mb, timeout=timeout)
    try:
        yield
    finally:
        _drop_context()


class WorkerProcess(NamedTuple):
    """A `worker_binary` this process started on 127.0.0.1."""

    address: str
    process: subprocess.Popen
    log_path: str


def _log_tail(path: str, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        with open(path, errors="replace") as f:
            tail = [line.strip() for line in f.readlines()[-lines:] if line.strip()]
        return " | ".join(tail)
    return ""


def start_local_workers(
    num_workers: int,
    *,
    max_concurrent_computation_calls: int = -1,
    max_message_mb: int = DEFAULT_GRPC_MAX_MESSAGE_MB,
    timeout: float = DEFAULT_WORKER_TIMEOUT_S,
    log_dir: Optional[str] = None,
) -> list[WorkerProcess]:
    """Starts `num_workers` worker_binary processes on free ports; waits until they answer.

    They stay in this process's process group (a group kill takes them along) and
    are stopped by `stop_local_workers`, `reset_context` or exit. Raises
    `WorkerError` (after stopping every one it started) if one exits or does not
    answer within `timeout` seconds.
    """
    import portpicker

    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"`num_workers` must be an integer >= 1, got {num_workers!r}.")
    log_dir = log_dir or tempfile.mkdtemp(prefix="fedprompt-workers-")
    workers: list[WorkerProcess] = []
    try:
        for _ in range(num_workers):
            port = portpicker.pick_unused_port()
            log_path = os.path.join(log_dir, f"worker-{port}.log")
            with open(log_path, "wb") as log:
                # stdout to a file, never ours: a worker holding the driver's
                # stdout open makes `python x.py | tail` hang (trap 1).
                process = subprocess.Popen(
                    [
                        worker_binary_path(),
                        f"--port={port}",
                        f"--max_concurrent_computation_calls={max_concurrent_computation_calls}",
                        f"--grpc_max_message_length_megabytes={max_message_mb}",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            workers.append(WorkerProcess(f"127.0.0.1:{port}", process, log_path))
        deadline = time.monotonic() + timeout
        for worker in workers:
            while True:
                if worker.process.poll() is not None:
                    raise WorkerError(
                        f"local TFF worker {worker.address} exited with code "
                        f"{worker.process.returncode} while starting ({_log_tail(worker.log_path)}; "
                        f"log: {worker.log_path}).",
                        [worker.address],
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WorkerError(
                        f"local TFF worker {worker.address} did not answer within {timeout:g} s "
                        f"(log: {worker.log_path}); the machine may be overloaded.",
                        [worker.address],
                    )
                if not unreachable_workers([worker.address], timeout=min(1.0, left)):
                    break
    except BaseException:
        stop_local_workers(workers)
        raise
    logger.info("local TFF workers: %s", ", ".join(w.address for w in workers))
    return workers


def stop_local_workers(workers: Sequence[WorkerProcess], *, timeout: float = 5.0) -> None:
    """SIGTERMs (then SIGKILLs) the given workers by pid and reaps them."""
    for worker in workers:
        if worker.process.poll() is None:
            with contextlib.suppress(OSError):
                worker.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for worker in workers:
        try:
            worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                worker.process.kill()
            worker.process.wait()


@contextlib.contextmanager
def local_workers(num_workers: int, **kwargs) -> Iterator[tuple[str, ...]]:
    """`start_local_workers` as a context manager yielding the addresses."""
    workers = start_local_workers(num_workers, **kwargs)
    try:
        yield tuple(w.address for w in workers)
    finally:
        stop_local_workers(workers)


# The signal that `install_sigterm_handler`'s handler received, if any.
_received_signal: Optional[int] = None

# Seconds a terminated program may take to unwind before it is exited outright.
DEFAULT_SIGTERM_GRACE_S = 30.0


def install_sigterm_handler(*, grace_s: float = DEFAULT_SIGTERM_GRACE_S) -> None:
    """Makes SIGTERM stop this process's workers, then exit through `finally` blocks.

    atexit does not run when SIGTERM's default action kills a process, so a
    terminated driver would leave its worker_binary children running (trap 1).
    Call it from a program's entry point in the main thread, not at import, and
    end the program with `exit_status_after_sigterm` (see there).

    The handler raises `SystemExit(128 + signum)` wherever the main thread is,
    which is not always survivable: inside TF's tracing it can break a context
    manager's invariant and surface as `AssertionError: Concurrent access?`
    instead (seen in a driver stopped while it traced), and inside a `__del__`
    Python prints it and drops it. So the handler also records the signal for
    `exit_status_after_sigterm`, and after `grace_s` seconds a daemon thread
    exits the process with `128 + signum` in case the program went on.
    """

    def handle(signum, frame):
        del frame
        global _received_signal
        if _received_signal is None:
            _received_signal = signum
            threading.Thread(target=_exit_after, args=(grace_s, 128 + signum), daemon=True).start()
        stop_worker_processes(timeout=2.0)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handle)


def _exit_after(seconds: float, status: int) -> None:
    time.sleep(seconds)
    logger.error("still running %g s after SIGTERM; exiting with status %d", seconds, status)
    os._exit(status)


def exit_status_after_sigterm() -> Optional[int]:
    """`128 + signum` if `install_sigterm_handler`'s handler ran, else None.

    A program's entry point checks it last, in a `finally`, and raises
    `SystemExit` with it: whatever exception the signal turned into (or none, if
    it was dropped), a terminated program then exits with the status a shell
    expects from SIGTERM (143).
    """
    return None if _received_signal is None else 128 + _received_signal


# Safety net for programs that exit without leaving the context manager. Resetting
# (not only killing workers) also collects the executor TFF installs at import while
# the interpreter is whole; otherwise its __del__ fails at shutdown ("'NoneType'
# object has no attribute 'Popen'").
atexit.register(reset_context)
