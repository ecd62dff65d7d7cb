"""Every admin example in the docs runs as written, against a real core.

The convention (README, "Admin calls with grpcurl"): in README.md and docs/*.md, every line of a
```bash block that starts with `grpcurl `, `"${A[@]}" ` or `spk-core admin ` is an example; a
line ending in `\\` continues on the next. Lines that set shell state (`A=(...)`, `export ...`)
are kept as a preamble for the examples after them in the same document. A block whose info
string says `bash no-run` is host setup the test cannot do (starting an agent, TLS on a DNS name)
and is skipped whole; no other way to skip exists.

Each block runs in order against its own fresh core (the preamble carries over from earlier
blocks of the document), which the test has given what an operator's would have: one install
(release 1 of six==1.17.0 from a local index), an S3 bucket (moto), `requirements.txt`, `tok`
and `~/.spk-admin-token` in the working directory, `$TOKEN`, and `SPK_CORE` /
`SPK_ADMIN_TOKEN_FILE` as the README's `export` line sets them. What is
substituted: the address `core:50051`, the index URL `https://pypi.example/simple` and the
advisory source `https://advisories.example` (by the test core's, the local index's and an
OSV-speaking fake's, tests/advisory_server.py, that knows no advisories). Between examples the
test waits for an install or migration an example started to settle, as a person would before
typing the next line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.advisory_server import AdvisoryServer
from tests.core_process import ADMIN_TOKEN, CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.storage_servers import MotoS3
from tests.wheelfactory import WheelSpec, build_wheel

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLE = ("grpcurl ", '"${A[@]}" ', "spk-core admin ")
PREAMBLE = ("A=(", "export ")
FENCE = re.compile(r"^```(\S*)(.*)$")
INDEX_URL = "https://pypi.example/simple"
ADVISORY_URL = "https://advisories.example"
# Every package an example names, as the local index serves it.
WHEELS = [("six", "1.17.0"), ("requests", "2.32.3"), ("requests", "2.31.0")]


@dataclass(frozen=True)
class Example:
    doc: str
    line: int
    command: str
    preamble: tuple[str, ...]
    block: int  # the fenced block it is in, counted from 1 in its document

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.command}"


def examples(path: Path) -> Iterator[Example]:
    preamble: list[str] = []
    lang: str | None = None
    skip = False
    block = 0
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        text, number = lines[i], i + 1
        fence = FENCE.match(text)
        i += 1
        if fence:
            if lang is None:
                lang, skip = fence.group(1), "no-run" in fence.group(2)
                block += 1
            else:
                lang = None
            continue
        if lang not in ("bash", "sh") or skip:
            continue
        command = text.strip()
        while command.endswith("\\") and i < len(lines):
            command = command[:-1] + " " + lines[i].strip()
            i += 1
        if command.startswith(PREAMBLE):
            preamble.append(command)
        elif command.startswith(EXAMPLE):
            yield Example(path.name, number, command, tuple(preamble), block)


def test_the_convention_finds_the_examples() -> None:
    found = {p.name: list(examples(p)) for p in DOCS}
    assert len(found["README.md"]) >= 60
    assert len(found["storage.md"]) >= 9
    every = [e for doc in found.values() for e in doc]
    # The old, broken forms are gone: a string $A and -d after the address.
    assert not [e for e in every if "$A " in e.command]
    code = [e.command.split(" #")[0] for e in every]
    assert not [c for c in code if re.search(r"core:50051 .*-d '", c)]


def _wait_idle(core: CoreProcess) -> None:
    admin = core.admin()

    def idle() -> bool:
        install: bool = admin.GetInstallState().status != apb.INSTALL_STATUS_INSTALLING
        migration: bool = admin.GetStorageMigrationState().status != "migrating"
        return install and migration

    eventually(idle, timeout=120, interval=0.2)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("doc", [p for p in DOCS if list(examples(p))], ids=lambda p: p.name)
def test_docs_examples_run_as_written(
    doc: Path, tmp_path: Path, wheel_dir: Path, s3_server: MotoS3
) -> None:
    for name, version in WHEELS:
        build_wheel(WheelSpec(name, version), wheel_dir)
    work = tmp_path / "work"
    work.mkdir()
    (work / "requirements.txt").write_text("six==1.17.0\nrequests==2.32.3\n")
    (work / "tok").write_text("index-token-from-a-file\n")
    (work / ".spk-admin-token").write_text(ADMIN_TOKEN + "\n")
    blocks: dict[int, list[Example]] = {}
    for example in examples(doc):
        blocks.setdefault(example.block, []).append(example)
    failures: list[str] = []
    with PackageIndex(wheel_dir) as index, AdvisoryServer([]) as advisories:
        for number, block in blocks.items():
            bucket = s3_server.new_bucket()
            core = CoreProcess(tmp_path / f"core-{number}", env=s3_server.env(bucket)).start()
            try:
                failures += _run_block(block, core, index, work, advisories.url)
            finally:
                core.stop()
    assert blocks and not failures, "\n".join(failures)


def _run_block(
    block: list[Example], core: CoreProcess, index: PackageIndex, work: Path, advisories: str
) -> list[str]:
    admin = core.admin()
    admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=index.url))
    pins = [apb.PackageSpec(name="six", version="1.17.0")]
    admin.SetPackages(apb.SetPackagesRequest(packages=pins))
    assert admin.install_and_wait().status == apb.INSTALL_STATUS_READY
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPK_")}
    env.update(
        HOME=str(work),
        TOKEN=ADMIN_TOKEN,
        SPK_CORE=core.target,
        SPK_ADMIN_TOKEN_FILE=str(work / ".spk-admin-token"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    failures = []
    for example in block:
        script = "\n".join([*example.preamble, example.command])
        script = script.replace("core:50051", core.target).replace(INDEX_URL, index.url)
        script = script.replace(ADVISORY_URL, advisories)
        began = time.monotonic()
        out = subprocess.run(
            ["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=60
        )
        if out.returncode != 0:
            failures.append(
                f"{example}\n  exit {out.returncode} after {time.monotonic() - began:.1f} s"
                f"\n  stdout: {out.stdout[-800:]}\n  stderr: {out.stderr[-800:]}"
            )
        _wait_idle(core)
    return failures
