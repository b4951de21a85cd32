"""ShapesWorld's vocabulary and prompt grammar.

A prompt names one subject, its motion and the background::

    a [SIZE] COLOR SHAPE MOTION on a [striped] BACKGROUND background [with a gray block]

e.g. ``a big red circle moves left on a striped navy background``. ``SIZE`` may be left out
(it then means ``big``); ``with a gray block`` adds the static distractor. :func:`parse_prompt`
reads such a sentence into a :class:`PromptSpec`; :func:`make_prompt` writes one back. Subject
colours are bright and background colours dark, so every subject stands out from every
background (the smallest CIE ΔE76 between them is about 50).
"""

from __future__ import annotations

from dataclasses import dataclass

# Colours are sRGB 0..255. Subject colours are bright, background colours dark.
SUBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "orange": (250, 135, 20),
    "yellow": (245, 225, 40),
    "green": (40, 200, 60),
    "cyan": (40, 215, 225),
    "blue": (45, 95, 245),
    "purple": (170, 70, 230),
    "pink": (250, 140, 200),
}
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (12, 12, 16),
    "gray": (90, 90, 96),
    "navy": (20, 30, 90),
    "teal": (10, 85, 85),
    "maroon": (95, 20, 30),
    "olive": (85, 85, 20),
}
STRIPE_LIGHTEN = 0.18  # striped backgrounds alternate the colour with this much white mixed in
DISTRACTOR_COLOR: tuple[int, int, int] = (180, 180, 180)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "big")
DEFAULT_SIZE = "big"
# Motion name -> the words that say it in a prompt.
MOTIONS: dict[str, str] = {
    "left": "moves left",
    "right": "moves right",
    "up": "moves up",
    "down": "moves down",
    "still": "stays still",
    "bounce": "bounces",
}
DISTRACTOR_PHRASE = "with a gray block"
TEMPLATE = "a [SIZE] COLOR SHAPE MOTION on a [striped] BACKGROUND background [with a gray block]"


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt says: subject, motion, background, distractor."""

    color: str
    shape: str
    motion: str
    background: str
    size: str = DEFAULT_SIZE
    striped: bool = False
    distractor: bool = False

    def __post_init__(self):
        _check_word(self.color, SUBJECT_COLORS, "subject color")
        _check_word(self.shape, SHAPES, "shape")
        _check_word(self.motion, MOTIONS, "motion")
        _check_word(self.background, BACKGROUND_COLORS, "background")
        _check_word(self.size, SIZES, "size")

    @property
    def prompt(self) -> str:
        return make_prompt(self)

    def with_motion(self, motion: str) -> "PromptSpec":
        return PromptSpec(
            self.color, self.shape, motion, self.background, self.size, self.striped, self.distractor
        )


def _check_word(word: str, valid, what: str) -> None:
    if word not in valid:
        raise ValueError(f"unknown {what} {word!r}; valid: {', '.join(valid)}")


def make_prompt(spec: PromptSpec) -> str:
    """Write the prompt sentence for ``spec`` (always names the size)."""
    words = ["a", spec.size, spec.color, spec.shape, MOTIONS[spec.motion], "on a"]
    if spec.striped:
        words.append("striped")
    words += [spec.background, "background"]
    if spec.distractor:
        words.append(DISTRACTOR_PHRASE)
    return " ".join(words)


class _Words:
    """A cursor over a prompt's words that raises one-line errors naming the bad word."""

    def __init__(self, prompt: str):
        self.prompt = prompt
        self.words = prompt.strip().rstrip(".").lower().replace(",", " ").split()
        self.i = 0

    def peek(self) -> str | None:
        return self.words[self.i] if self.i < len(self.words) else None

    def take(self, valid, what: str) -> str:
        word = self.peek()
        if word is None or word not in valid:
            got = f"{word!r}" if word is not None else "end of prompt"
            raise ValueError(
                f"bad ShapesWorld prompt {self.prompt!r}: expected {what} but got {got}; "
                f"valid {what}: {', '.join(valid)} (grammar: {TEMPLATE})"
            )
        self.i += 1
        return word

    def expect(self, phrase: str) -> None:
        for word in phrase.split():
            self.take((word,), f"'{word}'")


def parse_prompt(prompt: str) -> PromptSpec:
    """Read a ShapesWorld prompt; raise a one-line ValueError naming the first bad word."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"empty ShapesWorld prompt; write one like: {TEMPLATE}")
    w = _Words(prompt)
    w.expect("a")
    size = w.take(SIZES, "size") if w.peek() in SIZES else DEFAULT_SIZE
    color = w.take(SUBJECT_COLORS, "subject color")
    shape = w.take(SHAPES, "shape")
    first = w.take(sorted({p.split()[0] for p in MOTIONS.values()}), "motion")
    phrases = {p: m for m, p in MOTIONS.items()}
    if first in phrases:
        motion = phrases[first]
    else:
        seconds = [p.split()[1] for p in MOTIONS.values() if p.split()[0] == first]
        motion = phrases[f"{first} {w.take(seconds, f'motion after {first!r}')}"]
    w.expect("on a")
    striped = w.peek() == "striped"
    if striped:
        w.i += 1
    background = w.take(BACKGROUND_COLORS, "background")
    w.expect("background")
    distractor = w.peek() is not None
    if distractor:
        w.expect(DISTRACTOR_PHRASE)
    if w.peek() is not None:
        raise ValueError(
            f"bad ShapesWorld prompt {prompt!r}: unexpected {w.peek()!r} after the end of the "
            f"sentence; grammar: {TEMPLATE}"
        )
    return PromptSpec(color, shape, motion, background, size, striped, distractor)


def words() -> list[str]:
    """Every word a prompt can use (the tokenizer's vocabulary), sorted."""
    found: set[str] = set()
    for text in (
        TEMPLATE.replace("[", " ").replace("]", " "),
        " ".join(SUBJECT_COLORS),
        " ".join(BACKGROUND_COLORS),
        " ".join(SHAPES),
        " ".join(SIZES),
        " ".join(MOTIONS.values()),
    ):
        found.update(w for w in text.split() if w.islower())
    return sorted(found)


def vocab() -> dict:
    """The grammar's words as a JSON-serialisable dict (``cliploom shapesworld vocab``)."""
    return {
        "template": TEMPLATE,
        "example": make_prompt(PromptSpec("red", "circle", "left", "navy", "big", True, False)),
        "shapes": list(SHAPES),
        "colors": {k: list(v) for k, v in SUBJECT_COLORS.items()},
        "sizes": list(SIZES),
        "backgrounds": {k: list(v) for k, v in BACKGROUND_COLORS.items()},
        "background_styles": ["solid", "striped"],
        "motions": dict(MOTIONS),
        "distractor": DISTRACTOR_PHRASE,
        "words": words(),
    }
