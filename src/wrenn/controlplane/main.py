"""``wrenn-cp``: the control plane (``serve``, the default; ``create-key``;
``create-host-token``). A distribution with extensions has its own entry point calling
``wrenn.controlplane.run(extensions=[...])``."""

from __future__ import annotations

from wrenn.controlplane.app import run


def main() -> None:
    run()


if __name__ == "__main__":
    main()
