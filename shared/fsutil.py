"""Durable file publication: write next to the target, fsync, rename, fsync the directory."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Callable
from pathlib import Path

_SYNC_FILE_RANGE_WRITE = 2  # start writeback of dirty pages in the range; do not wait


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux: the final fsync does all the work
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    func.restype = ctypes.c_int
    result: Callable[[int, int, int, int], int] = func
    return result


_SYNC_FILE_RANGE = _load_sync_file_range()


def start_writeback(fd: int, offset: int = 0, nbytes: int = 0) -> None:
    """Ask the kernel to start writing a range (0 bytes: to the end) to disk, without waiting.

    Advisory (sync_file_range, Linux): it makes a later fsync short; a failure only means that
    fsync has more to do.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_file(tmp: Path, final: Path) -> None:
    """fsync `tmp`, rename it over `final`, then fsync the directory so the rename survives."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_bytes_atomic(final: Path, data: bytes, mode: int = 0o644) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        publish_file(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def _load_renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    try:
        func: Callable[[int, bytes, int, bytes, int], int] = ctypes.CDLL(
            None, use_errno=True
        ).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc older than glibc 2.28
        return None
    return func


_RENAMEAT2 = _load_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (renameat2 RENAME_EXCHANGE).

    Nobody ever sees either path missing, unlike two renames. False when the kernel, libc or
    file system cannot (the caller falls back); any other failure raises OSError.
    """
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
