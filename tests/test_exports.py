"""Export rendering (pure): PEP 751 shape, hash pins, no credentials, index attribution."""

from __future__ import annotations

import tomllib

from core.install.exports import attribute_index, public_url, render_pylock, render_requirements
from core.state.index_config import RegistrySettings
from core.state.origins import Origin
from shared.manifest import Manifest, ManifestEntry, TargetEnvironment

ENV = TargetEnvironment("3.12", "cp", "cp312", "manylinux_2_28_x86_64")


def _manifest() -> Manifest:
    return Manifest.build(
        [
            ManifestEntry("six", "1.17.0", "six-1.17.0-py2.py3-none-any.whl", "a" * 64, 11, True),
            ManifestEntry("zé-pkg", "1.0", "z_pkg-1.0-py3-none-any.whl", "b" * 64, 22, False),
        ],
        ENV,
    )


def test_public_url_drops_credentials_query_and_fragment() -> None:
    assert public_url("https://u:p@files.example:8443/p/a.whl?X-Amz-Signature=s#sha256=00") == (
        "https://files.example:8443/p/a.whl"
    )
    assert public_url("http://[::1]:8080/simple/") == "http://[::1]:8080/simple/"


def test_the_index_on_the_files_origin_wins_else_the_default() -> None:
    registry = RegistrySettings(
        index_url="https://pypi.org/simple",
        extra_index_urls=(
            "https://mirror.example/team/simple/",
            "https://mirror.example/ci/simple/",
        ),
    )
    assert attribute_index("https://mirror.example/ci/packages/a.whl", registry) == (
        "https://mirror.example/ci/simple/"
    )
    assert attribute_index("https://files.pythonhosted.org/packages/a.whl", registry) == (
        "https://pypi.org/simple"
    )


def test_pylock_is_pep_751_and_pins_every_wheel() -> None:
    origins = {"a" * 64: Origin("https://files.example/six.whl", "https://pypi.org/simple")}
    doc = tomllib.loads(render_pylock(_manifest(), origins, "py312", 4, "https://fallback/simple"))
    assert doc["lock-version"] == "1.0" and doc["requires-python"] == "==3.12.*"
    six, other = doc["packages"]
    assert six["index"] == "https://pypi.org/simple"
    assert six["wheels"] == [
        {
            "name": "six-1.17.0-py2.py3-none-any.whl",
            "url": "https://files.example/six.whl",
            "size": 11,
            "hashes": {"sha256": "a" * 64},
        }
    ]
    assert other["name"] == "zé-pkg" and other["index"] == "https://fallback/simple"
    assert "url" not in other["wheels"][0]  # no origin recorded: never a guessed URL
    assert doc["tool"]["script-packages"] == {
        "lockfile-hash": _manifest().lockfile_hash,
        "environment": "py312",
        "release": 4,
    }


def test_requirements_pin_every_wheel_by_hash() -> None:
    text = render_requirements(_manifest(), {}, "py312", 4, "https://u:p@fallback/simple?t=1")
    assert "six==1.17.0 \\\n    --hash=sha256:" + "a" * 64 in text
    assert "--only-binary :all:" in text
    assert "u:p" not in text and "t=1" not in text
