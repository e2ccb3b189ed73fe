"""Request and response bodies: ``e2b`` for the E2B-compatible API, ``wrenn`` for /v1."""
