"""Spec files: a batch described in TOML (``load``), and the role executor it becomes in workers (``roles``).

``load`` is imported on first use: workers import ``parroles.spec.roles``
(to unpickle a spec's role executor) and need none of the TOML checks.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["Spec", "load_spec"]

if TYPE_CHECKING:
    from parroles.spec.load import Spec, load_spec


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("parroles.spec.load"), name)
    raise AttributeError(f"module 'parroles.spec' has no attribute {name!r}")
