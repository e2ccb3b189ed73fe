"""Sandboxes reached through the official e2b SDK (commands and PTYs go to the sandbox's
envd over Connect). The control plane is asked first, so an unknown sandbox or a bad key
reads as a CLI error; SDK exceptions leave this module as ``wrenn.core.errors``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from wrenn.cli.context import CliContext
from wrenn.core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
)

if TYPE_CHECKING:
    from e2b import Sandbox

#: The SDK's request timeout for unary calls (the stream of a command is unbounded).
REQUEST_TIMEOUT_S = 60.0


@contextlib.contextmanager
def sdk_errors(sandbox_id: str) -> Iterator[None]:
    """Re-raise the SDK's exceptions (other than a command's exit) as Wrenn errors."""
    import e2b

    try:
        yield
    except e2b.CommandExitException:
        raise
    except e2b.AuthenticationException as err:
        raise Unauthenticated(f"sandbox {sandbox_id}: {err}") from err
    except e2b.NotFoundException as err:
        raise NotFound(f"sandbox {sandbox_id}: {err}") from err
    except e2b.InvalidArgumentException as err:
        raise InvalidArgument(f"sandbox {sandbox_id}: {err}") from err
    except e2b.TimeoutException as err:
        raise DeadlineExceeded(f"sandbox {sandbox_id}: {err}") from err
    except e2b.SandboxException as err:
        raise Unavailable(f"sandbox {sandbox_id}: {err}") from err


def connect(cli: CliContext, sandbox_id: str) -> Sandbox:
    """A running sandbox's SDK handle (a paused one is resumed by the control plane)."""
    import e2b

    with cli.client() as api:
        detail = api.get(f"/sandboxes/{sandbox_id}")
    domain = detail.get("domain") or None
    if cli.sandbox_url is None and domain is None:
        raise FailedPrecondition(
            "the control plane announces no sandbox domain, so the sandbox's address is "
            "unknown: pass --sandbox-url (or set WRENN_SANDBOX_URL) to its sandbox proxy"
        )
    with sdk_errors(sandbox_id):
        return e2b.Sandbox.connect(
            sandbox_id,
            api_key=cli.require_key(),
            api_url=cli.api_url,
            # Only what the control plane announced: never the SDK's public default.
            domain=domain or "invalid",
            sandbox_url=cli.sandbox_url,
            debug=False,
            request_timeout=REQUEST_TIMEOUT_S,
        )
