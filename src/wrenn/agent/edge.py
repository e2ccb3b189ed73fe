"""The one place where the agent's errors become wire responses: Connect errors for the RPCs
(expected errors logged at info), ``{"code", "message"}`` JSON bodies with the mapped HTTP
status on the forwarding path."""

from __future__ import annotations

from wrenn.core.connect import ErrorInterceptor as _SharedInterceptor
from wrenn.core.connect import error_response

__all__ = ["ErrorInterceptor", "error_response"]


class ErrorInterceptor(_SharedInterceptor):
    def __init__(self) -> None:
        super().__init__(log_errors=True)
