"""`python -I core/install/pip_guard.py PARENT_PID pip ARGS...`: run pip, die with the core.

The resolver starts pip through this module so that the kernel SIGKILLs pip when the core
process ends (prctl PR_SET_PDEATHSIG): a SIGKILLed core otherwise left pip resolving on its own
for up to its network timeouts (docs/reliability.md, fault 3). It runs in the child's own
interpreter, after exec; a preexec_fn would run Python between fork and exec, which is unsafe
with grpc's threads. Run by path (core/install/pip_resolver.py), it imports only the standard
library and pip, never the core.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, module = int(sys.argv[1]), sys.argv[2]
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the core died before the line above took effect
        sys.exit(70)
    del sys.argv[1:3]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
