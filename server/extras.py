"""Optional dependencies, imported where they are used: a plain `pip install adrenaline` serves
with the runtime set alone, and a command that needs more names the extra that brings it.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra to install."""


def import_extra(module: str, extra: str, needed_for: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{needed_for} needs {module.split('.')[0]}, which a plain install leaves out: "
            f"pip install 'adrenaline[{extra}]'"
        ) from exc
