"""Spec files: a batch described in TOML (``load``), and the role executor it becomes in workers (``roles``)."""

from parroles.spec.load import Spec, load_spec

__all__ = ["Spec", "load_spec"]
