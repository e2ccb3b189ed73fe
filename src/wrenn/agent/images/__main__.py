"""``python -m wrenn.agent.images``: build (or find cached) the base guest image."""

from __future__ import annotations

import argparse
from pathlib import Path

from wrenn import log
from wrenn.agent.config import AgentSettings
from wrenn.agent.images.build import build_base
from wrenn.core.errors import WrennError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wrenn.agent.images", description=__doc__)
    parser.add_argument("--state-dir", type=Path, help="agent state directory (default: settings)")
    parser.add_argument("--envd-wheel", type=Path, help="use this wheel instead of building one")
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    args = parser.parse_args(argv)
    settings = AgentSettings()
    log.configure(settings.log_level)
    try:
        image = build_base(
            args.state_dir or settings.state_dir, envd_wheel=args.envd_wheel, force=args.force
        )
    except WrennError as err:
        print(f"error: {err.message}")
        return 1
    print(image.dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
