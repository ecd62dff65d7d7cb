"""Secrets from systemd's `LoadCredential=` (in $CREDENTIALS_DIRECTORY), then the environment.

A unit says `LoadCredential=SPK_ADMIN_TOKEN:/etc/spk-core/admin-token`; systemd copies the file to
a private, read-only directory only this service can read and sets CREDENTIALS_DIRECTORY. A
credential named like one of our variables stands in for it, so the secret never has to be in the
process environment (inherited by every child, shown by `systemctl show`, readable in
/proc/PID/environ). The result is a plain dict for the caller to pass on explicitly: nothing is
written back into os.environ.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from shared.errors import StoreError


def with_credentials(environ: Mapping[str, str], names: Iterable[str]) -> dict[str, str]:
    """`environ` plus, for each of `names` present as a credential file, its content (stripped)."""
    merged = dict(environ)
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return merged
    for name in names:
        path = Path(directory) / name
        try:
            merged[name] = path.read_text().strip()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StoreError(f"cannot read credential {path}: {exc.strerror}") from None
    return merged


def environ_with_credentials(names: Iterable[str]) -> dict[str, str]:
    return with_credentials(os.environ, names)
