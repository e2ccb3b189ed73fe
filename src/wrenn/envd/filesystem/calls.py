"""Blocking filesystem calls run on a worker thread acting as the requesting user, with
OSErrors mapped to the client error naming the path."""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

from wrenn.core.errors import from_os_error
from wrenn.envd import identity
from wrenn.envd.users import User

P = ParamSpec("P")
T = TypeVar("T")


async def as_user(
    user: User, path: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """``fn(*args, **kwargs)`` as ``user``; an OSError becomes the error for ``path``."""
    try:
        return await identity.run_as(user, fn, *args, **kwargs)
    except OSError as err:
        raise from_os_error(err, path) from err
