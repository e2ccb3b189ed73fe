"""envd: the daemon inside every sandbox guest, wire-compatible with E2B's envd.

Imports only ``wrenn.core`` and ``wrenn.gen``; it never imports the agent or control plane.
"""
