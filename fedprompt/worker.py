r"""Serves one TFF worker for `run_experiment.py --tff_workers=host:port,...`.

  python -m fedprompt.worker --port=8000
  python -m fedprompt.worker --port=8000 --max_concurrent_computation_calls=2

The process becomes TFF's bundled C++ `worker_binary` (`os.execv`), so it has its
pid and its signals: SIGTERM or Ctrl-C stop it. It listens on every interface of
the host, unauthenticated and unencrypted: run it only on a trusted network.

Each worker restores the frozen backbone from `<output_dir>/frozen_backbone` of
the driver's run, at the same absolute path, so that directory must be readable
on every worker host (a shared filesystem), and the worker needs the same
fedprompt / TensorFlow / TFF install as the driver (docs/SCALING.md).
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from typing import Optional, Sequence

from fedprompt import execution


def build_worker_command(
    *,
    port: int,
    max_concurrent_computation_calls: int = -1,
    max_message_mb: int = execution.DEFAULT_GRPC_MAX_MESSAGE_MB,
) -> list[str]:
    """The `worker_binary` command line serving on `port` (all interfaces)."""
    return [
        execution.worker_binary_path(),
        f"--port={port}",
        f"--max_concurrent_computation_calls={max_concurrent_computation_calls}",
        f"--grpc_max_message_length_megabytes={max_message_mb}",
    ]


def _port_in_use(port: int) -> Optional[str]:
    # gRPC servers bind with SO_REUSEPORT, so a second worker on a taken port
    # would start and silently share its connections; a plain bind detects it.
    for family, address in ((socket.AF_INET6, ("::", port)), (socket.AF_INET, ("", port))):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind(address)
            return None
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return str(e.strerror)
            if e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                continue  # no IPv6 on this host: try IPv4
            return str(e.strerror)
    return None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fedprompt.worker",
        description="Serve TFF's C++ worker_binary for run_experiment.py --tff_workers.",
    )
    parser.add_argument("--port", type=int, required=True, help="TCP port (1-65535).")
    parser.add_argument(
        "--max_concurrent_computation_calls",
        type=int,
        default=-1,
        help="Client computations run at once (<= 0: no limit); about 1 GiB each for SmolLM2.",
    )
    parser.add_argument(
        "--grpc_max_message_mb",
        type=int,
        default=execution.DEFAULT_GRPC_MAX_MESSAGE_MB,
        help=f"Largest gRPC message in MB (1-{execution.MAX_GRPC_MESSAGE_MB}).",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be in 1-65535, got {args.port}.")
    if not 1 <= args.grpc_max_message_mb <= execution.MAX_GRPC_MESSAGE_MB:
        parser.error(
            f"--grpc_max_message_mb must be in 1-{execution.MAX_GRPC_MESSAGE_MB}, "
            f"got {args.grpc_max_message_mb}."
        )
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    in_use = _port_in_use(args.port)
    if in_use:
        print(
            f"error: --port={args.port} cannot be bound ({in_use}); pick a free port.",
            file=sys.stderr,
        )
        return 2
    command = build_worker_command(
        port=args.port,
        max_concurrent_computation_calls=args.max_concurrent_computation_calls,
        max_message_mb=args.grpc_max_message_mb,
    )
    print(f"fedprompt worker: TFF worker_binary on port {args.port} (all interfaces)", flush=True)
    # Replace this process rather than wrap it: no Python parent to forward
    # signals or to leave the worker orphaned.
    os.execv(command[0], command)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
