"""An MLP with a skip connection, as a small package (uploaded as a .zip):
`factory="skipmlp:build"`."""

from .model import build

__all__ = ["build"]
