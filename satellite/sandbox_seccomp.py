"""The seccomp filter behind `network = "none"`: no socket but AF_UNIX, no io_uring.

bubblewrap's network namespace already leaves nothing to talk to but the run's own loopback;
this filter makes "none" mean no IP socket at all (socket(2) fails with EAFNOSUPPORT), which is
what separates it from `loopback`. io_uring is refused too because IORING_OP_SOCKET creates
sockets without the socket syscall. Classic BPF, loaded by bwrap (`--seccomp FD`) after it has
set no_new_privs; a syscall of a foreign ABI (i386 via int 0x80, x32) fails with ENOSYS so it
cannot go around the filter.
"""

from __future__ import annotations

import errno
import platform
import socket
import struct

from shared.errors import SandboxUnavailable

_LD_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_RET = 0x06  # BPF_RET | BPF_K
_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000
_X32_BIT = 0x40000000
# seccomp_data: nr at 0, arch at 4, args[0] (low half, little endian) at 16
_NR, _ARCH, _ARG0 = 0, 4, 16
_IO_URING = (425, 426, 427)  # setup, enter, register: one numbering on every 64-bit ABI

# machine -> (AUDIT_ARCH_*, __NR_socket, has the x32 ABI beside it)
_ARCHES = {
    "x86_64": (0xC000003E, 41, True),
    "aarch64": (0xC00000B7, 198, False),
}


def supported() -> bool:
    return platform.machine() in _ARCHES


def no_network_filter() -> bytes:
    """The compiled filter (struct sock_filter[]) for this machine."""
    machine = platform.machine()
    if machine not in _ARCHES:
        raise SandboxUnavailable(
            f'network = "none" needs a seccomp filter for {machine}, which is not written yet'
            f' (x86_64 and aarch64 are); use network = "loopback" on this host'
        )
    arch, nr_socket, x32 = _ARCHES[machine]
    # (code, jump-if-true label, jump-if-false label, k); labels are resolved below.
    program: list[tuple[int, str | None, str | None, int]] = [
        (_LD_ABS, None, None, _ARCH),
        (_JEQ, None, "foreign", arch),
        (_LD_ABS, None, None, _NR),
    ]
    if x32:
        program.append((_JGE, "foreign", None, _X32_BIT))
    program += [(_JEQ, "no_uring", None, nr) for nr in _IO_URING]
    program += [
        (_JEQ, None, "allow", nr_socket),
        (_LD_ABS, None, None, _ARG0),
        (_JEQ, "allow", "no_family", socket.AF_UNIX),
    ]
    returns = {
        "allow": _ALLOW,
        "no_family": _ERRNO | errno.EAFNOSUPPORT,
        "no_uring": _ERRNO | errno.ENOSYS,
        "foreign": _ERRNO | errno.ENOSYS,
    }
    at = {label: len(program) + i for i, label in enumerate(returns)}
    out = []
    for i, (code, jt, jf, k) in enumerate(program):
        # A jump offset counts instructions after the jump itself; 0 falls through.
        true = at[jt] - i - 1 if jt else 0
        false = at[jf] - i - 1 if jf else 0
        out.append(struct.pack("=HBBI", code, true, false, k))
    out += [struct.pack("=HBBI", _RET, 0, 0, value) for value in returns.values()]
    return b"".join(out)
