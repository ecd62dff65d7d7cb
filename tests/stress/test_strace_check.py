"""The durability checker itself, on hand-written traces: it must flag each kind of mistake."""

from __future__ import annotations

from pathlib import Path

from tests.stress import strace_check

ROOT = Path("/d")
GOOD = """\
10 write(3</d/blobs/.partial/ab>, "x", 1) = 1
10 fsync(3</d/blobs/.partial/ab>) = 0
10 rename("/d/blobs/.partial/ab", "/d/blobs/ab/ab.whl") = 0
10 fsync(4</d/blobs/ab>) = 0
11 mkdir("/d/pkgs/.tmp-ab-1", 0777) = 0
11 write(5</d/pkgs/.tmp-ab-1/site-packages/m.py>, "x", 1) = 1
11 syncfs(6</d/pkgs>) = 0
11 rename("/d/pkgs/.tmp-ab-1", "/d/pkgs/ab") = 0
11 fsync(6</d/pkgs>) = 0
12 symlink("../../../pkgs/ab/site-packages/m.py", "/d/trees/.tmp-h-1/site-packages/m.py") = 0
12 syncfs(7</d/trees/.tmp-h-1> <unfinished ...>
12 <... syncfs resumed>) = 0
12 rename("/d/trees/.tmp-h-1", "/d/trees/h") = 0
12 fsync(7</d/trees>) = 0
13 symlink("trees/h", "/d/current.tmp-1") = 0
13 fsync(8</d>) = 0
13 rename("/d/current.tmp-1", "/d/current") = 0
13 fsync(8</d>) = 0
"""


def _problems(trace: str) -> list[str]:
    return strace_check.check(strace_check.parse(trace), ROOT)[0]


def test_a_correct_sequence_passes() -> None:
    problems, kinds = strace_check.check(strace_check.parse(GOOD), ROOT)
    assert problems == []
    assert kinds == {"blob": 1, "package": 1, "tree": 1, "current": 1}


def test_rename_before_fsync_is_flagged() -> None:
    bad = GOOD.replace("10 fsync(3</d/blobs/.partial/ab>) = 0\n", "")
    assert any("blob: rename" in p for p in _problems(bad))


def test_write_after_the_fsync_is_flagged() -> None:
    late_write = '11 write(5</d/pkgs/.tmp-ab-1/site-packages/m.py>, "y", 1) = 1\n'
    bad = GOOD.replace("11 syncfs(6</d/pkgs>) = 0\n", f"11 syncfs(6</d/pkgs>) = 0\n{late_write}")
    assert any("package: rename" in p for p in _problems(bad))


def test_missing_directory_fsync_is_flagged() -> None:
    bad = GOOD.replace("11 fsync(6</d/pkgs>) = 0\n", "")
    assert any("/d/pkgs not fsynced" in p for p in _problems(bad))


def test_current_flipped_before_the_tree_dir_fsync_is_flagged() -> None:
    bad = GOOD.replace("12 fsync(7</d/trees>) = 0\n", "") + "12 fsync(7</d/trees>) = 0\n"
    assert any("tree: /d/trees not fsynced" in p and "before the next current" in p
               for p in _problems(bad))  # fmt: skip


def test_unsynced_symlink_is_flagged() -> None:
    bad = GOOD.replace('13 symlink("trees/h", "/d/current.tmp-1") = 0\n13 fsync(8</d>) = 0\n',
                       '13 symlink("trees/h", "/d/current.tmp-1") = 0\n')  # fmt: skip
    assert any("current: rename" in p for p in _problems(bad))


def test_wal_writes_need_a_following_sync() -> None:
    ok = '20 pwrite64(9</db-wal>, "x", 1, 0) = 1\n20 fdatasync(9</db-wal>) = 0\n'
    assert strace_check.wal_unsynced(strace_check.parse(ok)) == (1, 1, [])
    bad = '20 pwrite64(9</db-wal>, "x", 1, 0) = 1\n'
    assert strace_check.wal_unsynced(strace_check.parse(bad))[2]
