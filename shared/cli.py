"""What both command-line entry points share: logging setup and errors as one-line exits."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from shared.errors import SpkError


def run_command(prog: str, log_level: str, command: Callable[[], int | None]) -> int:
    """Run `command` with logging set up; SpkError becomes a one-line message and exit 1."""
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request's full URL at INFO and httpcore every step at DEBUG: the query
    # of a presigned blob URL is a bearer secret, and the steps are noise. Our own code logs
    # what an operator needs (the host, the outcome).
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # grpcio and fork: our subprocesses are spawned, never forked from a live channel.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    try:
        return command() or 0
    except SpkError as exc:
        print(f"{prog}: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
