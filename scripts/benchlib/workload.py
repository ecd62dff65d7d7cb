"""The wheels every figure uses: w31 (fetched once, cached outside the repo) or tiny smoke wheels,
plus synthetic packages of known size: a big blob, a ~1 MiB delta, a tiny fan-out base."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import parse_wheel_filename

from scripts.benchlib.common import PYTHON, Bench, child_env
from tests.wheelfactory import WheelSpec, build_wheel

W31 = [
    ("requests", "2.34.2"),
    ("jinja2", "3.1.6"),
    ("attrs", "26.1.0"),
    ("rich", "15.0.0"),
    ("click", "8.5.1"),
    ("pydantic", "2.14.4"),
    ("httpx", "0.28.1"),
    ("boto3", "1.44.8"),
    ("pyyaml", "6.0.4"),
    ("python-dateutil", "2.9.0.post0"),
    ("pytz", "2026.6"),
    ("six", "1.17.0"),
    ("packaging", "26.4"),
]
MIB = 1024 * 1024


@dataclass(frozen=True)
class Workload:
    """`pins` resolve (from `index_dir`) to the wheels in `wheels`; extras are synthetic."""

    name: str
    pins: list[tuple[str, str]]
    wheels: list[Path]  # the resolved set, for the peers that take files
    index_dir: Path  # everything a local index serves: the set plus the synthetic packages
    big: Path  # one large blob (256 MiB in the full run)
    delta_v1: Path  # ~1 MiB, version 1.0 and 2.0 of one package
    delta_v2: Path
    tiny: Path  # the fan-out base
    changes: list[Path]  # one ~1 MiB package version per fan-out round

    @property
    def size(self) -> int:
        return sum(w.stat().st_size for w in self.wheels)


# The environments figure: w31 for three CPython versions on x86-64 and one on aarch64.
ENVIRONMENTS = [
    ("cp311", "3.11", "manylinux_2_17_x86_64"),
    ("cp312", "3.12", "manylinux_2_17_x86_64"),
    ("cp313", "3.13", "manylinux_2_17_x86_64"),
    ("cp312-arm", "3.12", "manylinux_2_28_aarch64"),
]


def pin_of(wheel: Path) -> tuple[str, str]:
    name, version, _, _ = parse_wheel_filename(wheel.name)
    return str(name), str(version)


def fetch_w31(cache: Path) -> list[Path]:
    """pip download of the w31 list into the cache, once (the only step that needs PyPI)."""
    target = cache / "w31"
    wheels = sorted(target.glob("*.whl")) if target.is_dir() else []
    if len(wheels) >= 31:
        return wheels
    print(f"fetching the w31 wheels into {target} (once)", flush=True)
    target.mkdir(parents=True, exist_ok=True)
    argv = [PYTHON, "-m", "pip", "download", "--isolated", "--only-binary=:all:", "-d", str(target)]
    subprocess.run([*argv, *(f"{n}=={v}" for n, v in W31)], check=True, env=child_env())
    return sorted(target.glob("*.whl"))


def fetch_environment_wheels(cache: Path, pins: list[tuple[str, str]]) -> list[Path]:
    """The wheels every environment of ENVIRONMENTS needs (resolved by uv against PyPI, once)."""
    import tomllib
    import urllib.request

    from core.install.uv_resolver import uv_binary, uv_platform

    target = cache / "w31-envs"
    done = target / ".complete"
    if done.exists():
        return sorted(target.glob("*.whl"))
    print(f"fetching the wheels of {len(ENVIRONMENTS)} environments into {target} (once)")
    target.mkdir(parents=True, exist_ok=True)
    reqs = target / "requirements.txt"
    reqs.write_text("".join(f"{n}=={v}\n" for n, v in pins))
    for name, python, platform in ENVIRONMENTS:
        lock = target / f"pylock.{name.replace('-', '')}.toml"
        triple, extra = uv_platform(platform)
        argv = [uv_binary(), "pip", "compile", "-q", "--no-config", "--python-version", python]
        argv += ["--python-platform", triple, "--only-binary", ":all:", str(reqs), "-o", str(lock)]
        subprocess.run(argv, check=True, env={**child_env(), **extra})
        for package in tomllib.loads(lock.read_text())["packages"]:
            url = package["wheels"][0]["url"]
            dest = target / url.rsplit("/", 1)[-1]
            if not dest.exists():
                with urllib.request.urlopen(url) as r, dest.open("wb") as f:
                    shutil.copyfileobj(r, f)
    done.touch()
    return sorted(target.glob("*.whl"))


def _random_wheel(cache: Path, name: str, version: str, size: int) -> Path:
    """A wheel holding `size` random bytes: incompressible, so the blob is about `size`."""
    out = cache / "synthetic"
    spec = WheelSpec(name, version, files={f"{name.replace('-', '_')}/payload.bin": b""})
    existing = out / spec.filename
    if existing.exists():
        return existing
    mod = name.replace("-", "_")
    files = {f"{mod}/__init__.py": b"", f"{mod}/payload.bin": os.urandom(size)}
    return build_wheel(WheelSpec(name, version, files=files), out)


def _smoke_wheels(out: Path) -> list[Path]:
    """Eight small pure wheels with a few modules each (and one shared namespace)."""
    init = b"__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n"
    for i in range(8):
        name = f"smoke-{i}"
        mod = name.replace("-", "_")
        files = {f"{mod}/m{j}.py": f"X = {i * 100 + j}\n".encode() * 50 for j in range(12)}
        files[f"{mod}/__init__.py"] = b""
        files["smokens/__init__.py"] = init
        files[f"smokens/p{i}/__init__.py"] = b""
        build_wheel(WheelSpec(name, "1.0", files=files), out)
    return sorted(out.glob("*.whl"))


def prepare(bench: Bench) -> Workload:
    if bench.smoke:
        wheels = _smoke_wheels(bench.scratch("smoke-wheels"))
        pins = [pin_of(w) for w in wheels]
        big_size, delta_size, name = 4 * MIB, 256 * 1024, "smoke (8 tiny wheels)"
        synth = bench.scratch("synthetic")
    else:
        wheels = fetch_w31(bench.cache)
        pins = list(W31)
        big_size, delta_size, name = 256 * MIB, MIB, "w31"
        synth = bench.cache
    big = _random_wheel(synth, "spkbench-big", "1.0", big_size)
    delta_v1 = _random_wheel(synth, "spkbench-delta", "1.0", delta_size)
    delta_v2 = _random_wheel(synth, "spkbench-delta", "2.0", delta_size)
    tiny = build_wheel(WheelSpec("spkbench-tiny", "1.0"), bench.scratch("tiny"))
    changes = [
        _random_wheel(synth, "spkbench-fan", f"{r + 1}.0", delta_size) for r in range(bench.rounds)
    ]
    index_dir = bench.scratch("index")
    # Only figure 6 needs the other environments' wheels (a fetch from PyPI the first time).
    wants_envs = not bench.smoke and bench.wants("environments")
    others = fetch_environment_wheels(bench.cache, pins) if wants_envs else []
    for wheel in {w.name: w for w in [*wheels, *others]}.values():
        _link(wheel, index_dir)
    for wheel in [big, delta_v1, delta_v2, tiny, *changes]:
        _link(wheel, index_dir)
    return Workload(name, pins, wheels, index_dir, big, delta_v1, delta_v2, tiny, changes)


def _link(wheel: Path, index_dir: Path) -> None:
    try:
        os.link(wheel, index_dir / wheel.name)
    except OSError:
        shutil.copyfile(wheel, index_dir / wheel.name)
