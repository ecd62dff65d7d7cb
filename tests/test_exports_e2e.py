"""Exports and editor support against the real core, a real index, a real satellite and the
real installers (uv, pip): every route to a release's files gives the satellite's tree.

    export --format pylock         installed by `uv pip install -r` and `pip install -r`
    export --format requirements   installed by `pip install --require-hashes` and uv's
    admin tree HASH DIR            built from the core's blobs: identical, byte for byte
    spk-satellite env --paths      names the satellite's tree and interpreter

Comparing an installer's --target dir with the tree, these are ignored, because installers add
or rewrite them and a satellite does not install, it unpacks: in every `*.dist-info/`,
INSTALLER and REQUESTED (PEP 376/627: who installed it, was it asked for), direct_url.json (PEP
610, written for a URL install) and RECORD (rewritten by installers to list what they wrote);
any `__pycache__/` (bytecode an installer compiles; the runner keeps bytecode outside the
tree); and `.lock` at the top of the target (uv's lock on the directory it installs into).
Every other file must be present in both, with the same content.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.conftest import INDEX_TOKEN
from tests.core_process import ADMIN_TOKEN, CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.satellite_process import SatelliteProcess, export_signing_key
from tests.wheelfactory import WheelSpec, build_wheel

INSTALLER_FILES = {"INSTALLER", "REQUESTED", "direct_url.json", "RECORD"}
FileMap = dict[str, str]


def _files(root: Path, ignore_installer_files: bool) -> FileMap:
    """rel path -> sha256 of every file under root, following the tree's links."""
    found: FileMap = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not (ignore_installer_files and d == "__pycache__")]
        for name in filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            parent = rel.rpartition("/")[0]
            if ignore_installer_files and (
                (parent.endswith(".dist-info") and name in INSTALLER_FILES) or rel == ".lock"
            ):
                continue
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _clean_env(tmp_path: Path) -> dict[str, str]:
    """No user config may steer the installers (they must use only what the export says)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_", "SPK_"))}
    env.update(
        HOME=str(tmp_path / "home"), PIP_CONFIG_FILE=os.devnull, UV_NO_CONFIG="1",
        XDG_CONFIG_HOME=str(tmp_path / "xdg"), PIP_DISABLE_PIP_VERSION_CHECK="1",
    )  # fmt: skip
    return env


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, f"{argv}\n{out.stdout}\n{out.stderr}"
    return out


def _uv() -> str:
    from uv import find_uv_bin

    return str(find_uv_bin())


@pytest.fixture
def core(package_index: PackageIndex, core: CoreProcess) -> CoreProcess:
    core.admin().SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
    return core


def _admin_cli(core: CoreProcess, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN_TOKEN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPK_")}
    return subprocess.run(
        [sys.executable, "-m", "core.app.cli", "admin", "--core", core.target,
         "--token-file", str(token_file), *args],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip


def _wheels(wheel_dir: Path) -> None:
    build_wheel(
        WheelSpec(
            "alpha",
            "1.0",
            requires=["beta==2.0"],
            files={
                "alpha/__init__.py": b"from beta import B\nA = 1\n",
                "alpha/templates/page.html": b"<p>{{ x }}</p>\n",
                "alpha-1.0.data/purelib/alpha_plugin.py": b"PLUGIN = True\n",  # PEP 427 .data
            },
        ),
        wheel_dir,
    )
    build_wheel(WheelSpec("beta", "2.0", files={"beta.py": b"B = 2\n"}), wheel_dir)
    # Two wheels sharing a namespace directory: a real directory in the tree, links inside.
    build_wheel(WheelSpec("ns-one", "1.0", files={"ns/one/__init__.py": b"ONE = 1\n"}), wheel_dir)
    build_wheel(WheelSpec("ns-two", "1.0", files={"ns/two/__init__.py": b"TWO = 2\n"}), wheel_dir)


def test_exports_install_with_uv_and_pip_to_exactly_the_satellite_tree(
    core: CoreProcess,
    package_index: PackageIndex,
    wheel_dir: Path,
    tmp_path: Path,
    satellites: list[SatelliteProcess],
) -> None:
    _wheels(wheel_dir)
    admin = core.admin()
    admin.SetPackages(
        apb.SetPackagesRequest(
            packages=[apb.PackageSpec(name=n, version="1.0") for n in ("alpha", "ns-one", "ns-two")]
        )
    )
    state = admin.install_and_wait()
    assert state.status == apb.INSTALL_STATUS_READY, state.error
    wanted = state.lockfile_hash
    sat = SatelliteProcess(core, "editor-host", tmp_path).register().start()
    satellites.append(sat)
    eventually(lambda: sat.current() == wanted, timeout=60, interval=0.2)
    tree_site = sat.data_dir / "trees" / wanted / "site-packages"
    tree = _files(tree_site, ignore_installer_files=False)
    expected = _files(tree_site, ignore_installer_files=True)
    assert "alpha_plugin.py" in expected and "ns/two/__init__.py" in expected

    pylock = tmp_path / "pylock.toml"
    requirements = tmp_path / "requirements.txt"
    for fmt, path in (("pylock", pylock), ("requirements", requirements)):
        out = _admin_cli(core, tmp_path, "export", "--format", fmt, "-o", str(path))
        assert out.returncode == 0, out.stderr
    text = pylock.read_text()
    assert f'lockfile-hash = "{wanted}"' in text
    assert f'index = "{package_index.url}"' in text
    assert f'url = "{package_index.base_url}/packages/alpha-1.0-py3-none-any.whl"' in text
    assert "--hash=sha256:" in requirements.read_text()

    env = _clean_env(tmp_path)
    py = ["--python", sys.executable, "--cache-dir", str(tmp_path / "uv-cache"), "--no-progress"]
    pip = [sys.executable, "-m", "pip", "install", "--no-cache-dir", "--no-compile"]
    targets = {
        "uv + pylock": ([_uv(), "pip", "install", *py, "-r", str(pylock)], tmp_path / "t-uv-lock"),
        "pip + pylock": ([*pip, "-r", str(pylock)], tmp_path / "t-pip-lock"),
        "pip + requirements": (
            [*pip, "--require-hashes", "-r", str(requirements), "--index-url", package_index.url],
            tmp_path / "t-pip-req",
        ),
        "uv + requirements": (
            [
                _uv(),
                "pip",
                "install",
                *py,
                "--require-hashes",
                "-r",
                str(requirements),
                "--index-url",
                package_index.url,
            ],
            tmp_path / "t-uv-req",
        ),
    }
    for label, (argv, target) in targets.items():
        _run([*argv, "--target", str(target)], env)
        assert _files(target, ignore_installer_files=True) == expected, label

    # An editor anywhere else: the same tree from the core's blobs, every file identical
    # (the wheels' own RECORD included: nothing was installed, only unpacked and linked).
    editor_dir = tmp_path / "editor"
    key = export_signing_key(core, tmp_path / "core-key.pem")
    out = _admin_cli(core, tmp_path, "tree", wanted, str(editor_dir), "--signing-key", str(key))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(editor_dir / "site-packages")
    assert _files(editor_dir / "site-packages", ignore_installer_files=False) == tree
    assert os.readlink(editor_dir / "site-packages") == f"trees/{wanted}/site-packages"
    again = _admin_cli(core, tmp_path, "tree", wanted, str(editor_dir))  # idempotent
    assert again.returncode == 0, again.stderr

    # An editor on the satellite host: where scripts import from, and with what.
    paths = _run(
        [sys.executable, "-m", "satellite.cli", "env", "--paths", "--data-dir", str(sat.data_dir)],
        dict(os.environ),
    )
    assert paths.stdout.strip() == str(tree_site.absolute())
    doc = json.loads(
        _run(
            [
                sys.executable,
                "-m",
                "satellite.cli",
                "env",
                "--paths",
                "--json",
                "--data-dir",
                str(sat.data_dir),
            ],
            dict(os.environ),
        ).stdout
    )
    assert doc["site_packages"] == str(tree_site.absolute())
    assert doc["interpreter"] == sys.executable and doc["interpreter_flags"] == ["-I", "-S"]
    assert doc["lockfile_hash"] == wanted and doc["state"] == "ready"


def test_tree_refuses_an_unknown_hash_and_a_foreign_dir(
    core: CoreProcess, wheel_dir: Path, tmp_path: Path
) -> None:
    build_wheel(WheelSpec("beta", "2.0"), wheel_dir)
    admin = core.admin()
    admin.SetPackages(
        apb.SetPackagesRequest(packages=[apb.PackageSpec(name="beta", version="2.0")])
    )
    state = admin.install_and_wait()
    assert state.status == apb.INSTALL_STATUS_READY, state.error

    target = tmp_path / "never-made"
    unknown = _admin_cli(core, tmp_path, "tree", "ab" * 32, str(target))
    assert unknown.returncode == 1
    assert f"NOT_FOUND: no manifest with lockfile hash {'ab' * 32}" in unknown.stderr
    assert not target.exists()  # never an empty tree

    foreign = tmp_path / "home-dir"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = _admin_cli(core, tmp_path, "tree", state.lockfile_hash, str(foreign))
    assert refused.returncode == 1 and "was not made by `spk-core admin tree`" in refused.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    bad = _admin_cli(core, tmp_path, "export", "ab" * 32)
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr
    wrong_env = _admin_cli(core, tmp_path, "export", state.lockfile_hash, "--environment", "nope")
    assert wrong_env.returncode == 1 and "INVALID_ARGUMENT: environment" in wrong_env.stderr


def test_exports_never_carry_credentials(
    core: CoreProcess, auth_package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    build_wheel(WheelSpec("beta", "2.0"), wheel_dir)
    admin = core.admin()
    admin.SetRegistryConfig(
        apb.SetRegistryConfigRequest(index_url=auth_package_index.url, auth_token=INDEX_TOKEN)
    )
    admin.SetPackages(
        apb.SetPackagesRequest(packages=[apb.PackageSpec(name="beta", version="2.0")])
    )
    state = admin.install_and_wait()
    assert state.status == apb.INSTALL_STATUS_READY, state.error
    for fmt in ("pylock", "requirements"):
        export = admin.GetReleaseExport(apb.GetReleaseExportRequest(format=fmt))
        assert export.lockfile_hash == state.lockfile_hash
        assert INDEX_TOKEN not in export.content and "__token__" not in export.content
        assert "@" not in export.content  # no userinfo in any URL
        assert auth_package_index.url in export.content


def test_releases_from_before_origins_export_and_materialise(tmp_path: Path) -> None:
    """A core upgraded in place (schema 2 -> 4): its old releases have no recorded origins.
    The export names the configured index and lets the installer find each pinned file; the
    tree comes from the blobs as for any release."""
    fixture_dir = Path(__file__).parent / "data" / "core-before-environments"
    fixture = json.loads((fixture_dir / "fixture.json").read_text())
    data = tmp_path / "core"
    shutil.copytree(fixture_dir, data, ignore=shutil.ignore_patterns("fixture.json"))
    os.chmod(data / "secret.key", 0o600)
    core = CoreProcess(data, admin_token=fixture["admin_token"]).start()
    try:
        admin = core.admin()
        index = admin.GetRegistryConfig().index_url
        export = admin.GetReleaseExport(apb.GetReleaseExportRequest(format="pylock"))
        assert export.lockfile_hash == fixture["desired"]
        assert "url = " not in export.content  # never a guessed URL
        assert export.content.count(f'index = "{index}"') == 2  # oldpkg, olddep
        token_file = tmp_path / "admin.token"
        token_file.write_text(fixture["admin_token"])
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPK_")}
        out = subprocess.run(
            [sys.executable, "-m", "core.app.cli", "admin", "--core", core.target,
             "--token-file", str(token_file), "tree", fixture["previous"], str(tmp_path / "ed")],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert (tmp_path / "ed" / "site-packages" / "oldpkg").is_dir()
    finally:
        core.stop()


def test_read_tokens_export_and_stream_blobs_but_cannot_audit_or_set_policy(
    core: CoreProcess, wheel_dir: Path
) -> None:
    wheel = build_wheel(WheelSpec("beta", "2.0", files={"beta.py": b"B = 2\n" * 40_000}), wheel_dir)
    admin = core.admin()
    admin.SetPackages(
        apb.SetPackagesRequest(packages=[apb.PackageSpec(name="beta", version="2.0")])
    )
    assert admin.install_and_wait().status == apb.INSTALL_STATUS_READY
    created = subprocess.run(
        [sys.executable, "-m", "core.app.cli", "admin-token", "create", "--role", "read",
         "--data-dir", str(core.data_dir)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    reader = core.admin(token=created.stdout.strip())
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()

    def blob(offset: int) -> bytes:
        request = apb.GetBlobRequest(sha256=sha, offset=offset)
        chunks = list(reader.stub.GetBlob(request, metadata=reader.metadata, timeout=30))
        assert all(c.total_size == wheel.stat().st_size for c in chunks)
        return b"".join(c.data for c in chunks)

    assert blob(0) == wheel.read_bytes()
    assert blob(1000) == wheel.read_bytes()[1000:]  # resumable, like DownloadBlob
    assert (
        "beta==2.0"
        in reader.GetReleaseExport(apb.GetReleaseExportRequest(format="requirements")).content
    )
    assert reader.GetAuditPolicy().source == "json"
    for method, request in (
        ("AuditRelease", apb.AuditReleaseRequest()),
        ("SetAuditPolicy", apb.SetAuditPolicyRequest(block_severity="high")),
    ):
        with pytest.raises(grpc.RpcError) as err:
            getattr(reader, method)(request)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        list(reader.stub.GetBlob(apb.GetBlobRequest(sha256="ab" * 32), metadata=reader.metadata))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
