from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from backend.cli import main
from backend.errors import ModelUnavailable
from backend.pipeline import generate, load_pipeline


def test_make_tiny_model_writes_a_loadable_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-tiny-model", str(tmp_path / "tiny")]) == 0

    assert "creating tiny model" in capsys.readouterr().err  # the tqdm bar
    assert (tmp_path / "tiny" / "model_index.json").is_file()
    pipe = load_pipeline(tmp_path / "tiny", torch.device("cpu"))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.unet.dtype == torch.float32
    [image] = generate(pipe, ["a red fox"], [3], (64, 64), 1)
    assert image.size == (64, 64)


def test_tiny_model_weights_are_reproducible(tmp_path: Path, tiny_model_dir: Path) -> None:
    assert main(["make-tiny-model", str(tmp_path / "again")]) == 0

    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "again" / part).read_bytes() == (tiny_model_dir / part).read_bytes()


def test_hub_is_switched_off_once_backend_is_imported() -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1"


def test_a_path_without_model_index_is_refused_before_any_hub_lookup(tmp_path: Path) -> None:
    # Shaped like a hub id on purpose: it must never be taken for one.
    with pytest.raises(ModelUnavailable, match="no model_index.json"):
        load_pipeline(Path("stabilityai/sd-turbo"), torch.device("cpu"))


def test_same_seed_same_image_across_calls(tiny_model_dir: Path) -> None:
    pipe = load_pipeline(tiny_model_dir, torch.device("cpu"))
    first = generate(pipe, ["a lighthouse"], [11], (64, 64), 2)[0].tobytes()
    again = generate(pipe, ["a lighthouse"], [11], (64, 64), 2)[0].tobytes()
    other = generate(pipe, ["a lighthouse"], [12], (64, 64), 2)[0].tobytes()
    assert first == again
    assert first != other
