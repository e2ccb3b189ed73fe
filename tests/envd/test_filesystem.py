"""filesystem.Filesystem and /files driven by the official e2b SDK against a real envd."""

from __future__ import annotations

import datetime
import grp
import io
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import (
    FileNotFoundException,
    FileType,
    InvalidArgumentException,
    Sandbox,
    SandboxException,
)

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def tmp_dir() -> Iterator[Path]:
    """A directory on the envd host's filesystem, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="wrenn-fs-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def open_dir(tmp_dir: Path) -> Path:
    """A directory everyone may write to (so ``nobody`` can create files in it)."""
    path = tmp_dir / "open"
    path.mkdir()
    path.chmod(0o777)
    return path


# -- write and read ------------------------------------------------------------------------


def test_write_and_read_text(sandbox: Sandbox, tmp_dir: Path) -> None:
    path = str(tmp_dir / "hello.txt")
    info = sandbox.files.write(path, "héllo wörld\n")
    assert (info.name, info.type, info.path) == ("hello.txt", FileType.FILE, path)
    assert sandbox.files.read(path) == "héllo wörld\n"
    assert Path(path).read_text() == "héllo wörld\n"


def test_write_and_read_bytes(sandbox: Sandbox, tmp_dir: Path) -> None:
    data = bytes(range(256)) * 4096
    path = str(tmp_dir / "blob.bin")
    sandbox.files.write(path, data)
    assert sandbox.files.read(path, format="bytes") == bytearray(data)


def test_write_and_read_streams(sandbox: Sandbox, tmp_dir: Path) -> None:
    data = os.urandom(9 << 20)
    path = str(tmp_dir / "stream.bin")
    sandbox.files.write(path, io.BytesIO(data))  # file-like: octet-stream, streamed
    assert Path(path).read_bytes() == data
    chunks = iter([data[: 3 << 20], data[3 << 20 :]])
    sandbox.files.write(path + ".2", chunks)  # iterable of chunks
    with sandbox.files.read(path + ".2", format="stream") as stream:
        assert b"".join(stream) == data


def test_write_creates_parents_and_overwrites(sandbox: Sandbox, tmp_dir: Path) -> None:
    path = tmp_dir / "a" / "b" / "c.txt"
    sandbox.files.write(str(path), "first version, longer")
    sandbox.files.write(str(path), "second")
    assert path.read_text() == "second"
    assert (tmp_dir / "a" / "b").is_dir()


def test_write_files_multipart(sandbox: Sandbox, tmp_dir: Path) -> None:
    infos = sandbox.files.write_files(
        [
            {"path": str(tmp_dir / "one.txt"), "data": "1"},
            {"path": str(tmp_dir / "sub" / "two.bin"), "data": b"\x00\x02"},
            {"path": str(tmp_dir / "three.txt"), "data": io.StringIO("3")},
        ],
        use_octet_stream=False,
    )
    assert [i.path for i in infos] == [
        str(tmp_dir / "one.txt"),
        str(tmp_dir / "sub" / "two.bin"),
        str(tmp_dir / "three.txt"),
    ]
    assert (tmp_dir / "one.txt").read_text() == "1"
    assert (tmp_dir / "sub" / "two.bin").read_bytes() == b"\x00\x02"
    assert (tmp_dir / "three.txt").read_text() == "3"


def test_write_files_octet_stream(sandbox: Sandbox, tmp_dir: Path) -> None:
    infos = sandbox.files.write_files(
        [
            {"path": str(tmp_dir / "x"), "data": "x"},
            {"path": str(tmp_dir / "y"), "data": "y"},
        ],
        use_octet_stream=True,
    )
    assert [i.name for i in infos] == ["x", "y"]
    assert (tmp_dir / "y").read_text() == "y"


def test_gzip_upload_and_download(sandbox: Sandbox, tmp_dir: Path) -> None:
    data = b"compressible line\n" * 200_000
    path = str(tmp_dir / "gz.txt")
    sandbox.files.write(path, data, gzip=True)
    assert Path(path).read_bytes() == data
    assert sandbox.files.read(path, format="bytes", gzip=True) == bytearray(data)


def test_write_with_metadata(sandbox: Sandbox, tmp_dir: Path) -> None:
    path = str(tmp_dir / "meta.txt")
    info = sandbox.files.write(path, "m", metadata={"Owner-Team": "infra"})
    assert info.metadata == {"owner-team": "infra"}
    assert sandbox.files.get_info(path).metadata == {"owner-team": "infra"}


def test_relative_and_home_paths(sandbox: Sandbox) -> None:
    name = f"wrenn-fs-{os.getpid()}-rel.txt"
    home = pwd.getpwuid(0).pw_dir
    try:
        info = sandbox.files.write(name, "rel")
        assert info.path == os.path.join(home, name)
        assert sandbox.files.read(f"~/{name}") == "rel"
        assert sandbox.files.get_info(f"~/{name}").path == os.path.join(home, name)
    finally:
        Path(home, name).unlink(missing_ok=True)


def test_read_errors(sandbox: Sandbox, tmp_dir: Path) -> None:
    with pytest.raises(FileNotFoundException, match="not found"):
        sandbox.files.read(str(tmp_dir / "missing.txt"))
    with pytest.raises(InvalidArgumentException, match="is a directory"):
        sandbox.files.read(str(tmp_dir))


def test_write_onto_directory_is_rejected(sandbox: Sandbox, tmp_dir: Path) -> None:
    (tmp_dir / "d").mkdir()
    with pytest.raises(InvalidArgumentException, match="is a directory"):
        sandbox.files.write(str(tmp_dir / "d"), "x")
    (tmp_dir / "file").write_text("f")
    with pytest.raises(InvalidArgumentException, match="not a directory"):
        sandbox.files.write(str(tmp_dir / "file" / "below.txt"), "x")


# -- list, exists, info --------------------------------------------------------------------


def _tree(root: Path) -> None:
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "top.txt").write_text("t")
    (root / "a" / "mid.txt").write_text("m")
    (root / "a" / "b" / "deep.txt").write_text("d")
    (root / "a" / "b" / "c" / "deepest.txt").write_text("x")


def test_list_with_depth(sandbox: Sandbox, tmp_dir: Path) -> None:
    _tree(tmp_dir)
    rel = lambda entries: [os.path.relpath(e.path, tmp_dir) for e in entries]  # noqa: E731
    assert rel(sandbox.files.list(str(tmp_dir))) == ["a", "top.txt"]
    assert rel(sandbox.files.list(str(tmp_dir), depth=2)) == ["a", "a/b", "a/mid.txt", "top.txt"]
    assert rel(sandbox.files.list(str(tmp_dir), depth=3)) == [
        "a",
        "a/b",
        "a/b/c",
        "a/b/deep.txt",
        "a/mid.txt",
        "top.txt",
    ]
    entries = {e.name: e for e in sandbox.files.list(str(tmp_dir), depth=10)}
    assert "deepest.txt" in entries
    assert entries["a"].type == FileType.DIR
    assert entries["top.txt"].type == FileType.FILE
    assert entries["top.txt"].size == 1


def test_list_errors(sandbox: Sandbox, tmp_dir: Path) -> None:
    with pytest.raises(FileNotFoundException):
        sandbox.files.list(str(tmp_dir / "missing"))
    (tmp_dir / "f").write_text("f")
    with pytest.raises(InvalidArgumentException, match="not a directory"):
        sandbox.files.list(str(tmp_dir / "f"))
    with pytest.raises(InvalidArgumentException):
        sandbox.files.list(str(tmp_dir), depth=0)  # rejected by the SDK itself


def test_list_through_a_symlinked_directory(sandbox: Sandbox, tmp_dir: Path) -> None:
    _tree(tmp_dir)
    (tmp_dir / "link").symlink_to(tmp_dir / "a")
    entries = sandbox.files.list(str(tmp_dir / "link"))
    assert [e.path for e in entries] == [str(tmp_dir / "link" / n) for n in ("b", "mid.txt")]


def test_exists(sandbox: Sandbox, tmp_dir: Path) -> None:
    (tmp_dir / "here").write_text("h")
    assert sandbox.files.exists(str(tmp_dir / "here"))
    assert sandbox.files.exists(str(tmp_dir))
    assert not sandbox.files.exists(str(tmp_dir / "gone"))


def test_get_info_of_a_file(sandbox: Sandbox, tmp_dir: Path) -> None:
    path = tmp_dir / "info.txt"
    path.write_text("12345")
    path.chmod(0o640)
    os.chown(path, 0, NOBODY.pw_gid)
    mtime = datetime.datetime(2024, 5, 17, 12, 30, 45, 123456, tzinfo=datetime.UTC)
    os.utime(path, (mtime.timestamp(), mtime.timestamp()))

    info = sandbox.files.get_info(str(path))
    assert info.name == "info.txt"
    assert info.path == str(path)
    assert info.type == FileType.FILE
    assert info.size == 5
    assert info.mode == 0o640
    assert info.permissions == "-rw-r-----"
    assert info.owner == "root"
    assert info.group == grp.getgrgid(NOBODY.pw_gid).gr_name
    assert info.modified_time == mtime
    assert info.symlink_target is None


def test_get_info_of_a_directory_and_symlinks(sandbox: Sandbox, tmp_dir: Path) -> None:
    (tmp_dir / "d").mkdir(mode=0o755)
    (tmp_dir / "d").chmod(0o1777)
    info = sandbox.files.get_info(str(tmp_dir / "d"))
    assert info.type == FileType.DIR
    assert info.permissions == "dtrwxrwxrwx"
    assert info.mode == 0o777

    (tmp_dir / "target.txt").write_text("t")
    (tmp_dir / "link").symlink_to("target.txt")
    link = sandbox.files.get_info(str(tmp_dir / "link"))
    assert link.type == FileType.SYMLINK
    assert link.symlink_target == str(tmp_dir / "target.txt")
    assert link.permissions.startswith("L")

    (tmp_dir / "dangling").symlink_to(tmp_dir / "nowhere")
    dangling = sandbox.files.get_info(str(tmp_dir / "dangling"))
    assert dangling.type == FileType.SYMLINK
    assert dangling.symlink_target == str(tmp_dir / "nowhere")


# -- rename, remove, make_dir --------------------------------------------------------------


def test_rename(sandbox: Sandbox, tmp_dir: Path) -> None:
    (tmp_dir / "old.txt").write_text("o")
    info = sandbox.files.rename(str(tmp_dir / "old.txt"), str(tmp_dir / "new" / "dir" / "n.txt"))
    assert info.path == str(tmp_dir / "new" / "dir" / "n.txt")
    assert info.name == "n.txt"
    assert info.type == FileType.FILE
    assert not (tmp_dir / "old.txt").exists()
    assert (tmp_dir / "new" / "dir" / "n.txt").read_text() == "o"
    with pytest.raises(FileNotFoundException, match=r"old\.txt"):
        sandbox.files.rename(str(tmp_dir / "old.txt"), str(tmp_dir / "other.txt"))


def test_remove(sandbox: Sandbox, tmp_dir: Path) -> None:
    _tree(tmp_dir)
    sandbox.files.remove(str(tmp_dir / "top.txt"))
    assert not (tmp_dir / "top.txt").exists()
    sandbox.files.remove(str(tmp_dir / "a"))
    assert not (tmp_dir / "a").exists()
    sandbox.files.remove(str(tmp_dir / "never-existed"))  # idempotent, as in E2B
    (tmp_dir / "link").symlink_to(tmp_dir)
    sandbox.files.remove(str(tmp_dir / "link"))  # removes the link, not its target
    assert tmp_dir.is_dir() and not (tmp_dir / "link").exists()


def test_make_dir(sandbox: Sandbox, tmp_dir: Path) -> None:
    assert sandbox.files.make_dir(str(tmp_dir / "x" / "y")) is True
    assert (tmp_dir / "x" / "y").is_dir()
    assert sandbox.files.make_dir(str(tmp_dir / "x" / "y")) is False
    (tmp_dir / "file").write_text("f")
    with pytest.raises(InvalidArgumentException, match="not a directory"):
        sandbox.files.make_dir(str(tmp_dir / "file"))


# -- acting as the requesting user ---------------------------------------------------------


def test_files_written_as_a_user_belong_to_them(sandbox: Sandbox, open_dir: Path) -> None:
    path = open_dir / "new" / "owned.txt"
    sandbox.files.write(str(path), "mine", user="nobody")
    for created in (path, path.parent):
        st = created.lstat()
        assert (st.st_uid, st.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
    assert sandbox.files.get_info(str(path), user="nobody").owner == "nobody"
    assert sandbox.files.read(str(path), user="nobody") == "mine"

    assert sandbox.files.make_dir(str(open_dir / "made"), user="nobody")
    assert (open_dir / "made").stat().st_uid == NOBODY.pw_uid
    sandbox.files.rename(str(path), str(open_dir / "moved" / "owned.txt"), user="nobody")
    assert (open_dir / "moved").stat().st_uid == NOBODY.pw_uid


def test_writing_without_permission_fails_and_leaves_nothing(
    sandbox: Sandbox, tmp_dir: Path
) -> None:
    closed = tmp_dir / "closed"
    closed.mkdir(mode=0o755)
    for target in (closed / "file.txt", closed / "sub" / "file.txt"):
        with pytest.raises(SandboxException, match=f"permission denied: {closed}"):
            sandbox.files.write(str(target), "x", user="nobody")
        with pytest.raises(SandboxException, match="permission denied"):
            sandbox.files.write(str(target), io.BytesIO(b"x"), user="nobody")
    assert list(closed.iterdir()) == []


def test_rpcs_without_permission_fail(sandbox: Sandbox, tmp_dir: Path) -> None:
    closed = tmp_dir / "closed"
    closed.mkdir(mode=0o755)
    (closed / "keep.txt").write_text("k")
    (tmp_dir / "private").mkdir(mode=0o700)

    with pytest.raises(SandboxException, match="permission denied"):
        sandbox.files.make_dir(str(closed / "d"), user="nobody")
    with pytest.raises(SandboxException, match="permission denied"):
        sandbox.files.remove(str(closed / "keep.txt"), user="nobody")
    with pytest.raises(SandboxException, match="permission denied"):
        sandbox.files.rename(str(closed / "keep.txt"), str(closed / "k2"), user="nobody")
    with pytest.raises(SandboxException, match="permission denied"):
        sandbox.files.list(str(tmp_dir / "private"), user="nobody")
    with pytest.raises(SandboxException, match="permission"):
        sandbox.files.read(str(tmp_dir / "private" / "x"), user="nobody")
    assert sorted(p.name for p in closed.iterdir()) == ["keep.txt"]
    # the same operations succeed for root through the same envd
    assert sandbox.files.list(str(tmp_dir / "private")) == []


def test_unreadable_file_is_permission_denied(sandbox: Sandbox, tmp_dir: Path) -> None:
    secret = tmp_dir / "secret"
    secret.write_text("s")
    secret.chmod(0o600)
    with pytest.raises(SandboxException, match=f"403: permission denied: {secret}"):
        sandbox.files.read(str(secret), user="nobody")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_unknown_user_is_rejected(sandbox: Sandbox, tmp_dir: Path) -> None:
    with pytest.raises(InvalidArgumentException, match="no-such-user"):
        sandbox.files.write(str(tmp_dir / "u"), "u", user="no-such-user")
    with pytest.raises(InvalidArgumentException, match="no-such-user"):
        sandbox.files.list(str(tmp_dir), user="no-such-user")
    assert not (tmp_dir / "u").exists()
