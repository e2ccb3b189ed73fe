"""The ``wrenn`` command line: a client of the control plane's HTTP API (and, for exec and
shell, of sandboxes through the e2b SDK). It imports nothing of the control plane, the host
agent or envd.

    main         the Typer app, global options, errors → exit codes
    context      api url / key / sandbox url, resolved once per invocation
    config       ~/.config/wrenn/config.toml
    client       the REST client; error bodies → wrenn.core.errors
    output       tables, --json, messages
    sandbox      sandbox create|list|exec|shell|pause|resume|kill|logs
    shell        the interactive PTY session
    sdk          e2b SDK connection and its errors
    template     template build|list|delete
    snapshot     snapshot create|list|delete
    host         host list|drain|activate
    key          key create|list|revoke
    up           wrenn up; supervisor runs its child processes
"""

from wrenn.cli.main import app, main

__all__ = ["app", "main"]
