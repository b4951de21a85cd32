"""The built-in model's text side: a word-level tokenizer over the ShapesWorld grammar and a
tiny frozen UMT5 encoder, both built offline.

Like real Wan, the text encoder is a randomly initialised-then-frozen UMT5 *architecture* (here
never trained: the DiT learns to read its features). Prompts are embedded exactly as the engine
does it, through diffusers' Wan pipeline code: tokenised to ``max_sequence_length`` tokens with
``</s>`` appended, encoded, and zeroed beyond each prompt's length.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .vocab import words

MAX_SEQUENCE_LENGTH = 24  # the longest grammar prompt is 16 words + </s>
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 (UMT5's pad and eos ids are 0 and 1)


def build_tokenizer(max_length: int = MAX_SEQUENCE_LENGTH):
    """A ``PreTrainedTokenizerFast`` over the grammar's words; unknown words map to ``<unk>``.

    Lower-cases, treats anything but letters as a space, appends ``</s>``. Saved with
    ``save_pretrained`` it loads offline with ``AutoTokenizer.from_pretrained(folder)``.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"[^a-z]+"), " ")])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def build_text_encoder(vocab_size: int, seed: int = 0, d_model: int = 64):
    """A tiny random UMT5 encoder (2 layers, 4 heads), frozen and in eval mode."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        is_encoder_decoder=False,
    )
    torch.manual_seed(seed)
    model = UMT5EncoderModel(config)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH):
    """``[len(prompts), max_sequence_length, d_model]`` embeddings, as the engine computes them."""
    from diffusers import WanImageToVideoPipeline

    holder = SimpleNamespace(tokenizer=tokenizer, text_encoder=text_encoder)
    return WanImageToVideoPipeline._get_t5_prompt_embeds(
        holder, prompts, max_sequence_length=max_sequence_length, device=torch.device("cpu"), dtype=torch.float32
    )
