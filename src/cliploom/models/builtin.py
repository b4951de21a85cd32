"""Where the built-in model lives.

The built-in model is the ShapesWorld model shipped inside the package. Until it is there, a
tiny random-weight model is made on first use and cached under ``$CLIPLOOM_CACHE`` (default
``~/.cache/cliploom``).
"""

from __future__ import annotations

import os
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent.parent / "shapesworld" / "model"
FALLBACK_VARIANT = "wan21"


def cache_dir() -> Path:
    return Path(os.environ.get("CLIPLOOM_CACHE", Path.home() / ".cache" / "cliploom"))


def builtin_model_path() -> Path:
    if (SHIPPED / "model_index.json").is_file():
        return SHIPPED
    path = cache_dir() / f"tiny-{FALLBACK_VARIANT}"
    if not (path / "model_index.json").is_file():
        from .tiny import make_tiny

        make_tiny(path, FALLBACK_VARIANT, overwrite=True)
    return path


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    if path is None or str(path) == "builtin":
        return builtin_model_path()
    return Path(path).expanduser()
