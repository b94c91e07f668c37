"""Upright decoding lives in ``datamodules.upright`` (the catalogue reader needs it below this
layer); these names stay importable from here."""

from datamodules.upright import open_upright, orientation, upright

__all__ = ["open_upright", "orientation", "upright"]
