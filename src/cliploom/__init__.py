"""cliploom: long video generation by SVI clip stitching on Wan image-to-video models."""

__version__ = "0.1.0"

from .engine import Engine  # noqa: E402
from .errors import CliploomError  # noqa: E402
from .loom import Clip  # noqa: E402
from .models import Components, load_model, make_tiny  # noqa: E402
from .story import Story, load_story, make_story  # noqa: E402

__all__ = ["Engine", "Clip", "CliploomError", "Components", "Story", "load_model", "load_story", "make_story", "make_tiny"]
