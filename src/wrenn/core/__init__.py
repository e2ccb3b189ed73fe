"""Pieces every Wrenn process shares. Imports nothing else of the project."""
