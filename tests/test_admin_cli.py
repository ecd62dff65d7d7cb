"""`spk-core admin ...` against the real core and a real package index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.app.admin_cli import parse_pin, parse_size
from shared.errors import InvalidArgument
from tests.core_process import ADMIN_TOKEN, CoreProcess
from tests.index_server import PackageIndex
from tests.wheelfactory import WheelSpec, build_wheel


def test_parse_size_and_pin() -> None:
    assert parse_size("150MiB", "warn") == 150 * 2**20
    assert parse_size("1.5GiB", "warn") == int(1.5 * 2**30)
    assert parse_size("42", "warn") == 42
    with pytest.raises(InvalidArgument, match="warn"):
        parse_size("lots", "warn")
    assert (parse_pin("six==1.17.0").name, parse_pin("six==1.17.0").version) == ("six", "1.17.0")
    with pytest.raises(InvalidArgument, match="NAME==VERSION"):
        parse_pin("six>=1")


def test_admin_cli_drives_an_install(
    core: CoreProcess, package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    build_wheel(WheelSpec("alpha", "1.0", requires=["beta==1.0"]), wheel_dir)
    build_wheel(WheelSpec("beta", "1.0"), wheel_dir)
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN_TOKEN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPK_")}

    def admin(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "core.app.cli", "admin", "--core", core.target,
             "--token-file", str(token_file), *args],
            capture_output=True, text=True, timeout=120, env=env, input=stdin,
        )  # fmt: skip

    assert admin("registry", "set", "--index-url", package_index.url).returncode == 0
    pins = "alpha==1.0  # the app\n\n"
    assert admin("packages", "set", "-", stdin=pins).returncode == 0
    assert admin("packages", "list").stdout.strip() == "alpha==1.0"
    bad = admin("packages", "add", "beta>=1")
    assert bad.returncode == 1 and "NAME==VERSION" in bad.stderr
    install = admin("install")
    assert install.returncode == 0, install.stderr
    assert "status=ready" in install.stdout.splitlines()[-1]
    manifest = json.loads(admin("--json", "manifest").stdout)
    assert {e["name"] for e in manifest["entries"]} == {"alpha", "beta"}
    assert admin("size-cap", "set", "2MiB", "1MiB").returncode == 1  # warn > block refused
    created = admin("satellites", "create", "host-a", "--token-out", str(tmp_path / "sat.token"))
    assert created.returncode == 0 and "spk_sat_" not in created.stdout
    assert (tmp_path / "sat.token").read_text().startswith("spk_sat_")
    assert (tmp_path / "sat.token").stat().st_mode & 0o077 == 0
    assert "host-a" in admin("satellites", "list").stdout
    denied = subprocess.run(
        [sys.executable, "-m", "core.app.cli", "admin", "--core", core.target, "state"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert denied.returncode == 1 and "no admin token" in denied.stderr
