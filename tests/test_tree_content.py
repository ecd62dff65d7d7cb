"""shared.tree_content: what a wheel may put into a tree, at the core and at the satellite.

Real wheels (tests/wheelfactory.py) through inspect_wheel (the core's check) and extract_wheel
(the satellite's unpack), then end to end through a real core and satellite.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shared.errors import UnsafeWheel
from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from shared.tree_content import AT_SATELLITE, TreeContentPolicy, startup_hook
from shared.wheels import extract_wheel, inspect_wheel
from tests import core_tamper
from tests.core_process import CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.satellite_process import SatelliteProcess
from tests.test_wheels import record_hash, spec, tree
from tests.wheelfactory import build_wheel

EVIL = b"import os; open(os.environ['SPK_TEST_PTH_RAN'], 'w').close()\n"
ALLOW_DEMO = TreeContentPolicy.allowing(["Demo"])

HOOKS = [
    "evil.pth",
    "demo-1.0.data/purelib/evil.pth",  # merged into the root, so it is a top-level .pth
    "sitecustomize.py",
    "usercustomize.py",
    "sitecustomize.pyc",
    "sitecustomize.cpython-311-x86_64-linux-gnu.so",
    "sitecustomize/__init__.py",
]


@pytest.mark.parametrize("hook", HOOKS)
def test_a_startup_hook_is_refused_at_the_core_naming_the_entry_and_the_fix(
    tmp_path: Path, hook: str
) -> None:
    wheel = build_wheel(spec({hook: EVIL}), tmp_path / "w")
    with pytest.raises(UnsafeWheel) as inspected:
        inspect_wheel(wheel)
    with pytest.raises(UnsafeWheel) as extracted:
        extract_wheel(wheel, tmp_path / "dest")
    for info in (inspected, extracted):
        assert f"entry {hook!r} is a start-up hook" in str(info.value)
        assert "spk-core serve --allow-pth demo" in str(info.value)
    assert not (tmp_path / "dest").exists()


def test_hooks_are_only_top_level_and_only_those_names() -> None:
    assert startup_hook("x.pth") and startup_hook("sitecustomize/sub.py")
    assert not startup_hook("pkg/x.pth")  # site reads .pth files in site dirs only
    assert not startup_hook("sitecustomizer.py")
    assert not startup_hook("sitecustomize-1.0.dist-info/METADATA")  # a package of that name


def test_an_allowed_package_installs_with_the_hook_left_out(tmp_path: Path) -> None:
    wheel = build_wheel(spec({"evil.pth": EVIL, "pkg/nested.pth": b"ok\n"}), tmp_path / "w")
    assert inspect_wheel(wheel, content=ALLOW_DEMO).name == "demo"
    info = extract_wheel(wheel, tmp_path / "dest", content=ALLOW_DEMO)
    extracted = tree(tmp_path / "dest")
    assert "evil.pth" not in extracted and "evil.pth" not in info.hashes
    assert extracted["pkg/nested.pth"] == b"ok\n"  # not a start-up hook: kept
    assert extracted["pkg/data.txt"] == b"hello"


def test_a_left_out_entry_is_still_checked_against_record(tmp_path: Path) -> None:
    lies = {"evil.pth": f"{record_hash(b'something else')},{len(EVIL)}"}
    wheel = build_wheel(spec({"evil.pth": EVIL}, record_overrides=lies), tmp_path / "w")
    with pytest.raises(UnsafeWheel, match=r"'evil\.pth' RECORD hash mismatch"):
        extract_wheel(wheel, tmp_path / "dest", content=AT_SATELLITE)
    script_lies = {"demo-1.0.data/scripts/tool": f"{record_hash(b'x')},1"}
    wheel = build_wheel(
        spec({"demo-1.0.data/scripts/tool": b"#!python\n"}, record_overrides=script_lies),
        tmp_path / "w2",
    )
    with pytest.raises(UnsafeWheel, match=r"scripts/tool' RECORD size mismatch"):
        inspect_wheel(wheel)


def test_the_satellite_leaves_hooks_out_without_refusing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wheel = build_wheel(spec({"evil.pth": EVIL, "usercustomize.py": EVIL}), tmp_path / "w")
    with caplog.at_level(logging.WARNING, logger="shared.tree_content"):
        extract_wheel(wheel, tmp_path / "dest", content=AT_SATELLITE)
    assert set(tree(tmp_path / "dest")) == {
        "pkg/__init__.py",
        "pkg/data.txt",
        *(f"demo-1.0.dist-info/{n}" for n in ("METADATA", "WHEEL", "RECORD")),
    }
    assert "left out start-up hook(s) evil.pth, usercustomize.py" in caplog.text


def _site_runs_nothing(site_dir: Path, tmp_path: Path) -> None:
    """An interpreter that treats the tree as a site dir (what an editor or export would do)."""
    marker = tmp_path / "pth-ran"
    subprocess.run(
        [sys.executable, "-I", "-c", f"import site; site.addsitedir({str(site_dir)!r})"],
        env={"SPK_TEST_PTH_RAN": str(marker)},
        check=True,
        timeout=60,
    )
    assert not marker.exists()


def test_core_refuses_then_allows_and_the_satellite_leaves_the_hook_out(
    tmp_path: Path, package_index: PackageIndex, wheel_dir: Path
) -> None:
    wheel = build_wheel(spec({"evil.pth": EVIL}), tmp_path / "w")
    shutil.copyfile(wheel, wheel_dir / wheel.name)
    core = CoreProcess(tmp_path / "core")
    core.extra_args = ["--desired-poll-seconds", "0.2"]
    core.start()
    sat = SatelliteProcess(core, "sat-pth", tmp_path)
    try:
        admin = core.admin()
        admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
        admin.SetPackages(
            apb.SetPackagesRequest(packages=[apb.PackageSpec(name="demo", version="1.0")])
        )
        state = admin.install_and_wait()
        assert state.status == apb.INSTALL_STATUS_ERROR
        assert "'evil.pth' is a start-up hook" in state.error and "--allow-pth demo" in state.error

        # Defence in depth: the same wheel under a validly signed manifest (a compromised
        # core) reaches the satellite, which builds the tree without the hook.
        entry = core_tamper.put_blob(core.data_dir, wheel)
        wanted = core_tamper.publish_signed(core.data_dir, [entry])
        sat.register().start()
        eventually(lambda: sat.current() == wanted, timeout=60)
        site_dir = sat.data_dir / "trees" / wanted / "site-packages"
        assert (site_dir / "pkg" / "data.txt").read_bytes() == b"hello"
        assert not (site_dir / "evil.pth").exists()
        assert "left out start-up hook(s) evil.pth" in sat.log()
        _site_runs_nothing(site_dir, tmp_path)

        core.stop()
        core.extra_args += ["--allow-pth", "Demo"]
        core.start()
        state = core.admin().install_and_wait()
        assert state.status == apb.INSTALL_STATUS_READY, state.error
    finally:
        sat.stop()
        core.stop()
