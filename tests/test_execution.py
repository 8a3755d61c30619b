"""Teardown of TFF's execution context never waits forever on a worker."""

import os
import signal
import stat
import subprocess
import textwrap
import time

import psutil
import tensorflow_federated as tff

from fedprompt import execution


class _ContextOwningAWorker(tff.framework.SyncContext):
    """Holds a child the way TFF's local context does (ServiceManager.__del__).

    Dropping the context SIGINTs the child and waits for it with no timeout,
    exactly like `local_cpp_executor_factory`'s ServiceManager.
    """

    def __init__(self, process: subprocess.Popen):
        self.process = process

    def invoke(self, comp, arg):  # pragma: no cover - never called
        raise NotImplementedError

    def __del__(self):
        os.kill(self.process.pid, signal.SIGINT)
        self.process.wait()


def _start_sigint_ignoring_worker(tmp_path) -> subprocess.Popen:
    # The kernel names a script's process after the script's file, so this child
    # is found the way a real worker_binary is.
    script = tmp_path / execution.WORKER_BINARY_NAME
    script.write_text(
        textwrap.dedent(
            """\
            #!/bin/sh
            trap '' INT
            echo ready
            i=0
            while [ $i -lt 60 ]; do sleep 1; i=$((i + 1)); done
            """
        )
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    process = subprocess.Popen([str(script)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def test_reset_context_stops_a_worker_that_ignores_sigint(tmp_path):
    process = _start_sigint_ignoring_worker(tmp_path)
    assert psutil.Process(process.pid).name() == execution.WORKER_BINARY_NAME
    tff.framework.set_default_context(_ContextOwningAWorker(process))

    started = time.monotonic()
    try:
        execution.reset_context()
    finally:
        # The session's shared local context (conftest) was dropped with ours.
        execution.set_local_context()

    # Without stopping the worker first, reset_context blocks in __del__ for the
    # child's whole 60 s loop.
    assert time.monotonic() - started < 30
    assert process.returncode is not None
    assert not psutil.pid_exists(process.pid) or (
        psutil.Process(process.pid).status() == psutil.STATUS_ZOMBIE
    )
