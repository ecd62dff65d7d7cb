"""core/install/universal.py: each environment's wheels picked from one universal lockfile (pure).

The lockfiles here are shaped as `uv pip compile --universal` writes them; test_resolver.py
checks against real uv and a real index that the pick equals a per-environment resolution."""

from __future__ import annotations

import pytest
from packaging.markers import Marker

from core.install.pylock import LockedPackage, LockedWheel, read_packages
from core.install.universal import NotSelectable, fleet_marker, marker_environment, select_wheels
from shared.environments import Environment
from shared.manifest import TargetEnvironment


def env(name: str, python: str, platform: str) -> Environment:
    return Environment(
        name, TargetEnvironment(python, "cp", "cp" + python.replace(".", ""), platform)
    )


PY310 = env("py310", "3.10", "manylinux_2_17_x86_64")
PY312 = env("py312", "3.12", "manylinux_2_28_x86_64")
ARM = env("arm", "3.12", "manylinux_2_28_aarch64")
MAC = env("mac", "3.12", "macosx_11_0_arm64")
WIN = env("win", "3.11", "win_amd64")
MUSL = env("musl", "3.12", "musllinux_1_2_x86_64")


def package(name: str, version: str, tags: list[str], marker: str | None = None) -> LockedPackage:
    wheels = tuple(
        LockedWheel(
            name,
            version,
            f"{name}-{version}-{tag}.whl",
            f"https://i/{name}-{tag}.whl",
            f"{i:064x}",
            10,
            False,
        )
        for i, tag in enumerate(tags)
    )
    return LockedPackage(name, version, marker, wheels)


def picked(
    e: Environment, packages: list[LockedPackage], requested: set[str] | None = None
) -> dict[str, str]:
    wheels = select_wheels(e, "", packages, requested or set())
    return {
        w.name: w.filename.removeprefix(f"{w.name}-{w.version}-").removesuffix(".whl")
        for w in wheels
    }


NATIVE = package(
    "native",
    "1.0",
    [
        "cp310-cp310-manylinux_2_17_x86_64.manylinux2014_x86_64",
        "cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64",
        "cp312-cp312-manylinux_2_28_x86_64",
        "cp312-cp312-manylinux_2_17_aarch64",
        "cp312-cp312-macosx_11_0_arm64",
        "cp312-cp312-musllinux_1_2_x86_64",
        "cp311-cp311-win_amd64",
        "cp312-abi3-manylinux_2_17_x86_64",
    ],
)


def test_the_wheel_the_hosts_prefer_is_picked() -> None:
    assert (
        picked(PY310, [NATIVE])["native"]
        == "cp310-cp310-manylinux_2_17_x86_64.manylinux2014_x86_64"
    )
    assert picked(PY312, [NATIVE])["native"] == "cp312-cp312-manylinux_2_28_x86_64"  # newest glibc
    assert picked(ARM, [NATIVE])["native"] == "cp312-cp312-manylinux_2_17_aarch64"
    assert picked(MAC, [NATIVE])["native"] == "cp312-cp312-macosx_11_0_arm64"
    assert picked(MUSL, [NATIVE])["native"] == "cp312-cp312-musllinux_1_2_x86_64"
    assert picked(WIN, [NATIVE])["native"] == "cp311-cp311-win_amd64"


def test_a_specific_wheel_beats_a_pure_one() -> None:
    both = package("speedups", "2.0", ["py3-none-any", "cp312-cp312-manylinux_2_17_x86_64"])
    assert picked(PY312, [both])["speedups"] == "cp312-cp312-manylinux_2_17_x86_64"
    assert picked(PY310, [both])["speedups"] == "py3-none-any"


def test_markers_are_evaluated_for_each_environment() -> None:
    packages = [
        package("app", "1.0", ["py3-none-any"]),
        package("tomli", "2.0.1", ["py3-none-any"], "python_full_version < '3.11'"),
        package("armdep", "1.0", ["py3-none-any"], "platform_machine == 'aarch64'"),
        package("winonly", "1.0", ["py3-none-any"], "sys_platform == 'win32' and os_name == 'nt'"),
        package("macdep", "1.0", ["py3-none-any"], "platform_system == 'Darwin'"),
        package("cpy", "1.0", ["py3-none-any"], "implementation_name == 'cpython'"),
        package("pypy", "1.0", ["py3-none-any"], "platform_python_implementation == 'PyPy'"),
    ]
    assert set(picked(PY310, packages)) == {"app", "tomli", "cpy"}
    assert set(picked(PY312, packages)) == {"app", "cpy"}
    assert set(picked(ARM, packages)) == {"app", "armdep", "cpy"}
    assert set(picked(WIN, packages)) == {"app", "winonly", "cpy"}
    assert set(picked(MAC, packages)) == {"app", "macdep", "cpy"}


def test_a_fork_gives_each_environment_its_version() -> None:
    old = package(
        "numpy", "1.26.4", ["cp310-cp310-manylinux_2_17_x86_64"], "python_full_version < '3.12'"
    )
    new = package(
        "numpy", "2.1.0", ["cp312-cp312-manylinux_2_17_x86_64"], "python_full_version >= '3.12'"
    )
    assert [w.version for w in select_wheels(PY310, "", [old, new], set())] == ["1.26.4"]
    assert [w.version for w in select_wheels(PY312, "", [old, new], set())] == ["2.1.0"]


def test_the_fleet_marker_holds_on_exactly_the_fleets_hosts() -> None:
    marker = Marker(fleet_marker([PY310, ARM, MUSL, WIN], ""))
    for e in (PY310, ARM, MUSL, WIN):
        assert marker.evaluate(marker_environment(e, "", 3))
    for e in (MAC, env("arm313", "3.13", "manylinux_2_28_aarch64"), env("w", "3.12", "win_arm64")):
        assert not marker.evaluate(marker_environment(e, "", 3))
    # PY312 and MUSL share every marker value: one clause serves both.
    assert fleet_marker([PY312, MUSL], "").count(" or ") == 0


def test_a_platform_without_one_marker_value_is_not_guessed() -> None:
    # 32-bit CPython on 64-bit Windows reports platform_machine AMD64: no single answer.
    with pytest.raises(NotSelectable, match="no marker values are known for platform win32"):
        marker_environment(env("w32", "3.12", "win32"), "", 0)
    with pytest.raises(NotSelectable):
        fleet_marker([PY310, env("mac2", "3.12", "macosx_11_0_universal2")], "")


def test_marker_values_of_each_platform() -> None:
    assert marker_environment(ARM, "", 0)["platform_machine"] == "aarch64"
    assert marker_environment(PY312, "", 7)["python_full_version"] == "3.12.7"
    assert marker_environment(WIN, "", 0)["platform_machine"] == "AMD64"
    assert marker_environment(MAC, "", 0)["sys_platform"] == "darwin"
    assert marker_environment(MUSL, "", 0)["sys_platform"] == "linux"
    # An environment without a platform is the core's own.
    native = Environment("default", TargetEnvironment("3.12", "cp", "cp312", ""))
    assert marker_environment(native, "manylinux_2_28_aarch64", 0)["platform_machine"] == "aarch64"


@pytest.mark.parametrize(
    ("packages", "rule"),
    [
        # A value we do not know for the hosts: never filled in from the core's own interpreter.
        (
            [package("k", "1", ["py3-none-any"], "platform_release >= '6'")],
            "reads platform_release",
        ),
        (
            [package("k", "1", ["py3-none-any"], "platform.machine == 'x86_64'")],
            "reads platform.machine",
        ),
        # The environment says 3.12, not which patch release.
        ([package("k", "1", ["py3-none-any"], "python_full_version >= '3.12.4'")], "patch release"),
        ([package("k", "1", ["cp311-cp311-manylinux_2_17_x86_64"])], "no wheel fits"),
        ([package("k", "1", ["py3-none-any"], "python_version ~= '3'")], "cannot be"),
        (
            [package("k", "1", ["py3-none-any"]), package("k", "2", ["py3-none-any"])],
            "a second version of k",
        ),
    ],
)
def test_what_the_lockfile_does_not_answer_is_not_guessed(
    packages: list[LockedPackage], rule: str
) -> None:
    with pytest.raises(NotSelectable, match=rule):
        select_wheels(PY312, "", packages, set())


def test_a_pin_the_lockfile_drops_for_an_environment_is_refused() -> None:
    app = package("app", "1.0", ["py3-none-any"], "python_full_version < '3.11'")
    with pytest.raises(NotSelectable, match="app not selected"):
        select_wheels(PY312, "", [app], {"app"})


def test_a_universal_lockfile_is_read_with_markers_and_every_wheel() -> None:
    def wheel(name: str, digit: str) -> str:
        return f'{{ url = "https://i/{name}.whl", hashes = {{ sha256 = "{digit * 64}" }} }}'

    text = f"""lock-version = "1.0"
requires-python = ">=3.10"
[[packages]]
name = "Tomli"
version = "2.0.1"
marker = "python_full_version < '3.11'"
wheels = [{wheel("tomli-2.0.1-py3-none-any", "a")}]
[[packages]]
name = "native"
version = "1.0"
wheels = [
  {wheel("native-1.0-cp310-cp310-manylinux_2_17_x86_64", "b")},
  {wheel("native-1.0-cp312-cp312-manylinux_2_17_x86_64", "c")},
]
"""
    tomli, native = read_packages(text, {"native"}, "the universal resolution")
    assert (tomli.name, tomli.marker, len(tomli.wheels)) == (
        "tomli",
        "python_full_version < '3.11'",
        1,
    )
    assert native.marker is None and [w.sha256[0] for w in native.wheels] == ["b", "c"]
    assert all(w.requested for w in native.wheels) and not tomli.wheels[0].requested
    assert [w.sha256[0] for w in select_wheels(PY312, "", [tomli, native], {"native"})] == ["c"]
