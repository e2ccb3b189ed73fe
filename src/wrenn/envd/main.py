"""``wrenn-envd``: serve envd with uvicorn."""

from __future__ import annotations

import argparse

import uvicorn

from wrenn import log
from wrenn.envd import app, conntrack
from wrenn.envd.config import EnvdSettings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="wrenn-envd", description="Wrenn's in-guest daemon")
    parser.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port to listen on (default 49983)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = EnvdSettings(**overrides)
    log.configure(settings.log_level, json=settings.log_json)
    tracker = conntrack.ConnTracker()
    config = uvicorn.Config(
        app.build(settings, tracker),
        host=settings.host,
        port=settings.port,
        http=conntrack.protocol_class(tracker),
        ws="none",
        loop="uvloop",
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_keep_alive=30,
        # Open process and watch streams must not hold shutdown hostage: after this grace
        # the lifespan shutdown runs and kills what is left.
        timeout_graceful_shutdown=3,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
