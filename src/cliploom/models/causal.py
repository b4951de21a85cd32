"""Block-causal self-attention with a rolling KV cache on diffusers' ``WanTransformer3DModel``.

What the causal route (Self-Forcing, CausVid, LongLive, Krea realtime) needs from the model, and
diffusers lacks: Wan's blocks pass no ``attention_mask`` to their self-attention, so the mask and
the cache live in the attention processor (installed on every block's ``attn1``; cross-attention
is untouched and sees the text of the call, so every block follows its own clip's prompt).

A :class:`CausalSession` is shared by the processors of one transformer:

* ``dense`` mode: one forward over a whole latent sequence; token ``i`` attends to token ``j`` when
  ``j``'s block is not after ``i``'s (training, and the reference the cache is tested against);
* ``cached`` mode: a forward over one block; its tokens attend to the cached keys and values of
  earlier blocks and to themselves. With ``write`` on, the pass appends its keys and values to the
  cache as a new block (the clean pass after a block is denoised, Self-Forcing's way); the cache
  keeps the first ``sink`` latent frames and the last ``window`` ones, so it never holds more than
  ``(sink + window)`` frames' tokens however long the video.

Keys are cached after RoPE, at the positions they were written with: :class:`ShiftedRope` gives a
block the temporal positions ``offset ..`` of the whole stream instead of ``0 ..``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class _Block:
    start: int  # its first latent frame's index in the stream
    frames: int  # latent frames in the block
    inputs: tuple | None = None  # what the pass that wrote it was given (to recompute it: re-cache)
    position: int | None = None  # the temporal RoPE position it was written at (default: ``start``)
    k: list[torch.Tensor] = field(default_factory=list)  # per layer [B, tokens, heads, dim]
    v: list[torch.Tensor] = field(default_factory=list)


class CausalSession:
    """The mode, the mask and the cache shared by one transformer's causal processors."""

    def __init__(self, layers: int, sink: int = 0, window: int | None = None):
        self.layers = layers
        self.sink = sink  # latent frames kept from the start of the stream
        self.window = window  # latent frames kept at the end (None: all)
        self.mode = "dense"
        self.write = False
        self.mask: torch.Tensor | None = None  # dense: [tokens, tokens] bool, True = attend
        self.text_mask: torch.Tensor | None = None  # dense, several clips' prompts: [tokens, text tokens]
        self.blocks: list[_Block] = []
        self.written = 0  # latent frames written to the cache so far (the next block's start)
        self._pending: _Block | None = None

    # -- dense ------------------------------------------------------------------------------------
    def set_blocks(self, frames_per_block: list[int], tokens_per_frame: int, device=None) -> None:
        """Dense mode over blocks of these many latent frames (in order)."""
        owner = torch.repeat_interleave(torch.arange(len(frames_per_block)),
                                        torch.tensor(frames_per_block) * tokens_per_frame)
        self.mask = (owner[None, :] <= owner[:, None]).to(device)
        self.mode = "dense"

    def set_clip_texts(self, clip_of_frame: list[int], tokens_per_frame: int, text_tokens: int, device=None) -> None:
        """Dense mode over several clips, each with its own prompt: the text is the clips' prompts
        concatenated (``text_tokens`` each) and a frame's tokens read only their clip's."""
        owner = torch.repeat_interleave(torch.tensor(clip_of_frame), tokens_per_frame)
        clips = torch.arange(max(clip_of_frame) + 1).repeat_interleave(text_tokens)
        self.text_mask = (owner[:, None] == clips[None, :]).to(device)

    # -- cached -----------------------------------------------------------------------------------
    def reset(self) -> None:
        self.blocks, self._pending, self.mode, self.write, self.written = [], None, "cached", False, 0

    @contextmanager
    def writing(self, frames: int, start: int | None = None, inputs: tuple | None = None, position: int | None = None):
        """A pass whose keys and values become a cached block of ``frames`` latent frames: the next
        one of the stream, or (``start``, re-cache) the block that starts there, rewritten.
        ``position``: the RoPE position the pass runs at, when it is not ``start`` (rebased)."""
        new = start is None or start >= self.written
        block = _Block(self.written if start is None else start, frames, inputs)
        block.position = block.start if position is None else position
        self.mode, self.write, self._pending = "cached", True, block
        try:
            yield
            self.blocks.append(self._pending)
            self.blocks.sort(key=lambda b: b.start)
            if new:
                self.written = block.start + frames
            self._evict()
        finally:
            self.write, self._pending = False, None

    def _evict(self) -> None:
        """Drop blocks that are neither in the sink nor in the window (whole blocks only)."""
        if self.window is None:
            return
        end = self.written
        self.blocks = [b for b in self.blocks if b.start + b.frames <= self.sink or b.start >= end - self.window]

    def cached_frames(self) -> int:
        return sum(b.frames for b in self.blocks)

    def cached_tokens(self) -> int:
        return sum(int(b.k[0].shape[1]) for b in self.blocks if b.k)

    def past(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.blocks:
            return None, None
        return (torch.cat([b.k[layer] for b in self.blocks], dim=1), torch.cat([b.v[layer] for b in self.blocks], dim=1))

    def keep(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.write and self._pending is not None:
            self._pending.k.append(k.detach())
            self._pending.v.append(v.detach())


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on ``[B, tokens, heads, dim]`` (interleaved pairs, as diffusers)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class BlockCausalProcessor:
    """Self-attention of one Wan block under the session's mask or cache."""

    def __init__(self, session: CausalSession, layer: int):
        self.session, self.layer = session, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if attn.fused_projections:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
        if rotary_emb is not None:
            q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
        s = self.session
        mask = None
        if s.mode == "dense":
            mask = s.mask
            keys, values = k, v
        else:
            s.keep(self.layer, k, v)
            past_k, past_v = s.past(self.layer)
            if past_k is not None:  # a guidance batch of two reads the one cached stream
                past_k, past_v = (p.expand(k.shape[0], -1, -1, -1) if p.shape[0] != k.shape[0] else p
                                  for p in (past_k, past_v))
                keys, values = torch.cat([past_k.to(k), k], dim=1), torch.cat([past_v.to(v), v], dim=1)
            else:
                keys, values = k, v
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=mask)
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class ClipTextProcessor:
    """Cross-attention in which a clip's tokens read only their clip's prompt (the session's
    ``text_mask``), for a dense pass over several clips. Image context (Wan 2.1's CLIP tokens, in
    front of the text) is read by every token, as Wan's own processor does."""

    def __init__(self, session: CausalSession):
        self.session = session

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        mask = self.session.text_mask
        image = None
        if attn.add_k_proj is not None:
            n_image = encoder_hidden_states.shape[1] - mask.shape[1]
            image, encoder_hidden_states = encoder_hidden_states[:, :n_image], encoder_hidden_states[:, n_image:]
        if attn.fused_projections:
            q = attn.to_q(hidden_states)
            k, v = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if image is not None:
            ki, vi = attn.norm_added_k(attn.add_k_proj(image)), attn.add_v_proj(image)
            ki, vi = (t.unflatten(2, (attn.heads, -1)).transpose(1, 2) for t in (ki, vi))
            out = out + F.scaled_dot_product_attention(q, ki, vi)
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class ShiftedRope(torch.nn.Module):
    """Wan's RoPE with the temporal positions of a block that starts ``offset`` latent frames into
    the stream. The frequency tables are the model's own; a stream longer than the table (the
    built-in model's holds 64 positions) gets a longer table of the same frequencies (RoPE has no
    weights: its first rows equal the model's)."""

    def __init__(self, rope: torch.nn.Module, heads: int = 1):
        super().__init__()
        self.inner = rope
        self.offset = 0
        self.heads = heads
        self.jitter = 0.0  # LoL's RoPE jitter: head h's temporal frequencies scaled by 1 + jitter * e_h

    def forward(self, hidden_states: torch.Tensor):
        cos, sin = self._shifted(hidden_states)
        if self.jitter:
            cos, sin = self._jittered(hidden_states, cos, sin)
        return cos, sin

    def _jittered(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Per-head temporal frequencies ``w_k (1 + jitter e_h)``, ``e_h`` evenly spread over
        ``[-1, 1]`` across the heads (LoL: heads stop agreeing on which far frame to attend to, the
        cause of snap-backs to the sink); the spatial parts stay. ``[1, tokens, heads, dim]``."""
        _, _, f, h, w = hidden_states.shape
        _, ph, pw = self.inner.patch_size
        hw = (h // ph) * (w // pw)
        t_dim = self.inner.t_dim
        omega = 1.0 / (10000.0 ** (torch.arange(0, t_dim, 2, dtype=torch.float64) / t_dim))  # [t_dim / 2]
        e = torch.linspace(-1, 1, self.heads, dtype=torch.float64) if self.heads > 1 else torch.zeros(1, dtype=torch.float64)
        positions = torch.arange(self.offset, self.offset + f, dtype=torch.float64).repeat_interleave(hw)  # [tokens]
        angles = positions[:, None, None] * omega[None, None, :] * (1 + self.jitter * e)[None, :, None]
        t_cos = angles.cos().repeat_interleave(2, dim=-1).float().to(cos.device)  # [tokens, heads, t_dim]
        t_sin = angles.sin().repeat_interleave(2, dim=-1).float().to(sin.device)
        rest = lambda t: t[0, :, 0, t_dim:].unsqueeze(1).expand(-1, self.heads, -1)  # noqa: E731
        return (torch.cat([t_cos, rest(cos)], dim=-1).unsqueeze(0), torch.cat([t_sin, rest(sin)], dim=-1).unsqueeze(0))

    def _shifted(self, hidden_states: torch.Tensor):
        b, c, f, h, w = hidden_states.shape
        if self.offset == 0:
            return self.inner(hidden_states)
        if self.offset + f > self.inner.max_seq_len:
            from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

            longer_rope = WanRotaryPosEmbed(self.inner.attention_head_dim, self.inner.patch_size,
                                            2 * (self.offset + f))
            self.inner = longer_rope.to(self.inner.freqs_cos.device)
        _, ph, pw = self.inner.patch_size
        longer = torch.empty((b, c, f + self.offset, h, w), device="meta")  # only its shape is read
        cos, sin = self.inner(longer)
        start = self.offset * (h // ph) * (w // pw)
        return cos[:, start:], sin[:, start:]


@contextmanager
def causal_attention(transformer, sink: int = 0, window: int | None = None, clip_texts: bool = False):
    """Install block-causal processors (and the shifted RoPE) on ``transformer`` for the duration;
    yields the :class:`CausalSession`. With ``clip_texts`` the cross-attention reads per-clip
    prompts (:class:`ClipTextProcessor`; training over several clips). The model's own processors
    and RoPE come back afterwards."""
    blocks = transformer.blocks
    session = CausalSession(len(blocks), sink, window)
    saved = [(b.attn1.processor, b.attn2.processor) for b in blocks]
    rope = transformer.rope
    transformer.rope = ShiftedRope(rope, transformer.config.num_attention_heads)
    try:
        for i, b in enumerate(blocks):
            b.attn1.set_processor(BlockCausalProcessor(session, i))
            if clip_texts:
                b.attn2.set_processor(ClipTextProcessor(session))
        yield session
    finally:
        for b, (p1, p2) in zip(blocks, saved):
            b.attn1.set_processor(p1)
            b.attn2.set_processor(p2)
        transformer.rope = rope


def set_rope_jitter(transformer, jitter: float) -> None:
    """LoL's RoPE jitter for the forwards that follow (inside :func:`causal_attention`; fixed for a
    whole stream, since cached keys keep the rotation they were written with)."""
    transformer.rope.jitter = float(jitter)


def set_offset(transformer, offset: int) -> None:
    """The first latent frame's position of the next forward (inside :func:`causal_attention`)."""
    transformer.rope.offset = offset
