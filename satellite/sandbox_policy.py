"""Sandbox policies for `spk-satellite run`: the model, the TOML format, presets and tightening.

A policy file (the host's, see satellite/host_policy.py, or one named by `--sandbox=FILE`):

    [sandbox]                        # every key is optional
    network = "none"                 # none | loopback | host
    read_only_paths = ["/srv/in"]    # host paths the script may read, at the same place
    read_write_paths = ["/srv/out"]  # host paths it may write (never the data dir)
    timeout_seconds = 3600           # wall clock, then the whole sandbox is killed; 0 = none
    pass_env = ["LANG", "TZ"]        # copied from the caller's environment when set
    env = { MODE = "batch" }         # set in the script's environment

    [sandbox.limits]                 # 0 = no limit
    cpu_seconds = 3600               # RLIMIT_CPU: SIGXCPU, then SIGKILL a second later
    memory_bytes = "4GiB"            # RLIMIT_AS (address space); bytes or "<n>KiB|MiB|GiB|TiB"
    open_files = 1024                # RLIMIT_NOFILE
    processes = 256                  # RLIMIT_NPROC, counted inside the run's user namespace

    [host]                           # only in the host policy file (satellite/host_policy.py)
    bwrap = "/usr/bin/bwrap"         # never looked up on PATH: a caller controls PATH
    root_runs_as = "nobody"          # the unprivileged user a root caller's script runs as

A file is a set of overrides. Without a host policy they apply to the `default` preset. With one,
they apply to the host policy and may only tighten it: a weaker value (more network, a higher
limit, a path the host does not expose, another variable of the caller's environment) is refused
naming the field, so `--sandbox` can never weaken what the host makes mandatory.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import InvalidArgument

NETWORK_MODES = ("none", "loopback", "host")  # strictest first
LIMIT_KEYS = ("cpu_seconds", "memory_bytes", "open_files", "processes")
DEFAULT_PASS_ENV = ("LANG", "LC_ALL", "LC_CTYPE", "TERM", "TZ")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|TiB)?\s*$")
_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_SANDBOX_KEYS = {
    "network",
    "read_only_paths",
    "read_write_paths",
    "timeout_seconds",
    "pass_env",
    "env",
    "limits",
}


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run; None means no limit."""

    cpu_seconds: int | None = 3600
    memory_bytes: int | None = 4 << 30
    open_files: int | None = 1024
    processes: int | None = 256


@dataclass(frozen=True)
class SandboxPolicy:
    """Everything a sandboxed run is allowed; `source` says where it came from (for errors)."""

    source: str = "default"
    network: str = "none"
    read_only_paths: tuple[Path, ...] = ()
    read_write_paths: tuple[Path, ...] = ()
    timeout_seconds: float | None = 3600.0
    limits: Limits = field(default_factory=Limits)
    pass_env: tuple[str, ...] = DEFAULT_PASS_ENV
    env: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        lim = self.limits
        parts = [
            f"network {self.network}",
            f"timeout {_num(self.timeout_seconds, 's')}",
            f"cpu {_num(lim.cpu_seconds, 's')}",
            f"memory {_size_text(lim.memory_bytes)}",
            f"open files {_num(lim.open_files, '')}",
            f"processes {_num(lim.processes, '')}",
        ]
        if self.read_only_paths:
            parts.append("read-only " + ",".join(map(str, self.read_only_paths)))
        if self.read_write_paths:
            parts.append("read-write " + ",".join(map(str, self.read_write_paths)))
        return f"{self.source}: " + ", ".join(parts)


def _num(value: float | None, unit: str) -> str:
    return "unlimited" if value is None else f"{value:g}{unit}"


def _size_text(value: int | None) -> str:
    if value is None:
        return "unlimited"
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if value >= _UNITS[unit] and value % _UNITS[unit] == 0:
            return f"{value // _UNITS[unit]} {unit}"
    return f"{value} bytes"


# A preset is a set of overrides, like a file; `--sandbox` alone means the host policy (or default).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "loopback": {"network": "loopback"},
    "network": {"network": "host"},
}


@dataclass(frozen=True)
class PolicyRequest:
    """What `--sandbox=POLICY` asked for: validated overrides and where they came from."""

    source: str
    overrides: Mapping[str, Any]


def request_from(value: str) -> PolicyRequest:
    """A preset name, or the path of a policy file (which may not hold a [host] table)."""
    if value in PRESETS:
        return PolicyRequest(f"preset {value}", PRESETS[value])
    if "/" not in value and not value.endswith(".toml"):
        raise InvalidArgument(
            "--sandbox", f"unknown policy {value!r}: a preset ({', '.join(PRESETS)}) or a file path"
        )
    doc = read_toml(Path(value), "--sandbox")
    if "host" in doc:
        raise InvalidArgument(f"{value}: [host]", "only the host policy file may set this")
    return PolicyRequest(value, parse_sandbox_table(doc, value))


def read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidArgument(what, f"cannot read {path}: {exc.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(str(path), f"not valid TOML: {exc}") from None
    unknown = set(doc) - {"sandbox", "host"}
    if unknown:
        raise InvalidArgument(f"{path}: {sorted(unknown)[0]}", "unknown table; use [sandbox]")
    return doc


def parse_sandbox_table(doc: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The [sandbox] table as validated overrides (same keys as SandboxPolicy, limits nested)."""
    table = doc.get("sandbox", {})
    if not isinstance(table, dict):
        raise InvalidArgument(f"{source}: sandbox", "must be a table ([sandbox])")
    _no_unknown(table, _SANDBOX_KEYS, f"{source}: sandbox")
    out: dict[str, Any] = {}
    where = f"{source}: sandbox"
    if "network" in table:
        if table["network"] not in NETWORK_MODES:
            raise InvalidArgument(f"{where}.network", f"must be one of {', '.join(NETWORK_MODES)}")
        out["network"] = table["network"]
    for key in ("read_only_paths", "read_write_paths"):
        if key in table:
            out[key] = tuple(_path(p, f"{where}.{key}") for p in _list(table[key], where, key))
    if "timeout_seconds" in table:
        out["timeout_seconds"] = _positive_or_none(
            table["timeout_seconds"], f"{where}.timeout_seconds"
        )
    if "pass_env" in table:
        out["pass_env"] = tuple(
            _env_name(n, f"{where}.pass_env") for n in _list(table["pass_env"], where, "pass_env")
        )
    if "env" in table:
        out["env"] = _env_table(table["env"], f"{where}.env")
    if "limits" in table:
        out["limits"] = _limits_table(table["limits"], f"{where}.limits")
    return out


def _no_unknown(table: Mapping[str, Any], known: set[str], where: str) -> None:
    for key in table:
        if key not in known:
            raise InvalidArgument(
                f"{where}.{key}", f"unknown key; known: {', '.join(sorted(known))}"
            )


def _list(value: Any, where: str, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidArgument(f"{where}.{key}", "must be a list")
    return value


def _path(value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value.startswith("/"):
        raise InvalidArgument(where, f"{value!r} is not an absolute path")
    if os.path.normpath(value) != value or "\0" in value:
        raise InvalidArgument(where, f"{value!r} is not normalised (no '..', '.', '//' or '/' end)")
    if value == "/":
        raise InvalidArgument(where, "'/' would expose the whole host; name the directories")
    return Path(value)


def _positive_or_none(value: Any, where: str) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise InvalidArgument(where, f"must be a number of seconds >= 0 (0: none), got {value!r}")
    return None if value == 0 else float(value)


def _env_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _ENV_NAME.match(value):
        raise InvalidArgument(where, f"{value!r} is not a variable name")
    if value.startswith("SPK_"):
        raise InvalidArgument(where, f"{value}: SPK_* variables (tokens, config) never reach a run")
    return value


def _env_table(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise InvalidArgument(where, 'must be a table of NAME = "value"')
    pairs = []
    for name, text in sorted(value.items()):
        _env_name(name, where)
        if not isinstance(text, str) or "\0" in text:
            raise InvalidArgument(f"{where}.{name}", "must be a string without NUL")
        pairs.append((name, text))
    return tuple(pairs)


def _limits_table(value: Any, where: str) -> dict[str, int | None]:
    if not isinstance(value, dict):
        raise InvalidArgument(where, "must be a table ([sandbox.limits])")
    _no_unknown(value, set(LIMIT_KEYS), where)
    out: dict[str, int | None] = {}
    for key, raw in value.items():
        number = _size(raw, f"{where}.{key}") if key == "memory_bytes" else raw
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise InvalidArgument(
                f"{where}.{key}", f"must be an integer >= 0 (0: none), got {raw!r}"
            )
        out[key] = number or None
    return out


def _size(raw: Any, where: str) -> Any:
    if not isinstance(raw, str):
        return raw
    match = _SIZE.match(raw)
    if not match:
        raise InvalidArgument(where, f'{raw!r} is not a size such as 4294967296 or "4GiB"')
    return int(match.group(1)) * _UNITS[match.group(2)]


# --- applying overrides -------------------------------------------------------------------------


def apply(base: SandboxPolicy, request: PolicyRequest, tighten_only: bool) -> SandboxPolicy:
    """`base` with the request's overrides; with `tighten_only`, a weaker one is refused."""
    o = request.overrides
    changes: dict[str, Any] = {"source": f"{base.source} + {request.source}"}
    for key in ("network", "timeout_seconds", "read_only_paths", "read_write_paths", "pass_env"):
        if key in o:
            if tighten_only:
                _check_tighter(key, getattr(base, key), o[key], base, request)
            changes[key] = o[key]
    if "env" in o:
        mine = dict(base.env)
        for name, value in o["env"]:
            if tighten_only and mine.get(name, value) != value:
                raise _weaker(request, f"env.{name}", "the host policy sets it to another value")
            mine[name] = value
        changes["env"] = tuple(sorted(mine.items()))
    if "limits" in o:
        limits = dataclasses.asdict(base.limits)
        for key, value in o["limits"].items():
            if tighten_only and _looser(value, limits[key]):
                raise _weaker(request, f"limits.{key}", f"the host allows at most {limits[key]}")
            limits[key] = value
        changes["limits"] = Limits(**limits)
    return dataclasses.replace(base, **changes)


def _looser(value: float | None, bound: float | None) -> bool:
    return bound is not None and (value is None or value > bound)


def _check_tighter(
    key: str, host: Any, wanted: Any, base: SandboxPolicy, request: PolicyRequest
) -> None:
    if key == "network" and NETWORK_MODES.index(wanted) > NETWORK_MODES.index(host):
        raise _weaker(request, key, f"the host allows at most {host!r}, asked for {wanted!r}")
    if key == "timeout_seconds" and _looser(wanted, host):
        raise _weaker(request, key, f"the host allows at most {host}")
    if key == "pass_env":
        extra = sorted(set(wanted) - set(host))
        if extra:
            raise _weaker(request, key, f"{extra[0]} is not passed by the host policy")
    if key in ("read_only_paths", "read_write_paths"):
        exposed = base.read_write_paths
        if key == "read_only_paths":
            exposed += base.read_only_paths
        for path in wanted:
            if not any(path.is_relative_to(allowed) for allowed in exposed):
                allowed_text = ", ".join(map(str, exposed)) or "none"
                raise _weaker(
                    request, key, f"{path} is not exposed by the host (it allows {allowed_text})"
                )


def _weaker(request: PolicyRequest, key: str, rule: str) -> InvalidArgument:
    return InvalidArgument(
        f"{request.source}: sandbox.{key}", f"cannot weaken the host policy: {rule}"
    )
