"""The host policy file: a sandbox policy made mandatory for every run on one data dir.

    <data-dir>/sandbox-policy.toml          the file itself, or a symlink that `spk-satellite
                                            agent --policy-file F` places (pointing at F)

When it exists, every `spk-satellite run` on that data dir is sandboxed with at least this
policy, with or without `--sandbox`. It must be a regular file owned by root and writable by
nobody else, and neither its directory nor the data dir may be writable by others: otherwise a
user could rewrite or remove it, and the run is refused rather than run with a policy anyone
could have written. A policy file that exists but cannot be trusted or parsed refuses every run
(fail closed); deleting it is the only way back to unsandboxed runs.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from satellite.sandbox_policy import (
    PolicyRequest,
    SandboxPolicy,
    apply,
    parse_sandbox_table,
    read_toml,
    request_from,
)
from shared.errors import InvalidArgument, SandboxUnavailable

HOST_POLICY = "sandbox-policy.toml"
_HOST_KEYS = {"bwrap", "root_runs_as"}


@dataclass(frozen=True)
class HostSettings:
    """Host-only settings: what a caller must never choose (a fake bwrap would sandbox nothing)."""

    bwrap: Path = Path("/usr/bin/bwrap")
    root_runs_as: str = "nobody"  # must resolve to a non-root uid (see docs/sandbox.md: root)


@dataclass(frozen=True)
class HostPolicy:
    path: Path
    policy: SandboxPolicy
    settings: HostSettings


@dataclass(frozen=True)
class RunPolicy:
    """What a run gets: no policy (unsandboxed) or a policy with the host's settings."""

    policy: SandboxPolicy | None
    settings: HostSettings
    mandatory: bool  # a host policy exists


def host_policy_path(data_dir: Path) -> Path:
    return data_dir / HOST_POLICY


def load_host_policy(data_dir: Path) -> HostPolicy | None:
    """The data dir's host policy, None when there is none; refuses an untrusted one."""
    path = host_policy_path(data_dir)
    if not os.path.lexists(path):
        return None
    if not path.exists():
        raise SandboxUnavailable(
            f"host policy {path} points at {os.readlink(path)}, which is missing; every run is"
            " refused until it is restored (or the link removed by an administrator)"
        )
    return _load(path, data_dir)


def _load(path: Path, data_dir: Path) -> HostPolicy:
    check_trusted(path, data_dir)
    doc = read_toml(path, "host policy")
    source = f"host policy {path}"
    overrides = parse_sandbox_table(doc, str(path))
    policy = apply(SandboxPolicy(), PolicyRequest(source, overrides), tighten_only=False)
    return HostPolicy(path, dataclasses.replace(policy, source=source), _settings(doc, path))


def _settings(doc: dict[str, Any], path: Path) -> HostSettings:
    table = doc.get("host", {})
    where = f"{path}: host"
    if not isinstance(table, dict):
        raise InvalidArgument(where, "must be a table ([host])")
    for key in table:
        if key not in _HOST_KEYS:
            raise InvalidArgument(f"{where}.{key}", f"unknown key; known: {', '.join(_HOST_KEYS)}")
    settings = HostSettings()
    if "bwrap" in table:
        bwrap = table["bwrap"]
        if not isinstance(bwrap, str) or not bwrap.startswith("/"):
            raise InvalidArgument(
                f"{where}.bwrap", "must be an absolute path (PATH is the caller's)"
            )
        settings = HostSettings(Path(bwrap), settings.root_runs_as)
    if "root_runs_as" in table:
        user = table["root_runs_as"]
        if not isinstance(user, str) or not user:
            raise InvalidArgument(f"{where}.root_runs_as", "must be a user name")
        settings = HostSettings(settings.bwrap, user)
    return settings


def check_trusted(path: Path, data_dir: Path) -> None:
    """Refuse a policy file that someone other than root could have written or replaced."""
    st = os.stat(path)
    fix = f"chown root:root {path} && chmod 644 {path}"
    if not stat.S_ISREG(st.st_mode):
        raise SandboxUnavailable(f"host policy {path} is not a regular file; runs are refused")
    if st.st_uid != 0:
        raise SandboxUnavailable(
            f"host policy {path} is owned by uid {st.st_uid}, not root, so its owner could have"
            f" weakened it; runs are refused until it is fixed ({fix})"
        )
    if st.st_mode & 0o022:
        raise SandboxUnavailable(
            f"host policy {path} is writable by group or others (mode"
            f" {stat.S_IMODE(st.st_mode):o}); runs are refused until it is fixed ({fix})"
        )
    for directory in {path.resolve().parent, data_dir.resolve()}:
        dst = os.stat(directory)
        if dst.st_mode & 0o002 and not dst.st_mode & stat.S_ISVTX:
            raise SandboxUnavailable(
                f"{directory} is writable by everyone, so anyone could replace or remove the host"
                f" policy {path}; runs are refused until it is fixed (chmod o-w {directory})"
            )


def run_policy(data_dir: Path, requested: str | None) -> RunPolicy:
    """The policy a run gets: `requested` is None (no --sandbox), "" (bare) or a preset/file."""
    host = load_host_policy(data_dir)
    if host is None:
        if requested is None:
            return RunPolicy(None, HostSettings(), False)
        if requested == "":
            return RunPolicy(SandboxPolicy(), HostSettings(), False)
        return RunPolicy(
            apply(SandboxPolicy(), request_from(requested), False), HostSettings(), False
        )
    if not requested:
        return RunPolicy(host.policy, host.settings, True)
    return RunPolicy(apply(host.policy, request_from(requested), True), host.settings, True)


def install_host_policy(data_dir: Path, source: Path) -> HostPolicy:
    """For `agent --policy-file F`: validate F, then link `<data-dir>/sandbox-policy.toml` to it."""
    source = source.absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    if not source.is_file():
        raise SandboxUnavailable(f"--policy-file {source} does not exist")
    loaded = _load(source, data_dir)  # before linking: a bad file must not lock every run out
    link = host_policy_path(data_dir)
    if os.path.lexists(link):
        same = link.is_symlink() and Path(os.readlink(link)) == source
        if not same:
            raise SandboxUnavailable(
                f"{link} already exists and is not a link to --policy-file {source}; remove it"
                " or drop --policy-file"
            )
    else:
        tmp = link.with_name(f".{HOST_POLICY}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        os.symlink(source, tmp)
        os.replace(tmp, link)
    return dataclasses.replace(loaded, path=link)


def unprivileged_ids(user: str) -> tuple[int, int]:
    """uid and gid of `root_runs_as`; refuses root and unknown users."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise SandboxUnavailable(
            f"host policy root_runs_as: user {user!r} does not exist on this host; create it"
            " (useradd --system --no-create-home spk-run) or name another unprivileged user"
        ) from None
    if entry.pw_uid == 0:
        raise SandboxUnavailable(f"host policy root_runs_as: {user!r} is root; name another user")
    return entry.pw_uid, entry.pw_gid
