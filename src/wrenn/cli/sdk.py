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


def sandbox_url(cli: CliContext, domain: str | None) -> str | None:
    """Where the SDK sends a sandbox's envd traffic: ``--sandbox-url`` when given; else, when
    the control plane announces a domain, ``None`` (the SDK's ``{port}-{id}.{domain}``);
    else the API URL, whose port routes requests carrying ``E2b-Sandbox-Id`` to the
    control plane's sandbox proxy."""
    if cli.sandbox_url:
        return cli.sandbox_url
    return None if domain else cli.api_url


def connect(cli: CliContext, sandbox_id: str) -> Sandbox:
    """A running sandbox's SDK handle (a paused one is resumed by the control plane)."""
    import e2b

    with cli.client() as api:
        detail = api.get(f"/sandboxes/{sandbox_id}")
    domain = detail.get("domain") or None
    with sdk_errors(sandbox_id):
        return e2b.Sandbox.connect(
            sandbox_id,
            api_key=cli.require_key(),
            api_url=cli.api_url,
            # What the control plane announced; never the SDK's public default. Unused when
            # a sandbox URL is set (the reserved .invalid name can resolve nowhere).
            domain=domain or "wrenn.invalid",
            sandbox_url=sandbox_url(cli, domain),
            debug=False,
            request_timeout=REQUEST_TIMEOUT_S,
        )
