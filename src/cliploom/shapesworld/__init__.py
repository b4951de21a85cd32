"""ShapesWorld: a procedural video world with ground truth, and the built-in tiny Wan model.

The world (pure numpy) renders one coloured shape moving on a plain or striped background,
from a prompt such as ``a big red circle moves left on a striped navy background``.
"""

from .vocab import PromptSpec, make_prompt, parse_prompt, vocab, words
from .world import (
    CLIP_FRAMES,
    FPS,
    Segment,
    Sequence,
    render_reference,
    sample_clip,
    sample_sequence,
    scene_from_prompt,
)

__all__ = [
    "CLIP_FRAMES",
    "FPS",
    "PromptSpec",
    "Segment",
    "Sequence",
    "make_prompt",
    "parse_prompt",
    "render_reference",
    "sample_clip",
    "sample_sequence",
    "scene_from_prompt",
    "vocab",
    "words",
]
