"""Binary patches between two versions of a wheel: zstd with the old wheel as a prefix.

    make_patch(base, target)        the core, once per (base, target) pair, in a worker thread
    apply_patch(base, chunks, out)  a satellite, streaming: the output goes to a hashing writer

This is `zstd --long --patch-from=BASE TARGET`: the base is referenced as a raw-content *prefix*
(ZSTD_CCtx_refPrefix), so long-distance matching indexes the whole base and a match may reach
back into it; the window must cover base + target, so the patch records a window of
2**window_log bytes and the decoder refuses a frame whose window is larger than it allows (the
memory bound on both sides). A patch is only a transport: whatever comes out is checked against
the signed manifest's size and sha256 by the caller before it is used.

Library: the standard library's `compression.zstd` (Python 3.14+) or its backport
`backports.zstd` (same API) on older interpreters; see pyproject.toml for why not python-zstandard.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable

from shared.errors import IntegrityError

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

MIN_WINDOW_LOG = 10  # zstd's own minimum
DEFAULT_MAX_WINDOW_LOG = 27  # 128 MiB: base + target up to that; the decoder's bound too
DEFAULT_LEVEL = 19  # see docs/storage.md "Deltas" for the level/size/time trade-off
OUT_CHUNK = 1024 * 1024  # bytes handed to `out` per call while applying


class PatchError(IntegrityError):
    """A patch that cannot be made within the limits, or cannot be applied."""


PatchBase = zstd.ZstdDict


def patch_base(data: bytes) -> PatchBase:
    """The base as zstd holds it (a copy): build it from a temporary, so the caller's bytes
    can go and a 17 MB wheel costs 17 MB once, not twice."""
    return zstd.ZstdDict(data, is_raw=True)


def _base(base: bytes | PatchBase) -> PatchBase:
    return base if isinstance(base, zstd.ZstdDict) else patch_base(base)


def window_log_for(base_size: int, target_size: int) -> int:
    """The smallest window (log2) that lets the target reference every byte of the base."""
    return max(MIN_WINDOW_LOG, math.ceil(math.log2(max(1, base_size + target_size))))


def make_patch(
    base: bytes | PatchBase,
    target: bytes,
    level: int = DEFAULT_LEVEL,
    max_window_log: int = DEFAULT_MAX_WINDOW_LOG,
) -> tuple[bytes, int]:
    """(patch, window_log): a zstd frame that turns `base` into `target`.

    PatchError when base + target need a window beyond `max_window_log` (memory grows with it).
    """
    base_size = len(base.dict_content) if isinstance(base, zstd.ZstdDict) else len(base)
    window_log = window_log_for(base_size, len(target))
    if window_log > max_window_log:
        raise PatchError(
            f"base ({base_size} bytes) + target ({len(target)} bytes) need a 2**{window_log}"
            f" window; the limit is 2**{max_window_log}"
        )
    prefix = _base(base).as_prefix
    options: dict[int, int] = {
        zstd.CompressionParameter.compression_level: level,
        zstd.CompressionParameter.window_log: window_log,
        zstd.CompressionParameter.enable_long_distance_matching: 1,
        zstd.CompressionParameter.content_size_flag: 1,
    }
    compressor = zstd.ZstdCompressor(options=options, zstd_dict=prefix)
    compressor.set_pledged_input_size(len(target))
    patch = compressor.compress(target, mode=zstd.ZstdCompressor.FLUSH_FRAME)
    return patch, window_log


def apply_patch(
    base: bytes | PatchBase,
    patch: Iterable[bytes],
    out: Callable[[bytes], None],
    max_window_log: int = DEFAULT_MAX_WINDOW_LOG,
    max_output: int | None = None,
) -> int:
    """Decode `patch` (chunks, in order) against `base`, handing the result to `out` in pieces
    of at most OUT_CHUNK bytes; returns the bytes produced. PatchError on any failure: a
    corrupt or truncated frame, trailing data, a window above the bound, more than
    `max_output` bytes (a frame that never ends)."""
    prefix = _base(base).as_prefix
    decoder = zstd.ZstdDecompressor(
        zstd_dict=prefix, options={zstd.DecompressionParameter.window_log_max: max_window_log}
    )
    produced = 0

    def emit(data: bytes) -> None:
        nonlocal produced
        if not data:
            return
        produced += len(data)
        if max_output is not None and produced > max_output:
            raise PatchError(f"the patch produces more than the expected {max_output} bytes")
        out(data)

    try:
        for chunk in patch:
            if decoder.eof:
                if chunk:
                    raise PatchError("data after the end of the patch frame")
                continue
            emit(decoder.decompress(chunk, max_length=OUT_CHUNK))
            while not decoder.eof and not decoder.needs_input:
                emit(decoder.decompress(b"", max_length=OUT_CHUNK))
    except zstd.ZstdError as exc:
        raise PatchError(f"the patch does not decode against its base: {exc}") from None
    if not decoder.eof:
        raise PatchError("the patch ended before its frame did (truncated)")
    if decoder.unused_data:
        raise PatchError("data after the end of the patch frame")
    return produced
