"""Run a command where no user namespace can be created (for the sandbox's fail-closed tests).

    python -m tests.userns_denied COMMAND [ARGS...]

The command runs as root in a user namespace of its own (uids and gids 0-65535 mapped to
themselves, so every file looks and behaves as on the host) whose `user.max_user_namespaces` is
0: bwrap's `--unshare-user` fails there exactly as on a host that forbids user namespaces,
without touching the host's own setting (the limit is per user namespace).
"""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWUSER = 0x10000000
MAPPED = 65536


def main(argv: list[str]) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(go_w)
        if libc.unshare(CLONE_NEWUSER) != 0:
            os.write(2, f"unshare: {os.strerror(ctypes.get_errno())}\n".encode())
            os._exit(125)
        os.write(ready_w, b"u")
        os.read(go_r, 1)  # the parent has written our uid and gid maps
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
        os.execvp(argv[0], argv)
    os.close(ready_w)
    os.close(go_r)
    os.read(ready_r, 1)
    # Only a process of the parent namespace with CAP_SETUID may map more than its own uid.
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(f"0 0 {MAPPED}\n")
    os.write(go_w, b"g")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
