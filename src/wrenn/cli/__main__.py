"""``python -m wrenn.cli`` is ``wrenn``."""

from wrenn.cli.main import main

main()
