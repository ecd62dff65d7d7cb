"""core/storage/blobstore.py: the filesystem blob store on a real directory."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from core.storage.blobstore import BlobStore, FilesystemBlobStore
from shared.errors import IntegrityError, InvalidArgument, NotFound


def blob(tmp_path: Path, data: bytes, name: str = "src.whl") -> tuple[str, Path]:
    path = tmp_path / name
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest(), path


@pytest.fixture
def store(tmp_path: Path) -> FilesystemBlobStore:
    return FilesystemBlobStore(tmp_path / "blobs")


def test_satisfies_the_protocol(store: FilesystemBlobStore) -> None:
    typed: BlobStore = store
    assert typed.name == "filesystem"


def test_put_has_size_read(store: FilesystemBlobStore, tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    sha, src = blob(tmp_path, data)
    assert not store.has(sha) and store.size(sha) is None
    assert store.put_file(sha, src) is True
    assert store.has(sha) and store.size(sha) == len(data)
    assert (tmp_path / "blobs" / sha[:2] / f"{sha}.whl").read_bytes() == data
    with store.open_read(sha) as f:
        assert f.read() == data
    with store.open_read(sha, offset=1000) as f:
        assert f.read() == data[1000:]
    with store.open_read(sha, offset=len(data)) as f:  # resuming a finished download
        assert f.read() == b""


def test_put_is_idempotent(store: FilesystemBlobStore, tmp_path: Path) -> None:
    sha, src = blob(tmp_path, b"wheel bytes")
    assert store.put_file(sha, src) is True
    assert store.put_file(sha, src) is False
    assert list(store.list()) == [sha]


def test_put_copies_across_filesystems(
    store: FilesystemBlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_link(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    sha, src = blob(tmp_path, b"copied, not linked")
    assert store.put_file(sha, src) is True
    final = tmp_path / "blobs" / sha[:2] / f"{sha}.whl"
    assert final.read_bytes() == b"copied, not linked"
    assert final.stat().st_ino != src.stat().st_ino


def test_wrong_content_is_refused_and_leaves_nothing(
    store: FilesystemBlobStore, tmp_path: Path
) -> None:
    sha, _ = blob(tmp_path, b"the real thing")
    _, liar = blob(tmp_path, b"something else", "liar.whl")
    with pytest.raises(IntegrityError, match=sha):
        store.put_file(sha, liar)
    assert not store.has(sha)
    assert [p.name for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == []


@pytest.mark.parametrize(
    "bad",
    ["../../etc/passwd", "ab/../../x", "", "a" * 63, "g" * 64, "a" * 64 + "/x", "/" + "a" * 63],
)
def test_bad_ids_are_refused(store: FilesystemBlobStore, tmp_path: Path, bad: str) -> None:
    _, src = blob(tmp_path, b"x")
    for call in (
        lambda: store.has(bad),
        lambda: store.size(bad),
        lambda: store.put_file(bad, src),
        lambda: store.open_read(bad),
        lambda: store.delete(bad),
    ):
        with pytest.raises(InvalidArgument, match="sha256"):
            call()
    assert not (tmp_path / "blobs").exists()


def test_missing_blob_and_bad_offsets(store: FilesystemBlobStore, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="a" * 64):
        store.open_read("a" * 64)
    sha, src = blob(tmp_path, b"12345")
    store.put_file(sha, src)
    with pytest.raises(InvalidArgument, match="offset"):
        store.open_read(sha, offset=6)
    with pytest.raises(InvalidArgument, match="offset"):
        store.open_read(sha, offset=-1)


def test_delete_and_list(store: FilesystemBlobStore, tmp_path: Path) -> None:
    assert list(store.list()) == []
    shas = []
    for i in range(5):
        sha, src = blob(tmp_path, f"blob {i}".encode(), f"{i}.whl")
        store.put_file(sha, src)
        shas.append(sha)
    # Debris that is not a blob: a crash-left temp file, a stray file, a misplaced blob.
    shard = tmp_path / "blobs" / shas[0][:2]
    (shard / f".tmp-{shas[0][:16]}-1-abcd").write_bytes(b"half")
    (shard / "README").write_text("x")
    (tmp_path / "blobs" / "zz").mkdir()
    (tmp_path / "blobs" / "zz" / f"{shas[1]}.whl").write_bytes(b"wrong shard")
    assert sorted(store.list()) == sorted(shas)

    assert store.delete(shas[0]) is True
    assert store.delete(shas[0]) is False
    assert not store.has(shas[0])
    assert sorted(store.list()) == sorted(shas[1:])
    assert store.remove_stale_temp_files() == 1


def test_uppercase_id_is_the_same_blob(store: FilesystemBlobStore, tmp_path: Path) -> None:
    sha, src = blob(tmp_path, b"case")
    store.put_file(sha.upper(), src)
    assert store.has(sha) and list(store.list()) == [sha]
