"""Frozen text encoders: Flux's CLIP (pooled) + T5 pair, real or tiny.

With ``model.pretrained`` set they load from the local FLUX.1 directory (``tokenizer``, ``text_encoder``,
``tokenizer_2``, ``text_encoder_2`` sub-folders, as diffusers lays them out). Otherwise a tiny pair is built:
a byte-level tokenizer (no vocabulary file, no download) and random-init CLIP/T5 encoders whose weights are a pure
function of ``seed``, so every stage process rebuilds the same encoders.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerFast, T5Config,
                          T5EncoderModel, T5TokenizerFast)

SPECIAL = ["<pad>", "</s>", "<s>"]  # pad=0, eos=1, bos=2


def byte_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 3 special tokens + 256 byte symbols, no merges."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   model_max_length=max_length)


def build_text_encoders(model_cfg: dict, seed: int = 0):
    """Return ``(tokenizer, text_encoder, tokenizer_2, text_encoder_2)``, all frozen and in eval mode."""
    if model_cfg.get("pretrained"):
        root = Path(model_cfg["pretrained"])
        parts = (CLIPTokenizer.from_pretrained(root / "tokenizer"), CLIPTextModel.from_pretrained(root / "text_encoder"),
                 T5TokenizerFast.from_pretrained(root / "tokenizer_2"),
                 T5EncoderModel.from_pretrained(root / "text_encoder_2"))
    else:
        tiny = model_cfg["tiny"]
        tok = byte_tokenizer(tiny["text_max_length"])
        vocab = len(tok)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            clip = CLIPTextModel(CLIPTextConfig(
                vocab_size=vocab, hidden_size=tiny["pooled_projection_dim"], intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=tiny["text_max_length"],
                pad_token_id=0, bos_token_id=2, eos_token_id=1, projection_dim=tiny["pooled_projection_dim"]))
            t5 = T5EncoderModel(T5Config(
                vocab_size=vocab, d_model=tiny["joint_attention_dim"], d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        parts = (tok, clip, byte_tokenizer(tiny["text_max_length"]), t5)
    for m in (parts[1], parts[3]):
        m.requires_grad_(False).eval()
    return parts
