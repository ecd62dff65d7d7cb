"""Target environments of a mixed fleet, and which one fits a host. Pure: no I/O.

    Environment          a name and the TargetEnvironment one manifest is resolved for
    HostEnvironment      what a satellite says about its interpreter (shared/tags.py reads it)
    validate_environment the admin's input, refused with the field and the rule
    compatible_platforms a platform tag and every older tag a host of it also runs
    tag_rank             every wheel tag an environment accepts, ranked as an installer prefers
    supported_tags       the same as a set (the core's check of each wheel)
    choose_environment   the environment that fits a host best, or None (an unserved host)

A platform tag names the oldest host an environment is for: `manylinux_2_28_x86_64` fits every
x86-64 host with glibc 2.28 or newer, because such a host also runs manylinux_2_17 wheels. So an
environment fits a host when the host lists its platform among the tags it supports, and the
most specific fit (the platform the host lists first, i.e. the newest glibc it can use) wins.
An environment whose platform is empty is the core's own platform (`native_platform`), as
lockfiles resolved before environments existed say.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from packaging.tags import Tag, compatible_tags, cpython_tags, mac_platforms

from shared.errors import InvalidArgument
from shared.manifest import TargetEnvironment

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_PYTHON = re.compile(r"^3\.(\d{1,2})$")
_MANYLINUX = re.compile(r"^manylinux_(\d+)_(\d+)_([a-z0-9_]+)$")
_LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
_LEGACY = re.compile(r"^(manylinux1|manylinux2010|manylinux2014)_([a-z0-9_]+)$")
_MUSLLINUX = re.compile(r"^musllinux_(\d+)_(\d+)_([a-z0-9_]+)$")
_MACOSX = re.compile(r"^macosx_(\d+)_(\d+)_([a-z0-9_]+)$")
_WINDOWS = frozenset({"win32", "win_amd64", "win_arm64"})
_ARCHES = frozenset({"x86_64", "aarch64", "i686", "armv7l", "ppc64le", "s390x", "riscv64"})
_MAC_ARCHES = frozenset({"x86_64", "arm64", "universal2"})
_POLICY_PREFIXES = ("manylinux", "musllinux", "macosx", "win")


@dataclass(frozen=True)
class Environment:
    """One entry of the admin's list: a manifest per release is resolved for `target`."""

    name: str
    target: TargetEnvironment

    @property
    def platforms(self) -> tuple[str, ...]:
        return split_platforms(self.target.platform)

    def describe(self, native: str = "") -> str:
        plats = ",".join(self.platforms) or f"{native or 'native'} (the core's own)"
        return f"{self.name} ({self.target.abi or 'cp'} {plats})"


@dataclass(frozen=True)
class HostEnvironment:
    """What a satellite's interpreter runs: sent on subscribe, matched by the core."""

    python_version: str  # full, e.g. "3.11.7"
    implementation: str  # PEP 425 short name: "cp"
    abi: str  # e.g. "cp311"
    platforms: tuple[str, ...]  # every platform tag it supports, most specific first

    @property
    def minor(self) -> str:
        return ".".join(self.python_version.split(".")[:2])

    @property
    def best_platform(self) -> str:
        """The most specific policy tag (manylinux_2_36_x86_64 rather than linux_x86_64)."""
        policy = [p for p in self.platforms if p.startswith(_POLICY_PREFIXES)]
        return (policy or list(self.platforms) or ["unknown"])[0]

    def describe(self) -> str:
        return f"{self.abi or self.implementation}-{self.best_platform}"

    def add_command(self, name: str = "NAME") -> str:
        """What the admin pastes to serve this host: `spk-core admin envs add ...`."""
        return f"spk-core admin envs add {name} {' '.join(self.spec_args())}"

    def spec_args(self) -> list[str]:
        return ["--python", self.minor, "--abi", self.abi, "--platform", self.best_platform]


def split_platforms(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


# --------------------------------------------------------------------------- validation


def check_platform_tag(tag: str, field: str) -> None:
    """A wheel platform tag we can match and resolve for; InvalidArgument otherwise."""
    if (m := _MANYLINUX.match(tag)) or (m := _MUSLLINUX.match(tag)):
        arch = m.group(3)
    elif m := _LEGACY.match(tag):
        arch = m.group(2)
    elif m := _MACOSX.match(tag):
        if m.group(3) not in _MAC_ARCHES:
            raise InvalidArgument(field, f"{tag!r}: unknown macOS architecture {m.group(3)!r}")
        return
    elif tag in _WINDOWS:
        return
    elif tag.startswith("linux_"):
        raise InvalidArgument(
            field,
            f"{tag!r} is the tag of local builds, which no index publishes; use a policy tag"
            " such as manylinux_2_17_x86_64 (see `spk-satellite env` on a host)",
        )
    else:
        raise InvalidArgument(
            field,
            f"{tag!r} is not a wheel platform tag (e.g. manylinux_2_28_x86_64,"
            " musllinux_1_2_aarch64, macosx_11_0_arm64, win_amd64)",
        )
    if arch not in _ARCHES:
        raise InvalidArgument(field, f"{tag!r}: unknown architecture {arch!r}")


def validate_environment(
    name: str, target: TargetEnvironment, *, field: str = "environment"
) -> Environment:
    """The admin's environment, checked field by field (nothing is stored on a refusal).

    `field` prefixes the field names in errors: "environment" for AddEnvironment, "target"
    for SetRegistryConfig's target (the default environment's).
    """
    if not _NAME.match(name):
        raise InvalidArgument(
            f"{field}.name", "1-64 characters: lower-case letters, digits, '.', '_', '-'"
        )
    m = _PYTHON.match(target.python_version)
    if not m:
        raise InvalidArgument(
            f"{field}.python_version",
            f"must be a CPython X.Y such as 3.12, got {target.python_version!r}",
        )
    implementation = target.implementation or "cp"
    if implementation != "cp":
        raise InvalidArgument(
            f"{field}.implementation",
            f"must be cp (CPython); {implementation!r} cannot be resolved for",
        )
    abi = target.abi or f"cp3{m.group(1)}"
    if abi != f"cp3{m.group(1)}":
        raise InvalidArgument(
            f"{field}.abi",
            f"must be cp3{m.group(1)} for python {target.python_version}, got {abi!r}",
        )
    platforms = split_platforms(target.platform)
    if not platforms:
        raise InvalidArgument(
            f"{field}.platform",
            "is required: the oldest platform the hosts run, e.g. manylinux_2_28_x86_64"
            " (`spk-satellite env` prints a host's)",
        )
    for i, tag in enumerate(platforms):
        check_platform_tag(
            tag, f"{field}.platform[{i}]" if len(platforms) > 1 else f"{field}.platform"
        )
    clean = TargetEnvironment(target.python_version, implementation, abi, ",".join(platforms))
    return Environment(name, clean)


# --------------------------------------------------------------------------- tags


def compatible_platforms(tag: str) -> list[str]:
    """`tag` and every platform tag a host of it also runs, most specific first."""
    if m := _LEGACY.match(tag):
        major, minor = _LEGACY_MANYLINUX[m.group(1)]
        return compatible_platforms(f"manylinux_{major}_{minor}_{m.group(2)}")
    if m := _MANYLINUX.match(tag):
        major, minor, arch = int(m.group(1)), int(m.group(2)), m.group(3)
        out: list[str] = []
        for glibc_minor in range(minor, -1, -1):
            out.append(f"manylinux_{major}_{glibc_minor}_{arch}")
            for legacy, version in _LEGACY_MANYLINUX.items():
                if version == (major, glibc_minor):
                    out.append(f"{legacy}_{arch}")
        return out
    if m := _MUSLLINUX.match(tag):
        major, minor, arch = int(m.group(1)), int(m.group(2)), m.group(3)
        return [f"musllinux_{major}_{v}_{arch}" for v in range(minor, -1, -1)]
    if m := _MACOSX.match(tag):
        version = (int(m.group(1)), int(m.group(2)))
        return list(mac_platforms(version, m.group(3)))
    return [tag]


def resolution_platforms(env: Environment, native: str) -> list[str]:
    """Every platform tag a wheel of `env` may carry (the core's own when env has none)."""
    out: list[str] = []
    for tag in env.platforms or (native,):
        out += [p for p in compatible_platforms(tag) if p not in out]
    return out


def tag_rank(env: Environment, native: str) -> dict[Tag, int]:
    """Every wheel tag `env` accepts -> its place in an installer's preference (packaging's
    order: 0 is the most specific)."""
    minor = int(env.target.python_version.split(".")[1])
    version = (3, minor)
    platforms = resolution_platforms(env, native)
    tags = list(cpython_tags(version, abis=[env.target.abi], platforms=platforms))
    tags += compatible_tags(version, interpreter=f"cp3{minor}", platforms=platforms)
    rank: dict[Tag, int] = {}
    for tag in tags:
        rank.setdefault(tag, len(rank))
    return rank


def supported_tags(env: Environment, native: str) -> frozenset[Tag]:
    """Every wheel tag `env` accepts, for checking what the resolver chose."""
    return frozenset(tag_rank(env, native))


def wheel_fits(filename_tags: Iterable[Tag], accepted: frozenset[Tag]) -> bool:
    return not accepted.isdisjoint(filename_tags)


# --------------------------------------------------------------------------- matching


def fits(host: HostEnvironment, env: Environment, native: str) -> bool:
    target = env.target
    if (
        target.implementation or "cp"
    ) != host.implementation or target.python_version != host.minor:
        return False
    if target.abi and target.abi != host.abi:
        return False
    return all(p in host.platforms for p in env.platforms or (native,))


def choose_environment(
    host: HostEnvironment, envs: Sequence[Environment], native: str
) -> Environment | None:
    """The fitting environment whose platform the host ranks highest; ties: list order."""
    rank = {p: i for i, p in enumerate(host.platforms)}
    fitting = [
        (rank[(e.platforms or (native,))[0]], i, e)
        for i, e in enumerate(envs)
        if fits(host, e, native)
    ]
    return min(fitting)[2] if fitting else None


def unserved_message(host: HostEnvironment, envs: Sequence[Environment], native: str) -> str:
    configured = "; ".join(e.describe(native) for e in envs) or "none"
    return (
        f"no environment fits {host.describe()} (CPython {host.python_version}); configured:"
        f" {configured}; add one with: {host.add_command()} and install again"
    )
