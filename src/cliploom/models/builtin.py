"""Where the built-in model lives: the ShapesWorld model shipped inside the package.

It is a diffusers-layout Wan image-to-video folder (see docs/shapesworld.md) with its own SVI
LoRA; ``model: builtin`` (or no model at all) in a story, ``--model builtin`` on the command line
and ``Engine.load()`` all resolve to it. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CliploomError

SHIPPED = Path(__file__).resolve().parent.parent / "shapesworld" / "model"


def builtin_model_path() -> Path:
    if not (SHIPPED / "model_index.json").is_file():
        raise CliploomError(
            f"the built-in model is missing from this installation ({SHIPPED})",
            "reinstall cliploom, or rebuild it with `python -m cliploom.shapesworld.build_model` (docs/shapesworld.md)",
        )
    return SHIPPED


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    if path is None or str(path) == "builtin":
        return builtin_model_path()
    return Path(path).expanduser()
