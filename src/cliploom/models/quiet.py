"""Loading without library chatter: transformers' and diffusers' weight-loading bars and notes the
user cannot act on stay off while cliploom loads a part, and the caller's own settings come back
afterwards (a library must not change its host's logging for good)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (tlog, dlog)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            (lib.enable_progress_bar if bars else lib.disable_progress_bar)()
