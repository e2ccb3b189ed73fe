"""``wrenn-agent``: serve the host agent with uvicorn."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from wrenn import log
from wrenn.agent import server
from wrenn.agent.config import AgentSettings
from wrenn.core import http1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="wrenn-agent", description="Wrenn's host agent")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 5007)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = AgentSettings(**overrides)
    log.configure(settings.log_level)
    # One line per request to a guest's envd is noise; failures are logged where handled.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    http1.redirect_in_kernel(settings.redirect_in_kernel)
    config = uvicorn.Config(
        server.build(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        # The forwarding path's fast path; everything else is served by uvicorn's httptools.
        http=http1.FastPathProtocol,
        lifespan="on",
        log_config=None,
        access_log=False,
        # Forwarded streams (process output, file transfers) must not hold shutdown hostage.
        timeout_graceful_shutdown=5,
    )
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        # uvicorn re-raises the SIGINT it shut down on after the lifespan has stopped every
        # VM and torn the slots down: a clean, requested stop, not an error.
        return


if __name__ == "__main__":
    main()
