"""Who a request acts as: the Linux user named by the client, resolved from the passwd and
group databases.

Resolved users are kept until ``/etc/passwd`` or ``/etc/group`` changes (inode, size or
mtime), so a request costs two ``stat`` calls instead of reading both files again."""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

from wrenn.core.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class User:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str


#: Files whose change invalidates the resolved users.
DATABASES = ("/etc/passwd", "/etc/group")
_KEPT_USERS = 64

_Stamp = tuple[tuple[int, int, int], ...]
#: (stamp of the databases, users resolved under it); replaced whole, never mutated in place
#: by two threads at once.
_resolved: tuple[_Stamp, dict[str, User]] = ((), {})


def _stamp() -> _Stamp:
    stamps = []
    for path in DATABASES:
        try:
            st = os.stat(path)
        except OSError:
            stamps.append((0, 0, 0))
        else:
            stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamps)


def lookup(name: str) -> User:
    """Resolve ``name`` (a user name or a numeric uid). Unknown users are invalid arguments."""
    global _resolved
    stamp = _stamp()
    kept_stamp, kept = _resolved
    if kept_stamp == stamp and (user := kept.get(name)) is not None:
        return user
    user = _resolve(name)
    users = dict(kept) if kept_stamp == stamp and len(kept) < _KEPT_USERS else {}
    users[name] = user
    _resolved = (stamp, users)
    return user


def _resolve(name: str) -> User:
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, ValueError):
        raise InvalidArgument(f"invalid user: {name!r} does not exist") from None
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))))
    return User(
        name=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        groups=groups,
        home=entry.pw_dir or "/",
        shell=entry.pw_shell or "/bin/sh",
    )


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
