"""``wrenn-cp``: serve the control plane; ``create-key`` / ``create-host-token`` for operators."""

from __future__ import annotations

import argparse
import asyncio

from wrenn.controlplane import bootstrap
from wrenn.controlplane.app import run
from wrenn.controlplane.config import ControlPlaneSettings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="wrenn-cp", description="Wrenn control plane")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="serve the API (the default)")
    key = commands.add_parser("create-key", help="create a team and print an API key for it")
    key.add_argument("--team", default="default", help="name of the new team")
    key.add_argument("--admin", action="store_true", help="make the team an admin team")
    commands.add_parser("create-host-token", help="print a one-time host registration token")
    args = parser.parse_args(argv)
    if args.command == "create-key":
        made = asyncio.run(
            bootstrap.create_key(ControlPlaneSettings(), team_name=args.team, admin=args.admin)
        )
        print(f"team {made.team_id}\nAPI key (shown once): {made.api_key}")
    elif args.command == "create-host-token":
        print(asyncio.run(bootstrap.create_host_token(ControlPlaneSettings())))
    else:
        run()


if __name__ == "__main__":
    main()
