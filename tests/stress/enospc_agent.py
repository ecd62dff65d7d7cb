"""`spk-satellite` with a simulated full disk, for hosts where a small tmpfs cannot be mounted.

    python -m tests.stress.enospc_agent agent ... --enospc-flag FILE ...

While FILE holds "full", every os.write to a file under the agent's --data-dir fails with ENOSPC
(blob downloads and wheel extraction both write through os.write); "ok" lets writes through
again. Everything else is the real CLI.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from satellite import cli


def main(argv: list[str]) -> int:
    at = argv.index("--enospc-flag")
    flag = Path(argv[at + 1])
    del argv[at : at + 2]
    data_dir = str(Path(argv[argv.index("--data-dir") + 1]).absolute())
    real_write = os.write

    def write(fd: int, data: bytes | memoryview) -> int:
        if flag.read_text().strip() == "full":
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if target.startswith(data_dir):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target)
        return real_write(fd, data)

    os.write = write  # type: ignore[assignment]
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
