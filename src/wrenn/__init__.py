"""Wrenn: self-hostable microVM sandboxes for untrusted code."""
