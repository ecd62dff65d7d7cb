"""Sandbox policies: the TOML format, presets, tightening, the host policy file and its trust.

Pure parsing and file checks; the runs themselves are in tests/test_sandbox_run.py.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

from satellite.cli import split_sandbox_value
from satellite.host_policy import (
    HOST_POLICY,
    install_host_policy,
    load_host_policy,
    run_policy,
    unprivileged_ids,
)
from satellite.sandbox import rlimits, script_env
from satellite.sandbox_policy import Limits, SandboxPolicy, request_from
from satellite.sandbox_view import interpreter
from shared.errors import InvalidArgument, SandboxUnavailable


def write(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    path.chmod(0o644)
    return path


def host(data_dir: Path, body: str) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    return write(data_dir / HOST_POLICY, body)


def test_no_host_policy_and_no_flag_is_unsandboxed(tmp_path: Path) -> None:
    chosen = run_policy(tmp_path, None)
    assert chosen.policy is None and not chosen.mandatory


def test_bare_flag_is_the_default_preset(tmp_path: Path) -> None:
    policy = run_policy(tmp_path, "").policy
    assert policy == SandboxPolicy()
    assert (policy.network, policy.timeout_seconds) == ("none", 3600.0)
    assert policy.limits == Limits(3600, 4 << 30, 1024, 256)


def test_presets_and_a_policy_file(tmp_path: Path) -> None:
    assert run_policy(tmp_path, "loopback").policy.network == "loopback"  # type: ignore[union-attr]
    assert run_policy(tmp_path, "network").policy.network == "host"  # type: ignore[union-attr]
    path = write(
        tmp_path / "mine.toml",
        """
        [sandbox]
        network = "loopback"
        read_only_paths = ["/srv/in"]
        read_write_paths = ["/srv/out"]
        timeout_seconds = 0
        pass_env = ["LANG"]
        env = { MODE = "batch" }
        [sandbox.limits]
        memory_bytes = "512MiB"
        processes = 0
        """,
    )
    policy = run_policy(tmp_path, str(path)).policy
    assert policy is not None
    assert policy.network == "loopback" and policy.timeout_seconds is None
    assert policy.read_only_paths == (Path("/srv/in"),)
    assert policy.read_write_paths == (Path("/srv/out"),)
    assert policy.limits == Limits(3600, 512 << 20, 1024, None)  # the rest from the preset
    assert policy.env == (("MODE", "batch"),)
    assert rlimits(policy.limits) == [
        ("RLIMIT_CPU", 3600, 3601),
        ("RLIMIT_AS", 512 << 20, 512 << 20),
        ("RLIMIT_NOFILE", 1024, 1024),
    ]


@pytest.mark.parametrize(
    ("body", "field", "rule"),
    [
        ('network = "internet"', "sandbox.network", "must be one of none, loopback, host"),
        ('colour = "red"', "sandbox.colour", "unknown key"),
        ('read_only_paths = ["srv"]', "sandbox.read_only_paths", "'srv' is not an absolute path"),
        ('read_only_paths = ["/srv/../etc"]', "sandbox.read_only_paths", "is not normalised"),
        ('read_write_paths = ["/"]', "sandbox.read_write_paths", "'/' would expose the whole"),
        ("read_write_paths = '/srv'", "sandbox.read_write_paths", "must be a list"),
        ("timeout_seconds = -1", "sandbox.timeout_seconds", "must be a number of seconds >= 0"),
        ('pass_env = ["SPK_ADMIN_TOKEN"]', "sandbox.pass_env", "SPK_* variables"),
        ('pass_env = ["A B"]', "sandbox.pass_env", "'A B' is not a variable name"),
        ("env = { X = 1 }", "sandbox.env.X", "must be a string"),
        ("[sandbox.limits]\ncpu_seconds = -5", "sandbox.limits.cpu_seconds", "integer >= 0"),
        ("[sandbox.limits]\ncpu_seconds = true", "sandbox.limits.cpu_seconds", "integer >= 0"),
        ('[sandbox.limits]\nmemory_bytes = "lots"', "sandbox.limits.memory_bytes", "not a size"),
        ("[sandbox.limits]\nthreads = 4", "sandbox.limits.threads", "unknown key"),
    ],
)
def test_bad_fields_are_named_with_their_rule(
    tmp_path: Path, body: str, field: str, rule: str
) -> None:
    path = write(tmp_path / "bad.toml", "[sandbox]\n" + body + "\n")
    with pytest.raises(InvalidArgument) as info:
        request_from(str(path))
    assert info.value.field == f"{path}: {field}"
    assert rule in info.value.rule


def test_unknown_names_tables_and_broken_toml_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="unknown policy 'strict'"):
        request_from("strict")
    with pytest.raises(InvalidArgument, match="cannot read"):
        request_from(str(tmp_path / "missing.toml"))
    with pytest.raises(InvalidArgument, match="not valid TOML"):
        request_from(str(write(tmp_path / "broken.toml", "[sandbox\n")))
    with pytest.raises(InvalidArgument, match="unknown table"):
        request_from(str(write(tmp_path / "t.toml", "[sandbx]\n")))
    # A caller never picks the bwrap binary: a fake one would sandbox nothing.
    mine = write(tmp_path / "h.toml", '[host]\nbwrap = "/tmp/fake-bwrap"\n')
    with pytest.raises(InvalidArgument, match=r"\[host\]: only the host policy file"):
        request_from(str(mine))


def test_the_host_policy_is_mandatory_and_cannot_be_weakened(tmp_path: Path) -> None:
    data = tmp_path / "data"
    host(
        data,
        """
        [sandbox]
        network = "loopback"
        read_only_paths = ["/srv"]
        timeout_seconds = 60
        pass_env = ["LANG", "TZ"]
        [sandbox.limits]
        memory_bytes = "1GiB"
        [host]
        root_runs_as = "nobody"
        """,
    )
    chosen = run_policy(data, None)  # no --sandbox at all
    assert chosen.mandatory and chosen.policy is not None
    assert (chosen.policy.network, chosen.policy.timeout_seconds) == ("loopback", 60.0)
    assert chosen.settings.root_runs_as == "nobody"
    assert run_policy(data, "").policy == chosen.policy  # bare --sandbox: the host policy

    tighter = write(tmp_path / "t.toml", "[sandbox]\nnetwork = 'none'\ntimeout_seconds = 5\n")
    policy = run_policy(data, str(tighter)).policy
    assert policy is not None and (policy.network, policy.timeout_seconds) == ("none", 5.0)
    assert policy.limits.memory_bytes == 1 << 30  # kept from the host

    weaker = [
        ("network = 'host'", "sandbox.network", "at most 'loopback'"),
        ("timeout_seconds = 0", "sandbox.timeout_seconds", "at most 60"),
        ("[sandbox.limits]\nmemory_bytes = '2GiB'", "sandbox.limits.memory_bytes", "at most"),
        ("[sandbox.limits]\nmemory_bytes = 0", "sandbox.limits.memory_bytes", "at most"),
        ("read_only_paths = ['/etc/ssh']", "sandbox.read_only_paths", "/etc/ssh is not exposed"),
        ("read_write_paths = ['/srv/x']", "sandbox.read_write_paths", "/srv/x is not exposed"),
        ("pass_env = ['AWS_SECRET']", "sandbox.pass_env", "AWS_SECRET is not passed"),
    ]
    for body, field, rule in weaker:
        path = write(tmp_path / "w.toml", "[sandbox]\n" + body + "\n")
        with pytest.raises(InvalidArgument) as info:
            run_policy(data, str(path))
        assert info.value.field == f"{path}: {field}", body
        assert "cannot weaken the host policy" in info.value.rule and rule in info.value.rule
    with pytest.raises(InvalidArgument, match="at most 'loopback'"):
        run_policy(data, "network")
    narrower = write(tmp_path / "n.toml", "[sandbox]\nread_only_paths = ['/srv/in']\n")
    assert run_policy(data, str(narrower)).policy.read_only_paths == (Path("/srv/in"),)  # type: ignore[union-attr]


def test_an_untrusted_host_policy_refuses_every_run(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = host(data, "[sandbox]\n")
    os.chown(path, 65534, 65534)
    with pytest.raises(SandboxUnavailable, match="owned by uid 65534, not root"):
        run_policy(data, None)
    os.chown(path, 0, 0)
    path.chmod(0o664)
    with pytest.raises(SandboxUnavailable, match="writable by group or others"):
        run_policy(data, "")
    path.chmod(0o644)
    data.chmod(0o777)
    with pytest.raises(SandboxUnavailable, match="writable by everyone"):
        run_policy(data, None)
    data.chmod(0o755)
    path.write_text("[sandbox]\nnetwork = 'everything'\n")
    with pytest.raises(InvalidArgument, match=r"sandbox\.network"):
        run_policy(data, None)  # an unparsable host policy never means "no policy"
    path.unlink()
    os.symlink(tmp_path / "gone.toml", path)
    with pytest.raises(SandboxUnavailable, match="which is missing; every run is refused"):
        run_policy(data, None)


def test_host_settings_are_validated(tmp_path: Path) -> None:
    for body, match in [
        ('[host]\nbwrap = "bwrap"', "host.bwrap: must be an absolute path"),
        ('[host]\nshell = "/bin/sh"', "host.shell: unknown key"),
        ("[host]\nroot_runs_as = 0", "host.root_runs_as: must be a user name"),
    ]:
        host(tmp_path / "d", body)
        with pytest.raises(InvalidArgument, match=match):
            load_host_policy(tmp_path / "d")
    with pytest.raises(SandboxUnavailable, match="user 'no-such-user' does not exist"):
        unprivileged_ids("no-such-user")
    with pytest.raises(SandboxUnavailable, match="is root"):
        unprivileged_ids("root")
    assert unprivileged_ids("nobody")[0] == 65534


def test_agent_policy_file_is_checked_then_linked(tmp_path: Path) -> None:
    data = tmp_path / "data"
    bad = write(tmp_path / "bad.toml", "[sandbox]\nnetwork = 'x'\n")
    with pytest.raises(InvalidArgument):
        install_host_policy(data, bad)
    assert not os.path.lexists(data / HOST_POLICY)  # a bad file does not lock runs out
    good = write(tmp_path / "policy.toml", "[sandbox]\nnetwork = 'none'\ntimeout_seconds = 9\n")
    installed = install_host_policy(data, good)
    assert os.readlink(data / HOST_POLICY) == str(good)
    assert installed.policy.timeout_seconds == 9.0
    assert install_host_policy(data, good).policy == installed.policy  # a restart: same link
    other = write(tmp_path / "other.toml", "[sandbox]\n")
    with pytest.raises(SandboxUnavailable, match="already exists and is not a link to"):
        install_host_policy(data, other)


def test_environment_is_a_clean_allowlist() -> None:
    caller = {"LANG": "C.UTF-8", "TZ": "UTC", "SPK_TOKEN": "s3cret", "AWS_KEY": "x", "HOME": "/r"}
    policy = SandboxPolicy(pass_env=("LANG", "TZ", "AWS_KEY"), env=(("MODE", "batch"),))
    assert script_env(policy, caller) == {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "TZ": "UTC",
        "AWS_KEY": "x",
        "MODE": "batch",
    }
    assert "AWS_KEY" not in script_env(SandboxPolicy(), caller)


def test_sandbox_value_is_split_only_before_the_script() -> None:
    assert split_sandbox_value(["run", "--sandbox", "s.py"]) == ["run", "--sandbox", "s.py"]
    assert split_sandbox_value(["run", "--data-dir", "d", "--sandbox=loopback", "s.py", "x"]) == [
        "run",
        "--data-dir",
        "d",
        "--sandbox-policy",
        "loopback",
        "s.py",
        "x",
    ]
    kept = ["run", "s.py", "--sandbox=x"]  # the script's own argument
    assert split_sandbox_value(kept) == kept


def test_describe_is_for_people() -> None:
    assert SandboxPolicy().describe() == (
        "default: network none, timeout 3600s, cpu 3600s, memory 4 GiB, open files 1024,"
        " processes 256"
    )


def test_the_interpreter_and_what_it_needs_in_the_view(tmp_path: Path) -> None:
    real, roots = interpreter(sys.executable)
    assert real == os.path.realpath(sys.executable)  # the venv's python resolved: -I -S needs none
    # Its prefix is bound unless the system dirs already hold it (/usr/bin/python3).
    assert roots == [] or any(Path(real).is_relative_to(r) for r in roots)
    copied = tmp_path / "venv" / "bin" / "python3"  # `python -m venv --copies`: no symlink
    copied.parent.mkdir(parents=True)
    copied.write_bytes(b"")
    (tmp_path / "venv" / "pyvenv.cfg").write_text("home = /opt/py/bin\nversion = 3.11.7\n")
    assert interpreter(str(copied)) == (
        str(copied),
        sorted([tmp_path / "venv", Path("/opt/py")]),
    )
