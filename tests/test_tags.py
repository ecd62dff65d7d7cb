"""shared.tags: which wheels fit an interpreter, and how it describes itself."""

from __future__ import annotations

import platform

import pytest
from packaging.tags import Tag, sys_tags

from shared.errors import InvalidArgument
from shared.tags import describe_interpreter, unsupported_wheels

MANYLINUX_311 = [
    Tag("cp311", "cp311", "manylinux_2_17_x86_64"),
    Tag("cp311", "abi3", "manylinux_2_17_x86_64"),
    Tag("py3", "none", "manylinux_2_17_x86_64"),
    Tag("py3", "none", "any"),
]


def test_pure_wheels_fit_this_interpreter() -> None:
    assert unsupported_wheels(["six-1.16.0-py2.py3-none-any.whl", "a-1.0-py3-none-any.whl"]) == []


def test_the_interpreters_own_best_tag_fits() -> None:
    best = next(iter(sys_tags()))
    assert unsupported_wheels([f"demo-1.0-{best}.whl"]) == []


def test_foreign_wheels_are_reported_in_input_order() -> None:
    names = [
        "numpy-2.0.0-cp311-cp311-win_amd64.whl",
        "a-1.0-py3-none-any.whl",
        "numpy-2.0.0-cp27-cp27mu-manylinux1_x86_64.whl",
    ]
    assert unsupported_wheels(iter(names)) == [names[0], names[2]]


def test_explicit_supported_set() -> None:
    names = [
        "numpy-2.0.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "cryptography-42.0.0-cp39-abi3-manylinux_2_28_x86_64.whl",  # needs glibc 2.28
        "orjson-3.0.0-cp312-cp312-manylinux_2_17_x86_64.whl",
        "tool-1.0-py3-none-manylinux_2_17_x86_64.whl",
        "pure-1.0-py2.py3-none-any.whl",
    ]
    assert unsupported_wheels(names, MANYLINUX_311) == [names[1], names[2]]
    assert unsupported_wheels(names, (t for t in MANYLINUX_311)) == [names[1], names[2]]
    assert unsupported_wheels(names, []) == names


def test_invalid_filename_is_an_error_not_unsupported() -> None:
    with pytest.raises(InvalidArgument, match=r"'demo-1\.0\.tar\.gz' is not a valid wheel"):
        unsupported_wheels(["a-1.0-py3-none-any.whl", "demo-1.0.tar.gz"])


def test_describe_interpreter() -> None:
    text = describe_interpreter()
    best = next(iter(sys_tags()))
    assert text.startswith(f"{best.interpreter} / ")
    assert text.endswith(f"({platform.python_implementation()} {platform.python_version()})")
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert " / manylinux_2_" in text  # the glibc policy, not the bare linux_x86_64
