"""Exports of a published manifest: PEP 751 `pylock.toml` and a hash-pinned `requirements.txt`.

Pure: the manifest, where each wheel came from (core/state/origins.py) and the index in, text
out. Both reproduce exactly the manifest's wheels (the sha256 of each is pinned), so a
developer's `uv pip install -r pylock.toml` or `pip install --require-hashes -r
requirements.txt` installs the files a satellite's tree holds. Neither ever carries
credentials: URLs are recorded without userinfo, query or fragment (`public_url`).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

from core.install.pylock import LockedWheel
from core.state.index_config import RegistrySettings
from core.state.origins import Origin
from shared.manifest import Manifest

FORMATS = ("pylock", "requirements")
FILENAMES = {"pylock": "pylock.toml", "requirements": "requirements.txt"}


def public_url(url: str) -> str:
    """`url` without credentials, query or fragment (a presigned query is a credential too)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return (parts.scheme, (parts.hostname or "").lower(), parts.port)


def attribute_index(file_url: str, registry: RegistrySettings) -> str:
    """The configured index a resolved file most likely came from.

    uv's pylock.toml names the file, not the index. The index on the file's own origin wins
    (the longest shared path if several); with one index configured it is that one; otherwise
    the default index (files on a CDN, such as PyPI's files.pythonhosted.org, land here).
    """
    indexes = registry.index_urls
    same = [u for u in indexes if _origin(u) == _origin(file_url)]
    if same:
        path = urlsplit(file_url).path or "/"
        return public_url(
            max(same, key=lambda u: len(posixpath.commonpath([path, urlsplit(u).path or "/"])))
        )
    return public_url(registry.index_url)


def origin_for(wheel: LockedWheel, registry: RegistrySettings) -> Origin:
    return Origin(public_url(wheel.url), attribute_index(wheel.url, registry))


def _toml(value: str) -> str:
    # A JSON string is a TOML basic string once non-ASCII stays literal (no surrogate pairs).
    return json.dumps(value, ensure_ascii=False)


def _header(manifest: Manifest, environment: str, release: int) -> list[str]:
    return [
        f"# Exported by spk-core: release {release}, environment {environment}"
        f" ({manifest.environment.describe()}),",
        f"# lockfile {manifest.lockfile_hash}.",
    ]


def render_pylock(
    manifest: Manifest,
    origins: Mapping[str, Origin],
    environment: str,
    release: int,
    fallback_index: str,
) -> str:
    """PEP 751: one package per entry, its one wheel with URL, size and sha256.

    `fallback_index` names the index for wheels without a recorded origin (releases published
    before origins were recorded); such wheels get no `url`, and an installer looks them up.
    """
    lines = _header(manifest, environment, release)
    lines += [
        "# Install: uv pip install -r pylock.toml (or pip >= 25.1: pip install -r pylock.toml)",
        'lock-version = "1.0"',
        'created-by = "spk-core"',
        f"requires-python = {_toml(f'=={manifest.environment.python_version}.*')}",
    ]
    for entry in manifest.entries:
        origin = origins.get(entry.sha256)
        index = origin.index_url if origin and origin.index_url else public_url(fallback_index)
        lines += [
            "",
            "[[packages]]",
            f"name = {_toml(entry.name)}",
            f"version = {_toml(entry.version)}",
            f"index = {_toml(index)}",
            "",
            "[[packages.wheels]]",
            f"name = {_toml(entry.filename)}",
        ]
        if origin and origin.url:
            lines.append(f"url = {_toml(origin.url)}")
        lines += [f"size = {entry.size}", f"hashes = {{ sha256 = {_toml(entry.sha256)} }}"]
    lines += [
        "",
        "[tool.script-packages]",
        f"lockfile-hash = {_toml(manifest.lockfile_hash)}",
        f"environment = {_toml(environment)}",
        f"release = {release}",
    ]
    return "\n".join(lines) + "\n"


def render_requirements(
    manifest: Manifest,
    origins: Mapping[str, Origin],
    environment: str,
    release: int,
    fallback_index: str,
) -> str:
    """Every wheel pinned by version and sha256, for `pip install --require-hashes`."""
    indexes = sorted({o.index_url for o in origins.values() if o.index_url}) or [
        public_url(fallback_index)
    ]
    lines = _header(manifest, environment, release)
    lines += [
        "# pip install --require-hashes -r requirements.txt --index-url " + indexes[0],
        *(f"# resolved from {index}" for index in indexes),
        "--only-binary :all:",
    ]
    for entry in manifest.entries:
        lines.append(f"{entry.name}=={entry.version} \\")
        lines.append(f"    --hash=sha256:{entry.sha256}")
    return "\n".join(lines) + "\n"


def render(
    fmt: str,
    manifest: Manifest,
    origins: Mapping[str, Origin],
    environment: str,
    release: int,
    fallback_index: str,
) -> str:
    renderer = render_pylock if fmt == "pylock" else render_requirements
    return renderer(manifest, origins, environment, release, fallback_index)
