"""Teardown of TFF's execution context never waits forever on a worker."""

import os
import pathlib
import signal
import stat
import subprocess
import sys
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


# A program that installs the handler, then gets SIGTERM inside a `__del__`,
# where Python prints the handler's SystemExit and drops it.
_SIGTERM_IN_DEL = """\
import os, signal, sys, time
from fedprompt import execution

execution.install_sigterm_handler(grace_s=float(sys.argv[1]))

class SignalsItselfOnDeletion:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # bytecode runs: the handler fires here
            pass

obj = SignalsItselfOnDeletion()
del obj
print("went on after SIGTERM", flush=True)
if sys.argv[2] == "check":
    status = execution.exit_status_after_sigterm()
    raise SystemExit(status)
time.sleep(60)  # the program went on working; only the grace timer ends it
"""


def _run_sigterm_in_del(tmp_path, grace_s, ending):
    script = tmp_path / "sigterm_in_del.py"
    script.write_text(_SIGTERM_IN_DEL)
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parent.parent))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(script), str(grace_s), ending],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return done, time.monotonic() - started


def test_sigterm_dropped_in_a_del_still_gives_its_exit_status(tmp_path):
    done, _ = _run_sigterm_in_del(tmp_path, grace_s=60, ending="check")
    # The signal's SystemExit was dropped (the program went on) ...
    assert "went on after SIGTERM" in done.stdout
    assert "SystemExit: 143" in done.stderr
    # ... and the end-of-program check still exits as terminated.
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]


def test_sigterm_grace_timer_ends_a_program_that_went_on(tmp_path):
    done, seconds = _run_sigterm_in_del(tmp_path, grace_s=1, ending="sleep")
    assert "went on after SIGTERM" in done.stdout
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert "still running 1 s after SIGTERM" in done.stderr
    # Well before the program's own 60 s sleep ends.
    assert seconds < 50


def test_exit_status_is_none_without_a_signal():
    assert execution.exit_status_after_sigterm() is None
