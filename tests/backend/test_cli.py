from __future__ import annotations

import base64
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest

from backend.cli import main
from tests.ports import free_port


def test_serve_exits_2_with_one_line_for_a_non_model_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--model", str(tmp_path), "--device", "cpu"]) == 2

    err = capsys.readouterr().err.strip()
    assert err == f"quotagate-backend: error: {tmp_path} is not a diffusers model directory (no model_index.json)"


def test_serve_tiny_creates_the_model_under_the_data_dir_on_first_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A bad --sizes stops it right after the model is made, before anything listens.
    assert main(["serve", "--model", "tiny", "--data-dir", str(tmp_path), "--device", "cpu", "--sizes", "big"]) == 2

    assert (tmp_path / "models" / "tiny" / "model_index.json").is_file()
    assert capsys.readouterr().err.strip().endswith("size must look like '256x256', got 'big'")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--default-size", "512x512", "--sizes", "64x64"], "default size 512x512 is not among the served sizes"),
        (["--max-batch-images", "0"], "max_batch_images must be at least 1"),
    ],
)
def test_serve_refuses_bad_settings_with_exit_2(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert main(["serve", "--model", str(tiny_model_dir), "--device", "cpu", *flags]) == 2

    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_served_over_real_http_the_openai_client_gets_images(tiny_model_dir: Path) -> None:
    port = free_port()
    command = [
        sys.executable, "-m", "backend.cli", "serve", "--model", str(tiny_model_dir), "--device", "cpu",
        "--port", str(port), "--sizes", "64x64", "--default-size", "64x64", "--threads", "1",
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert server.stderr is not None
    # Bounds the whole test if the server hangs without a word.
    killer = threading.Timer(120, server.kill)
    killer.start()
    drain = threading.Thread(target=server.stderr.read)
    try:
        # The server logs this once the model is loaded and warm, i.e. when /readyz turns 200.
        for line in server.stderr:
            if "model loaded and warmed" in line:
                break
        else:
            pytest.fail(f"the server exited with {server.wait()} before it was ready")
        drain.start()
        with openai.OpenAI(api_key="unused", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0) as client:
            result = client.images.generate(prompt="a lighthouse at dusk", n=2, model="tiny")

        assert result.data is not None
        assert [base64.b64decode(image.b64_json or "")[:4] for image in result.data] == [b"\x89PNG"] * 2
    finally:
        killer.cancel()
        server.terminate()
        server.wait(timeout=30)
        if drain.is_alive():
            drain.join(timeout=30)
        server.stderr.close()
