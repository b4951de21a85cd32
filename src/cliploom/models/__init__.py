"""Model loading: folders, formats, LoRA stacks. The rest of cliploom sees ``Components``."""

from .components import Components, ModelSettings
from .loading import load_model
from .tiny import make_tiny

__all__ = ["Components", "ModelSettings", "load_model", "make_tiny"]
