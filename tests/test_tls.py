"""TLS, mTLS and the plaintext-token rule, with certificates from `spk-core certs init`."""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from core.api.auth import TransportPolicy, _check_transport, _is_loopback
from shared.errors import Unauthenticated
from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from shared.proto.scriptpkgs.v1 import admin_pb2_grpc
from tests.core_process import ADMIN_TOKEN, CoreProcess, eventually
from tests.satellite_process import SatelliteProcess, export_signing_key


def _certs(tmp_path: Path, *clients: str) -> Path:
    out = tmp_path / "pki"
    args = [sys.executable, "-m", "core.app.cli", "certs", "init", str(out), "--host", "localhost",
            "--host", "127.0.0.1"]  # fmt: skip
    for name in clients:
        args += ["--client", name]
    subprocess.run(args, check=True, capture_output=True, timeout=60)
    return out


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    return _certs(tmp_path, "sat-tls", "admin", "someone-else")


def _tls_core(tmp_path: Path, pki: Path, mtls: bool) -> CoreProcess:
    core = CoreProcess(tmp_path / "core")
    flags = ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")]
    if mtls:
        flags += ["--tls-client-ca", str(pki / "ca.pem")]
    core.extra_args = flags
    return core.start()


@pytest.fixture
def tls_core(tmp_path: Path, pki: Path) -> Iterator[CoreProcess]:
    core = _tls_core(tmp_path, pki, mtls=False)
    yield core
    core.stop()


def _admin_over_tls(core: CoreProcess, pki: Path, client: str | None = None) -> Any:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / f"{client}.key").read_bytes() if client else None,
        certificate_chain=(pki / f"{client}.pem").read_bytes() if client else None,
    )
    channel = grpc.secure_channel(f"localhost:{core.port}", creds)
    return channel, admin_pb2_grpc.PackageAdminStub(channel)


def test_certs_init_writes_private_keys_0600(pki: Path) -> None:
    for key in pki.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (pki / "ca.pem").exists() and (pki / "server.pem").exists()
    again = subprocess.run(
        [sys.executable, "-m", "core.app.cli", "certs", "init", str(pki), "--host", "x"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert again.returncode == 1 and "already holds a CA" in again.stderr


def test_tls_admin_and_satellite(tls_core: CoreProcess, pki: Path, tmp_path: Path) -> None:
    channel, admin = _admin_over_tls(tls_core, pki)
    md = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    assert admin.ListPackages(apb.ListPackagesRequest(), metadata=md, timeout=10).packages == []
    channel.close()
    # A plaintext client cannot talk to the TLS port at all.
    with grpc.insecure_channel(tls_core.target) as plain:
        stub = admin_pb2_grpc.PackageAdminStub(plain)
        with pytest.raises(grpc.RpcError) as err:
            stub.ListPackages(apb.ListPackagesRequest(), metadata=md, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    channel, admin = _admin_over_tls(tls_core, pki)
    state = _install_empty(admin, md)
    token = admin.CreateSatellite(
        apb.CreateSatelliteRequest(name="sat-tls"), metadata=md, timeout=10
    ).token
    channel.close()
    sat = SatelliteProcess(tls_core, "sat-tls", tmp_path, "--ca-file", str(pki / "ca.pem"))
    sat.token_file.write_text(token)
    _export_key(tls_core, sat.key_file)
    sat.target = f"localhost:{tls_core.port}"
    sat.start()
    try:
        eventually(lambda: sat.current() == state, timeout=60)
    finally:
        sat.stop()


def _install_empty(admin: Any, md: Any) -> str:
    admin.InstallNow(apb.InstallNowRequest(), metadata=md, timeout=10)

    def ready() -> Any:
        s = admin.GetInstallState(apb.GetInstallStateRequest(), metadata=md, timeout=10)
        return s if s.status == apb.INSTALL_STATUS_READY else None

    state = eventually(ready, timeout=60)
    return str(state.lockfile_hash)


def _export_key(core: CoreProcess, dest: Path) -> None:
    export_signing_key(core, dest)


def test_mtls_binds_certificate_to_satellite_name(pki: Path, tmp_path: Path) -> None:
    core = _tls_core(tmp_path, pki, mtls=True)
    md = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    try:
        channel, admin = _admin_over_tls(core, pki)  # no client cert: handshake refused
        with pytest.raises(grpc.RpcError):
            admin.ListPackages(apb.ListPackagesRequest(), metadata=md, timeout=5)
        channel.close()
        channel, admin = _admin_over_tls(core, pki, client="admin")
        state = _install_empty(admin, md)
        token = admin.CreateSatellite(
            apb.CreateSatelliteRequest(name="sat-tls"), metadata=md, timeout=10
        ).token
        channel.close()
        _export_key(core, tmp_path / "core-key.pem")
        base = ["--ca-file", str(pki / "ca.pem")]
        wrong = SatelliteProcess(core, "sat-tls", tmp_path / "wrong", *base,
                                 "--client-cert", str(pki / "someone-else.pem"),
                                 "--client-key", str(pki / "someone-else.key"))  # fmt: skip
        good = SatelliteProcess(core, "sat-tls", tmp_path, *base,
                                "--client-cert", str(pki / "sat-tls.pem"),
                                "--client-key", str(pki / "sat-tls.key"))  # fmt: skip
        for sat in (wrong, good):
            sat.token_file.parent.mkdir(parents=True, exist_ok=True)
            sat.token_file.write_text(token)
            sat.key_file.write_text((tmp_path / "core-key.pem").read_text())
            sat.target = f"localhost:{core.port}"
            sat.start()
        try:
            eventually(lambda: good.current() == state, timeout=60)
            eventually(
                lambda: "client certificate is for 'someone-else'" in wrong.log(), timeout=30
            )
            assert wrong.current() is None
        finally:
            wrong.stop()
            good.stop()
    finally:
        core.stop()


class _Ctx:
    def __init__(self, peer: str, tls: bool) -> None:
        self._peer, self._tls = peer, tls

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"transport_security_type": [b"ssl" if self._tls else b"insecure"]}


def test_plaintext_tokens_only_on_loopback_unless_insecure() -> None:
    assert _is_loopback("ipv4:127.0.0.1:5000") and _is_loopback("ipv6:[::1]:5000")
    assert _is_loopback("unix:/run/spk.sock") and not _is_loopback("ipv4:10.1.2.3:5000")
    strict, lax = TransportPolicy(), TransportPolicy(allow_plaintext_tokens=True)
    assert _check_transport(_Ctx("ipv4:127.0.0.1:1", tls=False), strict) is False  # type: ignore[arg-type]
    assert _check_transport(_Ctx("ipv4:192.0.2.7:1", tls=True), strict) is True  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated, match="plaintext"):
        _check_transport(_Ctx("ipv4:192.0.2.7:1", tls=False), strict)  # type: ignore[arg-type]
    assert _check_transport(_Ctx("ipv4:192.0.2.7:1", tls=False), lax) is False  # type: ignore[arg-type]


def test_agent_refuses_plaintext_to_a_remote_core(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("spk_sat_secret-value")
    out = subprocess.run(
        [sys.executable, "-m", "satellite.cli", "agent", "--core", "core.example.invalid:50051",
         "--token-file", str(token), "--data-dir", str(tmp_path / "d"), "--trust-on-first-use"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1 and "plaintext" in out.stderr
    assert "spk_sat_secret-value" not in out.stderr
