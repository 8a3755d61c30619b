"""Remote TFF workers: equality with local execution, worker death and resume, flags.

Every worker here is a `worker_binary` on 127.0.0.1 started by the driver
(`--local_workers`) or by the test through `fedprompt.execution`; nothing else is
dialled.
"""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from absl.testing import flagsaver

import run_experiment
from fedprompt import execution
from fedprompt.backbones import tiny
from tests.test_driver import SMALL

REPO = pathlib.Path(__file__).resolve().parent.parent

# As tests/test_driver.py's TINY_RUN, with fewer evaluation clients where the
# test is about rounds, not the personalization sweep.
RUN = [
    "--num_clients=4",
    "--clients_per_round=2",
    "--synthetic_instances_per_task=10",
    "--global_test_per_category=1",
    "--max_global_test_examples=4",
    "--max_local_test_examples=3",
    "--sequence_length=64",
    "--max_new_tokens=3",
    "--prompt_length=2",
    "--batch_size=4",
    "--checkpoint_every=1",
    "--personalization_learning_rates=0.3",
    "--l2_strengths=1.0",
    "--interpolation_alphas=0.5",
]
# Three evaluation clients over two workers split 2 + 1: a per-client result in
# the wrong order would show in personalization.csv.
SWEEP = [
    "--num_validation_clients=1",
    "--num_test_clients=2",
    "--eval_every=1",
    "--personalization_epochs=0,1",
]
QUICK = [
    "--num_validation_clients=0",
    "--num_test_clients=1",
    "--eval_every=100",
    "--personalization_epochs=0",
]


@pytest.fixture(scope="module")
def small_preset(tmp_path_factory):
    return tiny.build_tiny(output_dir=tmp_path_factory.mktemp("preset") / "small", config=SMALL)


def _command(args):
    return [sys.executable, str(REPO / "run_experiment.py"), *args]


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))


def _run(args, cwd):
    return subprocess.run(
        _command(args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300
    )


def _run_all(runs, cwd):
    procs = [
        subprocess.Popen(
            _command(args),
            cwd=cwd,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in runs
    ]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [
        subprocess.CompletedProcess(p.args, p.returncode, out, err)
        for p, (out, err) in zip(procs, outputs)
    ]


def _workers_on(ports):
    """worker_binary processes (anyone's) serving one of `ports`."""
    flags = {f"--port={p}" for p in ports}
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["name"] == execution.WORKER_BINARY_NAME and flags & set(cmdline):
            found.append(proc)
    return found


def _worker_ports(stdout):
    match = re.search(r"TFF workers: (.+)", stdout)
    assert match, stdout
    return [int(a.rsplit(":", 1)[1]) for a in match.group(1).split(", ")]


def test_local_workers_match_single_process_and_leave_nothing(small_preset, tmp_path):
    common = [f"--backbone={small_preset}", *RUN, *SWEEP, "--rounds=2"]
    # Both at once: most of a tiny run is single-threaded start-up and tracing.
    local, remote = _run_all(
        [
            [*common, f"--output_dir={tmp_path / 'local'}"],
            [*common, "--local_workers=2", f"--output_dir={tmp_path / 'remote'}"],
        ],
        tmp_path,
    )
    assert local.returncode == 0, local.stderr[-3000:]
    assert remote.returncode == 0, remote.stderr[-3000:]

    ports = _worker_ports(remote.stdout)
    assert len(ports) == 2
    assert not _workers_on(ports), "the driver left its local workers running"
    np.testing.assert_allclose(
        np.load(tmp_path / "remote" / "final_prompt.npy"),
        np.load(tmp_path / "local" / "final_prompt.npy"),
        atol=1e-6,
    )
    # Per-client personalization results come back in client order.
    local_rows = (tmp_path / "local" / "personalization.csv").read_text().splitlines()
    remote_rows = (tmp_path / "remote" / "personalization.csv").read_text().splitlines()
    assert len(local_rows) == 1 + 3 * 3 * 2
    assert remote_rows == local_rows


def test_killed_worker_is_named_and_the_rerun_resumes(small_preset, tmp_path):
    out = tmp_path / "run"
    common = [f"--backbone={small_preset}", *RUN, *QUICK, "--rounds=3", f"--output_dir={out}"]
    workers = execution.start_local_workers(2)
    spare = []
    try:
        victim = workers[1]
        driver = subprocess.Popen(
            _command([*common, f"--tff_workers={','.join(w.address for w in workers)}"]),
            cwd=tmp_path,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            lines = []
            for line in driver.stdout:
                lines.append(line)
                if line.startswith("round 1/3"):
                    # Round 1 is checkpointed before its line is printed.
                    os.kill(victim.process.pid, signal.SIGKILL)
                    break
            _, stderr = driver.communicate(timeout=120)
        finally:
            if driver.poll() is None:
                driver.kill()
        assert victim.process.wait(timeout=10) == -signal.SIGKILL, "".join(lines)
        assert driver.returncode == 2, stderr[-3000:]
        error = stderr.strip().splitlines()[-1]
        match = re.match(
            r"error: round (\d+)(?: \(evaluation\))?: TFF worker\(s\) (\S+) stopped answering .*"
            r"the program state saved after round (\d+) is intact",
            error,
        )
        assert match, error
        failed, named, saved = int(match[1]), match[2], int(match[3])
        assert named == victim.address
        assert failed >= 2 and saved == failed - 1
        assert f"program_state_{saved}" in os.listdir(out / "checkpoints")

        # The worker is back (a new one, on another port): the rerun resumes.
        spare = execution.start_local_workers(1)
        addresses = f"{workers[0].address},{spare[0].address}"
        rerun = _run([*common, f"--tff_workers={addresses}"], tmp_path)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert f"resuming from the program state saved after round {saved}" in rerun.stdout
        rounds = (out / "rounds.csv").read_text().splitlines()[1:]
        assert [int(r.split(",")[0]) for r in rounds] == [1, 2, 3]
        assert (out / "final_prompt.npy").is_file()
    finally:
        execution.stop_local_workers([*workers, *spare])
    assert not _workers_on([int(w.address.rsplit(":", 1)[1]) for w in [*workers, *spare]])


def test_sigterm_stops_the_drivers_local_workers(small_preset, tmp_path):
    stderr = open(tmp_path / "stderr.txt", "w")  # noqa: SIM115 (closed below)
    driver = subprocess.Popen(
        _command(
            [
                f"--backbone={small_preset}",
                *RUN,
                *QUICK,
                "--rounds=50",
                "--local_workers=2",
                f"--output_dir={tmp_path / 'run'}",
            ]
        ),
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    try:
        # SIGTERM as soon as the workers are up: the driver is then tracing.
        seen = ""
        for line in driver.stdout:
            seen += line
            if line.startswith("TFF workers:"):
                break
        ports = _worker_ports(seen)
        assert len(_workers_on(ports)) == 2
        driver.send_signal(signal.SIGTERM)
        returncode = driver.wait(timeout=60)
        stderr.close()
        assert returncode == 128 + signal.SIGTERM, (tmp_path / "stderr.txt").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
        stderr.close()
    deadline = time.monotonic() + 10
    while _workers_on(ports) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _workers_on(ports), "SIGTERM left the driver's workers running"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(tff_workers=["localhost"]), "--tff_workers: 'localhost' is not host:port"),
        (dict(tff_workers=["127.0.0.1:0"]), "port in 1-65535"),
        (dict(tff_workers=["127.0.0.1:70000"]), "port in 1-65535"),
        (dict(tff_workers=["127.0.0.1:x"]), "--tff_workers: '127.0.0.1:x' is not host:port"),
        (dict(tff_workers=["127.0.0.1:9", "127.0.0.1:9"]), "listed twice"),
        (
            dict(tff_workers=["127.0.0.1:9"], local_workers=2),
            "--local_workers: cannot be combined with --tff_workers",
        ),
        (dict(local_workers=-1), "--local_workers: must be an integer >= 0"),
        (dict(local_workers=1, grpc_max_message_mb=0), "--grpc_max_message_mb: must be"),
        (dict(local_workers=1, grpc_max_message_mb=4096), "--grpc_max_message_mb: must be"),
        (dict(grpc_max_message_mb=100), "--grpc_max_message_mb: is only used with"),
        (dict(local_workers=1, worker_timeout=0.0), "--worker_timeout: must be"),
        (dict(max_concurrent_clients=0), "--max_concurrent_clients: must be an integer >= 1"),
        (
            dict(tff_workers=["127.0.0.1:9"], max_concurrent_clients=2),
            "--max_concurrent_clients: cannot reach workers started elsewhere",
        ),
    ],
)
def test_bad_worker_flags_exit_with_one_line(overrides, message, tmp_path, capsys):
    with flagsaver.flagsaver(output_dir=str(tmp_path / "out"), **overrides):
        assert run_experiment.main(["run_experiment.py"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_unreachable_worker_fails_before_the_backbone(tmp_path, capsys):
    import portpicker

    address = f"127.0.0.1:{portpicker.pick_unused_port()}"  # nobody listens there
    with flagsaver.flagsaver(
        output_dir=str(tmp_path / "out"), tff_workers=[address], worker_timeout=0.5
    ):
        assert run_experiment.main(["run_experiment.py"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"--tff_workers: TFF worker(s) {address} did not answer within 0.5 s" in err, err
    assert "python -m fedprompt.worker --port=PORT" in err
    assert not (tmp_path / "out" / "config.json").exists()


def test_parse_worker_addresses():
    assert execution.parse_worker_addresses("127.0.0.1:1, host-2.example:65535,[::1]:80") == (
        "127.0.0.1:1",
        "host-2.example:65535",
        "[::1]:80",
    )
    for bad in ("", "127.0.0.1", ":80", "h:0", "h:65536", "h:-1", "a b:1", "h:1,h:1"):
        with pytest.raises(ValueError):
            execution.parse_worker_addresses(bad)


def test_worker_module_rejects_a_taken_port():
    from fedprompt import worker

    workers = execution.start_local_workers(1)
    try:
        port = int(workers[0].address.rsplit(":", 1)[1])
        assert worker.main([f"--port={port}"]) == 2
        assert worker.build_worker_command(port=8000)[1:] == [
            "--port=8000",
            "--max_concurrent_computation_calls=-1",
            f"--grpc_max_message_length_megabytes={execution.DEFAULT_GRPC_MAX_MESSAGE_MB}",
        ]
        with pytest.raises(SystemExit):
            worker.parse_args(["--port=0"])
    finally:
        execution.stop_local_workers(workers)
    assert workers[0].process.returncode is not None


def test_worker_module_serves_until_sigterm():
    import portpicker

    port = portpicker.pick_unused_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedprompt.worker", f"--port={port}"],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        execution.wait_for_workers([f"127.0.0.1:{port}"], timeout=60)
        # The module became the worker (execv): same pid, no Python parent left.
        assert psutil.Process(proc.pid).name() == execution.WORKER_BINARY_NAME
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
