"""A child process that must not outlive its parent: the satellite's unpack workers.

`die_with_parent(pid)` runs first in the child (ProcessPoolExecutor's initializer): the kernel
then SIGKILLs it when the parent ends (prctl PR_SET_PDEATHSIG), so a SIGKILLed agent leaves no
worker writing into a staging dir the next agent is cleaning up. core/install/child_guard.py
does the same for the resolver, as a script of its own.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(70)
