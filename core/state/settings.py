"""Registry config and size cap: validation, and their rows (token encrypted with SecretBox)."""

from __future__ import annotations

import base64
import json
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, replace

from core.state import environments
from core.state.db import Setting, database_proxy, upsert
from core.state.index_config import RegistrySettings, validate_settings
from core.state.keys import SecretBox
from shared.errors import InvalidArgument
from shared.manifest import TargetEnvironment

REGISTRY_KEY = "registry"
SIZE_CAP_KEY = "size_cap"
MiB = 1024 * 1024
DEFAULT_WARN = 150 * MiB
DEFAULT_BLOCK = 300 * MiB
MAX_URL_LENGTH = 2048
MAX_CAP = 1 << 40  # 1 TiB: far above any install, far below what a sign error gives


@dataclass(frozen=True)
class SizeCap:
    warn_bytes: int = DEFAULT_WARN
    block_bytes: int = DEFAULT_BLOCK


@dataclass(frozen=True)
class RegistryConfig:
    """What is stored; `settings.token` is the decrypted secret and never leaves the core."""

    settings: RegistrySettings


@dataclass(frozen=True)
class RegistryUpdate:
    """A partial update: None keeps the stored value; token "" clears it."""

    index_url: str | None = None
    extra_index_urls: Sequence[str] | None = None
    username: str | None = None
    token: str | None = None
    wheels_only: bool | None = None  # only True is accepted (older clients send it)
    target: TargetEnvironment | None = None  # the default environment's (older clients)
    clear_target: bool = False
    timeout_seconds: int | None = None


def validate_index_url(url: str, field: str) -> str:
    text = url.strip()
    if len(text) > MAX_URL_LENGTH:
        raise InvalidArgument(field, f"must be at most {MAX_URL_LENGTH} characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in text):
        raise InvalidArgument(field, "must not contain spaces or control characters")
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise InvalidArgument(
            field, "must be an http(s) URL with a host, e.g. https://pypi.org/simple"
        )
    if parsed.username or parsed.password:
        # Never store credentials in a URL: they would be returned and logged with it.
        raise InvalidArgument(field, "must not contain credentials; set username and auth_token")
    return text


def load_registry(box: SecretBox) -> RegistryConfig:
    row = Setting.get_or_none(Setting.key == REGISTRY_KEY)
    if row is None:
        return RegistryConfig(RegistrySettings())
    raw = json.loads(row.value)
    token = ""
    if raw.get("token_ct"):
        token = box.decrypt(base64.b64decode(raw["token_ct"]), "registry token").decode()
    settings = RegistrySettings(
        index_url=raw["index_url"],
        extra_index_urls=tuple(raw.get("extra_index_urls", ())),
        username=raw.get("username", ""),
        token=token,
        timeout_seconds=raw.get("timeout_seconds", 30),
    )
    return RegistryConfig(settings)


def update_registry(box: SecretBox, update: RegistryUpdate) -> RegistryConfig:
    """Validate everything first, then write; nothing changes on a bad field."""
    if update.wheels_only is False:
        raise InvalidArgument(
            "wheels_only",
            "must be true: installing from a source distribution runs its build backend, i.e."
            " code from the index, on the core; the core installs wheels only",
        )
    with database_proxy.atomic():
        s = load_registry(box).settings
        if update.index_url is not None:
            s = replace(s, index_url=validate_index_url(update.index_url, "index_url"))
        if update.extra_index_urls is not None:
            urls = tuple(
                validate_index_url(u, f"extra_index_urls[{i}]")
                for i, u in enumerate(update.extra_index_urls)
            )
            s = replace(s, extra_index_urls=urls)
        if update.username is not None:
            if len(update.username) > 256 or any(ord(c) < 0x20 for c in update.username):
                raise InvalidArgument("username", "at most 256 printable characters")
            s = replace(s, username=update.username)
        if update.token is not None:
            if len(update.token) > 4096 or any(ord(c) < 0x20 for c in update.token):
                raise InvalidArgument("auth_token", "at most 4096 printable characters")
            s = replace(s, token=update.token)
        if update.timeout_seconds is not None:
            if not 1 <= update.timeout_seconds <= 600:
                raise InvalidArgument("timeout_seconds", "must be between 1 and 600")
            s = replace(s, timeout_seconds=update.timeout_seconds)
        validate_settings(s, prefix="")  # the whole result: e.g. plain http to a remote host
        if update.clear_target:
            environments.set_default_target(None)
        elif update.target is not None:
            environments.set_default_target(update.target)
        doc = {
            "index_url": s.index_url,
            "extra_index_urls": list(s.extra_index_urls),
            "username": s.username,
            "token_ct": base64.b64encode(box.encrypt(s.token.encode(), "registry token")).decode()
            if s.token
            else "",
            "timeout_seconds": s.timeout_seconds,
        }
        upsert(Setting, key=REGISTRY_KEY, value=json.dumps(doc))
    return RegistryConfig(s)


def load_size_cap() -> SizeCap:
    row = Setting.get_or_none(Setting.key == SIZE_CAP_KEY)
    if row is None:
        return SizeCap()
    raw = json.loads(row.value)
    return SizeCap(int(raw["warn_bytes"]), int(raw["block_bytes"]))


def save_size_cap(cap: SizeCap) -> SizeCap:
    for field, value in (("warn_bytes", cap.warn_bytes), ("block_bytes", cap.block_bytes)):
        if value <= 0:
            raise InvalidArgument(field, "must be a positive number of bytes")
        if value > MAX_CAP:
            # A negative number from a careless client arrives as ~2^64 and would turn the cap
            # off without a word.
            raise InvalidArgument(field, f"must be at most {MAX_CAP} bytes (1 TiB), got {value}")
    if cap.warn_bytes > cap.block_bytes:
        raise InvalidArgument(
            "warn_bytes", f"must be <= block_bytes ({cap.warn_bytes} > {cap.block_bytes})"
        )
    doc = {"warn_bytes": cap.warn_bytes, "block_bytes": cap.block_bytes}
    upsert(Setting, key=SIZE_CAP_KEY, value=json.dumps(doc))
    return cap


def check_size(total: int, cap: SizeCap) -> tuple[list[str], str | None]:
    """(warnings, blocking error). Exactly warn is fine; exactly block only warns."""

    def mib(n: int) -> str:
        return f"{n / MiB:.1f} MiB ({n} bytes)"

    if total > cap.block_bytes:
        return [], (
            f"install size {mib(total)} exceeds the block limit {mib(cap.block_bytes)};"
            " remove packages or raise the size cap"
        )
    if total > cap.warn_bytes:
        return [f"install size {mib(total)} exceeds the warn limit {mib(cap.warn_bytes)}"], None
    return [], None
