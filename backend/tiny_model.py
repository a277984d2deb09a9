"""Build a tiny, seeded StableDiffusionPipeline from configs: no download, ~8 MiB, reproducible."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

__all__ = ["build_tiny_pipeline", "byte_level_vocab", "make_tiny_model"]

_MAX_TOKENS = 77
_HIDDEN = 32


def _bytes_to_unicode() -> list[str]:
    """The characters GPT-2 and CLIP use for the 256 byte values, indexed by byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    by_byte = {byte: chr(byte) for byte in printable}
    others = (byte for byte in range(256) if byte not in by_byte)
    for shift, byte in enumerate(others):
        by_byte[byte] = chr(256 + shift)
    return [by_byte[byte] for byte in range(256)]


def byte_level_vocab() -> dict[str, int]:
    """514 tokens: every byte, every byte ending a word, start and end of text; any UTF-8 text encodes."""
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def _tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=_MAX_TOKENS)


def _text_encoder(vocab_size: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_MAX_TOKENS,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config)


def _unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=_HIDDEN,
        # diffusers reads attention_head_dim as the number of heads here.
        attention_head_dim=2,
        norm_num_groups=32,
    )


def _vae() -> AutoencoderKL:
    # Three blocks: latents are 1/4 of the image. With two, a 256 px image costs 5-10x more on CPU.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=64,
    )


def _scheduler() -> DDIMScheduler:
    # Not Euler: its set_timesteps calls np.array() on a tensor, which numpy 2.4 + torch 2.13 answer with a
    # DeprecationWarning on every call (an error under pytest). DDIM with trailing spacing is good at 1-4 steps.
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
    )


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline with random weights drawn from `seed`, built in memory."""
    steps = [
        ("tokenizer", _tokenizer),
        ("text encoder", lambda: _text_encoder(len(byte_level_vocab()))),
        ("unet", _unet),
        ("vae", _vae),
        ("scheduler", _scheduler),
    ]
    parts: dict[str, object] = {}
    torch.manual_seed(seed)
    with tqdm(steps, desc="creating tiny model", unit="part") as bar:
        for name, build in bar:
            bar.set_postfix_str(name)
            parts[name] = build()
    return StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=parts["text encoder"],
        tokenizer=parts["tokenizer"],
        unet=parts["unet"],
        scheduler=parts["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_tiny_model(directory: Path, seed: int = 0) -> Path:
    """Write the tiny pipeline to `directory` with save_pretrained and return the directory."""
    pipe = build_tiny_pipeline(seed)
    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory
