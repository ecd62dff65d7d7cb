"""`python -I core/install/child_guard.py PARENT_PID PROGRAM ARGS...`: exec PROGRAM, dying with us.

The resolver starts uv through this module so that the kernel SIGKILLs it when the core process
ends (prctl PR_SET_PDEATHSIG, which survives exec): a SIGKILLed core otherwise left the resolver
running on its own for up to its network timeouts (docs/reliability.md, fault 3). It runs in
the child's own interpreter, after fork+exec; a preexec_fn would run Python between fork and
exec, which is unsafe with grpc's threads. Run by path, it imports only the standard library.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, program = int(sys.argv[1]), sys.argv[2]
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the core died before the line above took effect
        sys.exit(70)
    os.execv(program, [program, *sys.argv[3:]])  # noqa: S606 -- the resolver, by absolute path


if __name__ == "__main__":
    main()
