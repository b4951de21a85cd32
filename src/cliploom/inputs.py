"""Reading what users hand us, bounded before use: regular files only (a FIFO or a device would
block or never end), sizes capped before reading, text that must be UTF-8, and YAML / JSON whose
nesting and aliases are limited (an alias bomb or a 10,000-deep list is refused, not expanded).

Every failure is a :class:`~cliploom.errors.CliploomError`: one line naming the file and the fix.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from .errors import CliploomError

MAX_TEXT_BYTES = 8 * 2**20  # stories, training configs, model and family configs, reports
MAX_DEPTH = 64  # nesting of YAML / JSON documents
MAX_ALIASES = 256  # YAML aliases (*name) in one document
MAX_NODES = 2_000_000  # YAML nodes in one document (each clip is a handful)


def check_regular(path: str | Path, what: str, fix: str) -> Path:
    """``path`` exists and is a regular file (not a folder, FIFO, socket or device)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CliploomError(f"{what} {path} does not exist", fix) from None
    except OSError as e:
        raise CliploomError(f"cannot read {what} {path}: {e.strerror or e}", fix) from None
    if stat.S_ISDIR(mode):
        raise CliploomError(f"{what} {path} is a folder, not a file", fix)
    if not stat.S_ISREG(mode):
        raise CliploomError(f"{what} {path} is not a regular file (a pipe or a device)", fix)
    return path


def read_bytes(path: str | Path, what: str, fix: str, max_bytes: int) -> bytes:
    path = check_regular(path, what, fix)
    size = path.stat().st_size
    if size > max_bytes:
        raise CliploomError(f"{what} {path} is {size / 2**20:.1f} MB, more than {max_bytes / 2**20:g} MB", fix)
    try:
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)[:max_bytes]
    except OSError as e:
        raise CliploomError(f"cannot read {what} {path}: {e.strerror or e}", fix) from None


def decode_text(data: bytes, where: str) -> str:
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise CliploomError(f"{where} is UTF-16 text", "save it as UTF-8")
    if b"\x00" in data:
        raise CliploomError(f"{where} is a binary file, not text", "pass a YAML or JSON text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CliploomError(f"{where} is not UTF-8 text (byte {e.start})", "save it as UTF-8") from None


def read_text(path: str | Path, what: str, fix: str = "check the path", max_bytes: int = MAX_TEXT_BYTES) -> str:
    return decode_text(read_bytes(path, what, fix, max_bytes), f"{what} {path}")


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with a cap on aliases, nodes and nesting, checked while composing."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = self._aliases = self._nodes = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _TooBig(f"more than {MAX_ALIASES} YAML aliases")
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _TooBig(f"more than {MAX_NODES} YAML nodes")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _TooBig(f"nested more than {MAX_DEPTH} levels deep")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _TooBig(Exception):
    pass


def load_yaml(text: str, where: str) -> Any:
    """Parse YAML (JSON is YAML) with bounded aliases, nodes and depth; the values are then checked
    for their size once more (an alias of a large list counts as often as it is used)."""
    try:
        data = yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except _TooBig as e:
        raise CliploomError(f"{where}: {e}", "write the document out plainly") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise CliploomError(f"{where}: malformed YAML{at}: {problem}", "fix the YAML syntax") from None
    except RecursionError:
        raise CliploomError(f"{where}: nested too deeply", "write the document out plainly") from None
    check_size(data, where)
    return data


def load_json(text: str, where: str) -> Any:
    try:
        data = json.loads(text)
    except RecursionError:
        raise CliploomError(f"{where}: nested too deeply", "check that the file is what it says") from None
    except ValueError as e:
        raise CliploomError(f"{where}: malformed JSON: {e}", "check that the file is complete") from None
    check_size(data, where)
    return data


def read_json(path: str | Path, what: str, fix: str = "check that the folder is complete",
              max_bytes: int = MAX_TEXT_BYTES) -> Any:
    return load_json(read_text(path, what, fix, max_bytes), f"{what} {path}")


def check_size(data: Any, where: str, max_items: int = MAX_NODES) -> None:
    """Walk a parsed document without recursion: bounded depth and item count (aliases expanded)."""
    stack = [(data, 1)]
    items = 0
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise CliploomError(f"{where}: nested more than {MAX_DEPTH} levels deep", "write the document out plainly")
        if isinstance(value, dict):
            items += len(value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            items += len(value)
            stack.extend((v, depth + 1) for v in value)
        if items > max_items:
            raise CliploomError(f"{where}: more than {max_items} values (expanded)", "write the document out plainly")


def check_writable(folder: Path, fix: str = "choose a writable output") -> None:
    """Create ``folder`` if needed and prove it takes a file (``os.access`` says yes to root on /proc)."""
    folder = Path(folder)
    blocked = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise CliploomError(f"cannot write into {folder}: {blocked} is a file, not a folder", fix)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".cliploom-write-test-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"x")
        probe.unlink()
    except OSError as e:
        raise CliploomError(f"cannot write into {folder}: {e.strerror or e}", fix) from None


def check_output_file(path: str | Path, what: str, suffixes: tuple[str, ...] = (), overwrite: bool = True) -> Path:
    """An output file we may write: a name the OS takes, the expected suffix, nothing in the way,
    a folder that takes files."""
    text = str(path)
    fix = f"choose another {what} path"
    if not text.strip():
        raise CliploomError(f"the {what} path is empty", fix)
    path = Path(text).expanduser()
    if any(len(part.encode()) > 255 for part in path.parts):
        raise CliploomError(f"{what} {text[:40]}...: a name in it is longer than 255 bytes", fix)
    if suffixes and path.suffix.lower() not in suffixes:
        raise CliploomError(f"{what} {path} does not end in {' or '.join(suffixes)}", f"name it x{suffixes[0]}")
    if path.is_dir():
        raise CliploomError(f"{what} {path} is a folder", fix)
    if path.exists() and not path.is_file():
        raise CliploomError(f"{what} {path} exists and is not a regular file", fix)
    if path.exists() and not overwrite:
        raise CliploomError(f"{what} {path} already exists", "choose another path or pass --overwrite")
    check_writable(path.parent, fix)
    return path


def finite(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def available_memory() -> int | None:
    """Bytes of host memory available now (``MemAvailable``), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PB"
