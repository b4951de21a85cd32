"""cliploom: long video generation by SVI clip stitching on Wan image-to-video models.

The public names are imported on first use, so ``cliploom --help`` (and a Ctrl-C while it
starts) does not wait for torch and diffusers to load.
"""

import importlib
import logging

__version__ = "0.1.0"

# A library's reports (LoRAs applied, drift warnings) reach the host's logging, not stderr by
# default; the CLI shows them (models.formats.console_logging).
logging.getLogger(__name__).addHandler(logging.NullHandler())

_PUBLIC = {
    "Engine": ".engine",
    "Clip": ".loom",
    "CliploomError": ".errors",
    "Components": ".models",
    "load_model": ".models",
    "make_tiny": ".models",
    "Story": ".story",
    "load_story": ".story",
    "make_story": ".story",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cliploom' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
