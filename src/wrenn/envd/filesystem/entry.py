"""EntryInfo of a path, as E2B's envd reports it.

- ``type`` is the type of what the path points to: a symlink reports its target's type
  (``SYMLINK`` only when the target cannot be resolved) and sets ``is_symlink``;
- ``mode`` holds the permission bits only (of the target, for a symlink);
- ``permissions`` is the path's own mode in Go's ``os.FileMode`` notation, which is what E2B
  sends: ``-rw-r--r--``, ``drwxr-xr-x``, ``Lrwxrwxrwx`` for a symlink, ``dtrwxrwxrwx`` for a
  sticky directory, ``Dcrw-rw-rw-`` for a character device;
- ``size`` and ``modified_time`` come from the path itself (not followed);
- ``symlink_target`` is the fully resolved target, or the link text when it does not resolve;
- ``metadata`` holds the file's ``user.*`` extended attributes without the prefix.

Blocking: call on a thread acting as the requesting user.
"""

from __future__ import annotations

import os
import stat

from protobuf.wkt import Timestamp

from wrenn.envd import users
from wrenn.gen.filesystem.filesystem_pb import EntryInfo, FileType

METADATA_XATTR_PREFIX = "user."

_RWX = "rwxrwxrwx"


def permissions_string(mode: int) -> str:
    """``mode`` in Go's ``os.FileMode.String()`` notation: type and special-bit letters in
    Go's order (``d L D p S u g c t``), ``-`` when there are none, then ``rwxrwxrwx``."""
    fmt = stat.S_IFMT(mode)
    flags = (
        (fmt == stat.S_IFDIR, "d"),
        (fmt == stat.S_IFLNK, "L"),
        (fmt in (stat.S_IFBLK, stat.S_IFCHR), "D"),
        (fmt == stat.S_IFIFO, "p"),
        (fmt == stat.S_IFSOCK, "S"),
        (bool(mode & stat.S_ISUID), "u"),
        (bool(mode & stat.S_ISGID), "g"),
        (fmt == stat.S_IFCHR, "c"),
        (bool(mode & stat.S_ISVTX), "t"),
    )
    letters = "".join(letter for is_set, letter in flags if is_set)
    bits = "".join(c if mode & (1 << (8 - i)) else "-" for i, c in enumerate(_RWX))
    return (letters or "-") + bits


def file_type(mode: int) -> FileType:
    if stat.S_ISREG(mode):
        return FileType.FILE
    if stat.S_ISDIR(mode):
        return FileType.DIRECTORY
    if stat.S_ISLNK(mode):
        return FileType.SYMLINK
    return FileType.UNSPECIFIED


def read_metadata(path: str) -> dict[str, str]:
    """``user.*`` extended attributes of ``path``; empty when unsupported or unreadable."""
    try:
        names = os.listxattr(path)
    except OSError:
        return {}
    metadata: dict[str, str] = {}
    for name in names:
        if not name.startswith(METADATA_XATTR_PREFIX):
            continue
        try:
            value = os.getxattr(path, name)
        except OSError:
            continue
        metadata[name.removeprefix(METADATA_XATTR_PREFIX)] = value.decode(errors="replace")
    return metadata


def write_metadata(fd: int, metadata: dict[str, str]) -> None:
    """Store ``metadata`` as ``user.*`` extended attributes of the open file ``fd``."""
    for key, value in metadata.items():
        os.setxattr(fd, METADATA_XATTR_PREFIX + key, value.encode())


class Names:
    """uid/gid → name lookups cached for the length of one request."""

    def __init__(self) -> None:
        self._users: dict[int, str] = {}
        self._groups: dict[int, str] = {}

    def user(self, uid: int) -> str:
        if uid not in self._users:
            self._users[uid] = users.user_name(uid)
        return self._users[uid]

    def group(self, gid: int) -> str:
        if gid not in self._groups:
            self._groups[gid] = users.group_name(gid)
        return self._groups[gid]


def from_stat(path: str, st: os.stat_result, names: Names | None = None) -> EntryInfo:
    """EntryInfo of ``path`` whose ``lstat`` is ``st``."""
    names = names or Names()
    entry_type = file_type(st.st_mode)
    perm = stat.S_IMODE(st.st_mode) & 0o777
    target: str | None = None
    is_symlink = stat.S_ISLNK(st.st_mode)
    if is_symlink:
        try:
            target = os.path.realpath(path, strict=True)
            target_st = os.stat(target)
            entry_type = file_type(target_st.st_mode)
            perm = stat.S_IMODE(target_st.st_mode) & 0o777
        except OSError:
            entry_type = FileType.SYMLINK
            perm = 0
            try:
                target = os.readlink(path)
            except OSError:
                target = path
    return EntryInfo(
        name=os.path.basename(path) or path,
        type=entry_type,
        path=path,
        size=st.st_size,
        mode=perm,
        permissions=permissions_string(st.st_mode),
        owner=names.user(st.st_uid),
        group=names.group(st.st_gid),
        modified_time=Timestamp.from_nanos(st.st_mtime_ns),
        symlink_target=target,
        metadata=read_metadata(path),
        is_symlink=is_symlink,
    )


def of_path(path: str, names: Names | None = None) -> EntryInfo:
    """EntryInfo of ``path`` (not following a final symlink); raises OSError."""
    return from_stat(path, os.lstat(path), names)
