"""Load a diffusers pipeline once, offline, and run one batched generation call over it."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from backend.errors import ModelUnavailable

__all__ = ["encode_png", "generate", "load_pipeline", "pipeline_runner", "resolve_device"]

# Filler slots padded onto a call so that its shape does not depend on how many requests it holds.
_FILLER_PROMPT = ""
_FILLER_SEED = 0


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when available; 'cuda' without a GPU is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable("--device cuda was asked for, but torch sees no CUDA device.")
    if device not in ("cpu", "cuda"):
        raise ModelUnavailable(f"--device must be auto, cpu or cuda, not {device!r}.")
    return torch.device(device)


def load_pipeline(path: Path, device: torch.device) -> DiffusionPipeline:
    """Load from a local directory only: fp16 on CUDA, fp32 on CPU."""
    # Without this check a missing path shaped like 'org/name' is taken for a hub repository id.
    if not (path / "model_index.json").is_file():
        raise ModelUnavailable(f"{path} is not a diffusers model directory (no model_index.json).")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"cannot load the model at {path}: {exc}") from exc
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    pipe: DiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    size: tuple[int, int],
    steps: int,
    *,
    guidance_scale: float = 1.0,
    pad_to: int = 0,
) -> list[Image.Image]:
    """One pipeline call; image i is drawn from seeds[i] alone, so it does not depend on its neighbours.

    With `pad_to`, filler slots make the call exactly that many images: torch's CPU kernels (oneDNN
    convolutions, GEMV for one row, GroupNorm) round differently for different batch sizes, so only a
    fixed shape makes an image bit-identical whether its request ran alone or with others.
    """
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError("generate needs one seed per prompt and at least one prompt")
    count = len(prompts)
    filler = max(pad_to - count, 0)
    all_prompts = [*prompts, *([_FILLER_PROMPT] * filler)]
    all_seeds = [*seeds, *([_FILLER_SEED] * filler)]
    # CPU generators: the same seed gives the same latents on every device.
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in all_seeds]
    width, height = size
    with torch.inference_mode():
        output = pipe(
            prompt=all_prompts,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="pil",
        )
    images: list[Image.Image] = output.images
    return images[:count]


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pipeline_runner(
    pipe: DiffusionPipeline, *, guidance_scale: float = 1.0
) -> Callable[[Sequence[str], Sequence[int], tuple[int, int], int, int], list[bytes]]:
    """The batcher's runner over `pipe`: one call of generate, each image encoded as PNG."""

    def run(
        prompts: Sequence[str], seeds: Sequence[int], size: tuple[int, int], steps: int, pad_to: int
    ) -> list[bytes]:
        images = generate(pipe, prompts, seeds, size, steps, guidance_scale=guidance_scale, pad_to=pad_to)
        return [encode_png(image) for image in images]

    return run
