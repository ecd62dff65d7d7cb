"""Where and how the core reaches the package index: the settings type and its validation.

Pure: no I/O. The resolver, the index client and the stored registry config all use this type.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from shared.errors import InvalidArgument

TOKEN_LOGIN = "__token__"  # noqa: S105 - a well-known username, not a secret


@dataclass(frozen=True)
class RegistrySettings:
    """Where and how pip reaches the package index. Parsed once at the edge, passed in."""

    index_url: str = "https://pypi.org/simple"
    extra_index_urls: tuple[str, ...] = ()
    username: str = ""  # empty means the "__token__" convention (PyPI, devpi, Artifactory)
    token: str = field(default="", repr=False)  # secret: never in repr, logs, errors, argv
    timeout_seconds: int = 30  # per socket operation, passed to pip --timeout
    retries: int = 2  # pip's default of 5 with back-off turns "index down" into an 8 s wait

    @property
    def index_urls(self) -> tuple[str, ...]:
        return (self.index_url, *self.extra_index_urls)

    @property
    def login(self) -> str:
        return self.username or TOKEN_LOGIN

    def describe_index(self) -> str:
        extra = f" (+{len(self.extra_index_urls)} extra)" if self.extra_index_urls else ""
        return f"{self.index_url}{extra}"


# --------------------------------------------------------------------------- validation


def _check_url(url: str, field_name: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidArgument(field_name, "must be an http(s) URL such as https://pypi.org/simple")
    if parts.username is not None or parts.password is not None:
        # A URL is logged and shown everywhere; credentials belong in username/token.
        raise InvalidArgument(field_name, "must not contain credentials; set username and token")
    if any(ch.isspace() for ch in url):
        raise InvalidArgument(field_name, "must not contain whitespace")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        # The wheels' sha256s come from the index's pages: over plain http anyone on the path
        # could swap a wheel together with its hash, and a token would travel in clear text.
        raise InvalidArgument(
            field_name,
            f"plain http is only allowed for localhost (loopback), not {parts.hostname}; use"
            " https (the index's pages carry the hashes every wheel is checked against, and"
            " the token would travel in clear text)",
        )


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_secretish(value: str, field_name: str) -> None:
    # Spaces and quotes survive netrc quoting; control characters (newlines) would not.
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise InvalidArgument(field_name, "must not contain control characters")


def validate_settings(settings: RegistrySettings, prefix: str = "registry.") -> None:
    """Raise InvalidArgument naming the field (`prefix` + its name: SetRegistryConfig's
    request names them bare); messages never echo the token."""
    _check_url(settings.index_url, f"{prefix}index_url")
    for i, url in enumerate(settings.extra_index_urls):
        _check_url(url, f"{prefix}extra_index_urls[{i}]")
    _check_secretish(settings.username, f"{prefix}username")
    _check_secretish(settings.token, f"{prefix}token")
    if not 1 <= settings.timeout_seconds <= 600:
        raise InvalidArgument(f"{prefix}timeout_seconds", "must be between 1 and 600")
    if not 0 <= settings.retries <= 10:
        raise InvalidArgument(f"{prefix}retries", "must be between 0 and 10")
