"""A request's fields -> a validated story, before anything is queued.

OpenAI's fields (``prompt``, ``seconds``, ``size``, ``input_reference``) and cliploom's own
(``story``: a story YAML/JSON text with every key of docs/story.md; shorthands ``clips``,
``prompts``, ``seed``, ``steps``) become one story, checked by the same code as a story file.
Clients name things, never paths: the reference is the uploaded image (saved under a
server-made name), LoRAs are names in the server's ``--lora-dir``, models are configured names.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import CliploomError
from ..story import Story, cycle_prompts, story_from_dict

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SERVER_KEYS = {"reference": "upload the image as input_reference",
               "fuse_loras": "the server keeps LoRAs switchable between requests",
               "model": "choose the model with the `model` field",
               "offload": "memory options are the server's settings",
               "vae_tiling": "memory options are the server's settings",
               "release_text_encoder": "memory options are the server's settings"}


@dataclass
class Limits:
    max_body_bytes: int = 25 * 2**20
    max_image_pixels: int = 40_000_000
    max_prompt_chars: int = 2000
    max_clips: int = 500
    max_queue: int = 32


def bad(message: str, fix: str, param: str | None = None) -> CliploomError:
    e = CliploomError(message, fix)
    e.param = param  # type: ignore[attr-defined]
    return e


def parse_story_text(text: str | None) -> dict:
    if not text:
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise bad(f"story: malformed YAML/JSON: {problem}", "send a story as in docs/story.md", "story") from None
    if not isinstance(data, dict):
        raise bad("story: a story must be a mapping of settings", "see docs/story.md for an example", "story")
    for key, why in SERVER_KEYS.items():
        if key in data:
            raise bad(f"story: `{key}` cannot be set by a request", why, "story")
    return data


def lora_paths(data: dict, lora_dir: Path | None) -> None:
    """Replace LoRA names (``name`` or ``path``, as a name) by files of the server's LoRA folder."""
    raw = data.get("loras")
    if raw is None:
        return
    if not isinstance(raw, list):
        raise bad("story: loras must be a list", "write loras: [{name: svi, weight: 1.0}]", "story")
    out = []
    for i, item in enumerate(raw):
        item = {"name": item} if isinstance(item, str) else dict(item) if isinstance(item, dict) else None
        if item is None:
            raise bad(f"story: lora {i + 1} must be a name or a mapping", "write - {name: svi, weight: 1.0}", "story")
        name = str(item.pop("path", None) or item.get("name") or "")
        name = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
        if not NAME.match(name):
            raise bad(f"story: lora {i + 1} {name!r} is not a LoRA name", "name a LoRA of GET /v1/loras", "story")
        path = (lora_dir / f"{name}.safetensors") if lora_dir else None
        if path is None or not path.is_file():
            raise bad(f"story: no LoRA named {name!r} on this server", "name a LoRA of GET /v1/loras", "story")
        out.append({**item, "path": str(path), "name": item.get("name") or name})
    data["loras"] = out


def _int(value: Any, param: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(str(value))
    except ValueError:
        raise bad(f"{param} must be a whole number, got {value!r}", f"send e.g. {param}=4", param) from None
    return number


def _seconds(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        seconds = float(str(value))
    except ValueError:
        raise bad(f"seconds must be a number, got {value!r}", "send e.g. seconds=8", "seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise bad(f"seconds must be positive, got {value!r}", "send e.g. seconds=8", "seconds")
    return seconds


def _size(value: Any) -> dict:
    if not value:
        return {}
    match = re.fullmatch(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*", str(value))
    if not match:
        raise bad(f"size must be WIDTHxHEIGHT, got {value!r}", "send e.g. size=832x480", "size")
    return {"width": int(match[1]), "height": int(match[2])}


def clips_for_seconds(story: Story, seconds: float, extending: bool = False) -> int:
    """The fewest clips whose frames last at least ``seconds`` (``story`` resolved): a whole video,
    or the clips an extension adds (each adds F - 1 - 4K frames, pixel modes F - N)."""
    F = story.frames
    per_clip = F - 1 - 4 * story.motion_latents if story.latent_motion else F - story.motion_frames
    frames = math.ceil(seconds * story.fps - 1e-9)
    if extending:
        return max(1, math.ceil(frames / per_clip))
    return 1 if frames <= F else 1 + math.ceil((frames - F) / per_clip)


def build_story(fields: dict, settings, *, reference: Path, lora_dir: Path | None, limits: Limits,
                base: dict | None = None, prefix: list | None = None) -> tuple[dict, Story]:
    """The story a request asks for, validated and resolved against the model's ``settings``.

    Returns the story as a dict (what the job folder keeps; paths inside the server) and the
    resolved story. ``base``: an existing video's story that this request extends (its settings
    stay). ``prefix``: clips that exist already (an uploaded video), placed before the new ones."""
    data = dict(base or {})
    text = parse_story_text(fields.get("story"))
    if base is not None and set(text) - {"clips", "prompts"}:
        raise bad("story: an extension continues the video's settings; only its clips can be given",
                  "send the new clips only", "story")
    data.update(text)
    if base is None:
        lora_paths(data, lora_dir)
    data.update(_size(fields.get("size")))
    for key in ("seed", "steps"):
        if (value := _int(fields.get(key), key)) is not None:
            if base is not None:
                raise bad(f"{key} cannot change in an extension", "drop it", key)
            data[key] = value
            if key == "steps":
                data.pop("timesteps", None)
    count = _int(fields.get("clips"), "clips")
    seconds = _seconds(fields.get("seconds"))
    prompts = fields.get("prompts")
    if prompts:
        try:
            prompts = json.loads(prompts) if isinstance(prompts, str) else prompts
        except ValueError:
            raise bad("prompts must be a JSON list of strings", 'send e.g. prompts=["a", "b"]', "prompts") from None
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise bad("prompts must be a JSON list of non-empty strings", 'send e.g. prompts=["a", "b"]', "prompts")
    prompt = (fields.get("prompt") or "").strip()

    old = list(base.get("clips") or base.get("prompts") or []) if base is not None else list(prefix or [])
    new = text.get("clips") or text.get("prompts")
    data.pop("clips", None)
    data.pop("prompts", None)
    if new is None:
        sources = prompts or ([prompt] if prompt else None)
        if not sources:
            raise bad("no prompt", "send prompt (and seconds or clips), prompts, or a story with clips", "prompt")
        if count is None and seconds is not None:
            probe = story_from_dict({**data, "clips": old + [sources[0]], "reference": str(reference)},
                                    base=reference.parent).resolve(settings)
            count = clips_for_seconds(probe, seconds, extending=bool(old))
        if count is not None and len(old) + count > limits.max_clips:
            raise bad(f"{len(old) + count} clips is more than this server's {limits.max_clips}",
                      "ask for fewer seconds or clips", "seconds" if seconds is not None else "clips")
        new = [c.prompt for c in cycle_prompts(sources, max(1, count or len(sources)))]
    elif count is not None:
        new = _repeat(new, count)
    data["clips"] = old + list(new)
    data["fuse_loras"] = False  # one engine serves every request's LoRA stack: adapters stay switchable
    _check_limits(data["clips"], limits, trusted=len(old))
    story = story_from_dict({**data, "reference": str(reference)}, base=reference.parent)
    resolved = story.resolve(settings)
    if len(resolved.clips) > limits.max_clips:
        raise bad(f"{len(resolved.clips)} clips is more than this server's {limits.max_clips}",
                  "ask for fewer seconds or clips", "seconds")
    return data, resolved


def _repeat(items: list, count: int) -> list:
    return [items[i % len(items)] for i in range(count)]


def _check_limits(clips: list, limits: Limits, trusted: int = 0) -> None:
    """Prompt lengths and clip counts; and no request-made keyframe paths (the first ``trusted``
    clips come from the server's own story of the video being extended)."""
    total = 0
    for i, clip in enumerate(clips):
        prompt = clip if isinstance(clip, str) else clip.get("prompt", "") if isinstance(clip, dict) else ""
        if isinstance(prompt, str) and len(prompt) > limits.max_prompt_chars:
            raise bad(f"a prompt of {len(prompt)} characters is longer than {limits.max_prompt_chars}",
                      "shorten it", "prompt")
        if i >= trusted and isinstance(clip, dict) and ("end_frame" in clip or "keyframes" in clip):
            # keyframes name image files; a client must never make the server read its own files
            raise bad("clips in a story cannot name end_frame or keyframes files",
                      "upload end frames as end_frame[N] files (N: the clip, from 0)", "story")
        repeat = clip.get("repeat", 1) if isinstance(clip, dict) else 1
        total += repeat if isinstance(repeat, int) and repeat > 0 else 1
    if total > limits.max_clips:
        raise bad(f"{total} clips is more than this server's {limits.max_clips}", "ask for fewer clips", "clips")


def save_reference(upload: bytes, path: Path, limits: Limits) -> None:
    """Check an uploaded image (size before decoding: no decompression bombs) and keep it as PNG."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(upload)) as im:
            w, h = im.size
            if w * h > limits.max_image_pixels:
                raise bad(f"input_reference is {w}x{h}, more than {limits.max_image_pixels} pixels",
                          "send a smaller image", "input_reference")
            image = im.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as e:
        raise bad(f"input_reference is not a readable image: {e}", "send a PNG or JPEG file", "input_reference") from None
    tmp = path.with_name(path.name + ".partial")
    image.save(tmp, format="PNG")
    tmp.replace(path)


def shapesworld_reference(prompt: str, path: Path, size: int) -> None:
    """The built-in model without an upload: the world's own first frame for the first prompt."""
    from ..shapesworld import render_reference

    try:
        image = render_reference(prompt, size=size)
    except (ValueError, KeyError) as e:
        raise bad(f"no input_reference, and the first prompt is not a ShapesWorld prompt ({e})",
                  "upload input_reference, or write e.g. 'a big red circle moves left on a navy background'",
                  "input_reference") from None
    image.save(path)
