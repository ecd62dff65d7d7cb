"""Turn a failed pip run into one operator-facing error that names the package and the reason.

pip's stderr says the same two lines for an unknown package, a wheel for another platform, an
sdist-only package, a 401 and a dead index. Its INFO output (stdout) names a failed fetch and a
conflict's causes; why a wheel or sdist was skipped is only in its debug log (`--log`), so the
resolver asks for one when `needs_debug_log` says so. The token is scrubbed at this module's exit.
"""

from __future__ import annotations

import re
import sys
import sysconfig
from typing import TYPE_CHECKING

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from shared.errors import IntegrityError, RegistryError, ResolveError, SpkError
from shared.manifest import TargetEnvironment

if TYPE_CHECKING:
    from core.state.index_config import RegistrySettings

SDIST_REFUSAL = "source distributions (sdists) are not installed because building them runs code"
MAX_EXCERPT_LINES = 5
MAX_EXCERPT_LINE = 240

_FETCH_FAIL = re.compile(r"Could not fetch URL (?P<url>\S+): (?P<reason>.*?) - skipping")
_HTTP_STATUS = re.compile(r"\b(\d{3}) (?:Client|Server) Error\b|HTTP error (\d{3})")
_NO_MATCH = re.compile(r"No matching distribution found for (?P<req>\S+)")
_FROM_VERSIONS = re.compile(
    r"satisfies the requirement (?P<req>\S+) \(from versions: (?P<versions>[^)]*)\)"
)
_TAG_SKIP = re.compile(r"none of the wheel's tags \((?P<tags>[^)]*)\) are compatible.*?"
                       r"/(?P<file>[^/#\s]+\.whl)")  # fmt: skip
_SDIST_SKIP = re.compile(r"No sources permitted for [^:]+: \S*/(?P<file>[^/#\s]+)")
_REQUIRES_PYTHON = re.compile(r"Ignored the following versions that require a different python.*")
_INSECURE_HOST = re.compile(r"located at (?P<host>\S+) is not a trusted or secure host")
_URL_USERINFO = re.compile(r"//[^/\s@]+@")
_HASH_MISMATCH = re.compile(
    r"(?P<req>\S+) from (?P<url>[^\s#]+)[^\n]*:\s+Expected sha256 (?P<expected>[0-9a-f]{64})"
    r"\s+Got\s+(?P<got>[0-9a-f]{64})"
)
_LOG_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT[\d:,.]+ ?")  # pip --log line prefix


def scrub(text: str, secret: str) -> str:
    """Remove the token and any URL userinfo from text that is about to leave this module."""
    if secret:
        text = text.replace(secret, "***")
    return _URL_USERINFO.sub("//***@", text)


def excerpt(stderr: str) -> str:
    """A few short lines of pip output, error lines preferred, fit for an operator message."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")] or lines
    kept = [ln[:MAX_EXCERPT_LINE] for ln in errors[-MAX_EXCERPT_LINES:]]
    return " | ".join(kept) or "(no output)"


def _conflict_causes(log: str) -> list[str]:
    """pip's "The conflict is caused by:" block (INFO level: only in the log at --quiet)."""
    lines = [_LOG_STAMP.sub("", ln).strip() for ln in log.splitlines()]
    if "The conflict is caused by:" not in lines:
        return []
    block = lines[lines.index("The conflict is caused by:") + 1 :]
    causes = block[: block.index("")] if "" in block else block
    return [c[:MAX_EXCERPT_LINE] for c in causes[:MAX_EXCERPT_LINES]]


def _describe_env(environment: TargetEnvironment | None) -> str:
    if environment is not None and environment.platform:
        return environment.describe()
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return f"{sys.implementation.name} {version} {sysconfig.get_platform()} (the core's own)"


def _index_of(url: str, settings: RegistrySettings) -> str:
    return next((u for u in settings.index_urls if url.startswith(u.rstrip("/"))), url)


def _file_matches(filename: str, name: str, version: str | None) -> bool:
    try:
        if filename.endswith(".whl"):
            fname, fver, _, _ = parse_wheel_filename(filename)
        else:
            fname, fver = parse_sdist_filename(filename)
    except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):
        return False
    return fname == name and (version is None or fver == Version(version))


def _pinned(req: Requirement) -> str | None:
    specs = list(req.specifier)
    if len(specs) == 1 and specs[0].operator in ("==", "==="):
        return specs[0].version
    return None


def _explain_missing(
    raw_req: str, stderr: str, log: str, settings: RegistrySettings, env: TargetEnvironment | None
) -> str:
    try:
        req = Requirement(raw_req)
        name, version = canonicalize_name(req.name), _pinned(req)
    except InvalidRequirement:
        name, version = canonicalize_name(re.split(r"[<>=!~;\[ ]", raw_req, maxsplit=1)[0]), None
    what = f"'{name}' {version}" if version else f"'{name}' ({raw_req})"
    tags = sorted({m["tags"] for m in _TAG_SKIP.finditer(log)
                   if _file_matches(m["file"], name, version)})  # fmt: skip
    sdists = [
        m["file"] for m in _SDIST_SKIP.finditer(log) if _file_matches(m["file"], name, version)
    ]
    if tags:
        also = " (the sdist on the index is refused too)" if sdists else ""
        return (
            f"no wheel of {what} fits the target environment {_describe_env(env)}; the index has "
            f"wheels for: {', '.join(tags)}{also}. {SDIST_REFUSAL.capitalize()}."
        )
    if sdists:
        return (
            f"{what} is only published as a source distribution on {settings.describe_index()} "
            f"(target {_describe_env(env)}); {SDIST_REFUSAL}. Pick a version that ships a wheel."
        )
    if requires_python := _REQUIRES_PYTHON.search(stderr):
        return f"{what} cannot be installed: {requires_python.group(0)[:200]}"
    available: list[str] = []
    for m in _FROM_VERSIONS.finditer(stderr):
        if m["req"] == raw_req and m["versions"].strip() != "none":
            available = [v.strip() for v in m["versions"].split(",") if v.strip()]
    if available:
        newest = sorted(available, key=_version_key, reverse=True)[:10]
        wanted = f"version {version} of '{name}'" if version else f"no version of {what}"
        return (
            f"{wanted} is not on the index {settings.describe_index()}; "
            f"available with a wheel for {_describe_env(env)}: {', '.join(newest)}"
        )
    return f"package '{name}' was not found on the index {settings.describe_index()}"


def _version_key(raw: str) -> tuple[int, Version]:
    try:
        return (1, Version(raw))
    except InvalidVersion:
        return (0, Version("0"))


def _refused_credentials(text: str) -> str | None:
    """The HTTP status (401/403) with which the index refused our credentials, if it did."""
    for m in _HTTP_STATUS.finditer(text):
        if (code := m.group(1) or m.group(2)) in ("401", "403"):
            return code
    return None


def needs_debug_log(stdout: str, stderr: str) -> bool:
    """Whether explaining this failure needs pip's debug log: "no matching distribution" with
    no failed fetch, refused credentials or ignored host to blame."""
    text = f"{stderr}\n{stdout}"
    blamed = _FETCH_FAIL.search(text) or _INSECURE_HOST.search(text) or _refused_credentials(text)
    return not blamed and _NO_MATCH.search(stderr) is not None


def classify_failure(
    returncode: int,
    stderr: str,
    log: str,
    settings: RegistrySettings,
    environment: TargetEnvironment | None,
) -> SpkError:
    """Map a failed pip run to one operator-facing error; the token is scrubbed at this exit."""
    cls, message = _classify(returncode, stderr, log, settings, environment)
    return cls(scrub(message, settings.token))


def _classify(
    rc: int, stderr: str, log: str, settings: RegistrySettings, env: TargetEnvironment | None
) -> tuple[type[ResolveError | RegistryError | IntegrityError], str]:
    text = f"{stderr}\n{log}"
    # pip checks each download against the sha256 on its index link (that is the whole point).
    if mismatch := _HASH_MISMATCH.search(stderr):
        filename = mismatch["url"].rsplit("/", 1)[-1]
        return IntegrityError, (
            f"{mismatch['req']}: the index publishes sha256 {mismatch['expected']} for {filename}"
            f" but served bytes with sha256 {mismatch['got']}; refusing a tampered or corrupt"
            " download"
        )
    # Credentials first: pip reports a 401 on the project page as "(from versions: none)".
    if code := _refused_credentials(text):
        return RegistryError, (
            f"the index rejected the credentials (HTTP {code}) at "
            f"{settings.describe_index()}; check the registry username and token"
        )
    # Same for a dead index: pip skips the page and then says the package has no versions.
    for m in _FETCH_FAIL.finditer(text):
        status = _HTTP_STATUS.search(m["reason"])
        if status is None or (status.group(1) or status.group(2) or "").startswith("5"):
            where = _index_of(m["url"], settings)
            return RegistryError, f"the index {where} is unreachable: {m['reason'][:200]}"
    if insecure := _INSECURE_HOST.search(text):
        return RegistryError, (
            f"pip ignores the index host {insecure['host']}: plain http is only allowed for "
            "localhost; use an https URL"
        )
    if missing := _NO_MATCH.search(stderr):
        return ResolveError, _explain_missing(missing["req"], stderr, log, settings, env)
    if "conflicting dependencies" in stderr or "ResolutionImpossible" in stderr:
        why = "; ".join(_conflict_causes(log)) or excerpt(stderr)
        return ResolveError, f"the allowlist has conflicting dependencies: {why}"
    if "Retrying" in stderr and "connection broken" in stderr:
        return RegistryError, f"the index {settings.describe_index()} is unreachable"
    return ResolveError, f"pip could not resolve the allowlist (exit {rc}): {excerpt(stderr)}"
