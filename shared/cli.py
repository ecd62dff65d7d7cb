"""What both command-line entry points share: logging setup and errors as one-line exits."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from shared.errors import SpkError
from shared.logs import setup_logging


def run_command(
    prog: str, log_level: str, command: Callable[[], int | None], log_format: str = "text"
) -> int:
    """Run `command` with logging set up; SpkError becomes a one-line message and exit 1."""
    setup_logging(log_level, log_format)
    # grpcio and fork: our subprocesses are spawned, never forked from a live channel.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    try:
        return command() or 0
    except SpkError as exc:
        if log_format == "json":  # a JSON log stays one object per line, to the end
            logging.getLogger(prog).error("%s", exc.message)
        else:
            print(f"{prog}: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
