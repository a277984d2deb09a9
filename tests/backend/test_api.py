from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import openai
import torch
from PIL import Image
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from backend.app import create_app
from backend.pipeline import load_pipeline, pipeline_runner
from tests.backend.conftest import AppFactory, RecordingRunner, make_limits, make_settings, portal


def _png(b64: str) -> Image.Image:
    raw = base64.b64decode(b64)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


def test_generation_returns_n_pngs_of_the_asked_size(serve: AppFactory) -> None:
    client = serve()

    response = client.post("/v1/images/generations", json={"prompt": "a cat", "n": 3, "size": "128x128"})

    assert response.status_code == 200
    body = response.json()
    assert isinstance(body["created"], int)
    images = [_png(item["b64_json"]) for item in body["data"]]
    assert [image.size for image in images] == [(128, 128)] * 3
    assert len({image.tobytes() for image in images}) == 3


def test_default_size_is_the_configured_one(serve: AppFactory) -> None:
    client = serve(make_settings(limits=make_limits(default_size=(256, 256))))

    response = client.post("/v1/images/generations", json={"prompt": "a cat", "model": "tiny"})

    assert response.status_code == 200
    [item] = response.json()["data"]
    assert _png(item["b64_json"]).size == (256, 256)


def test_the_openai_client_parses_the_response(serve: AppFactory) -> None:
    client = serve()
    api = openai.OpenAI(api_key="unused", base_url="http://testserver/v1", http_client=client, max_retries=0)

    result = api.images.generate(prompt="a watercolour boat", n=2, size="64x64", response_format="b64_json")

    assert result.data is not None and len(result.data) == 2
    assert all(_png(image.b64_json or "").size == (64, 64) for image in result.data)
    assert [model.id for model in api.models.list()] == ["tiny"]


def test_health_ready_and_metrics(serve: AppFactory) -> None:
    registry = CollectorRegistry()
    client = serve(registry=registry)

    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json() == {"status": "ready"}
    client.post("/v1/images/generations", json={"prompt": "a cat", "n": 2}, headers={"X-Quotagate-Priority": "10"})
    client.post("/v1/images/generations", json={"prompt": ""})

    text = client.get("/metrics").text
    assert "quotagate_backend_images_generated_total 2.0" in text
    assert registry.get_sample_value("quotagate_backend_images_generated_total") == 2
    assert registry.get_sample_value("quotagate_backend_batch_images_count") == 1
    assert registry.get_sample_value("quotagate_backend_batch_images_sum") == 2
    assert registry.get_sample_value("quotagate_backend_generation_seconds_count") == 1
    assert registry.get_sample_value("quotagate_backend_rejections_total", {"reason": "invalid"}) == 1
    assert registry.get_sample_value("quotagate_backend_queue_depth_requests", {"priority": "10"}) == 0


def test_readyz_is_503_until_the_model_is_warm(serve: AppFactory, recording: RecordingRunner) -> None:
    recording.gate.clear()  # holds the warm-up generation
    app = create_app(make_settings(), lambda: recording)
    with TestClient(app) as client:
        recording.entered.wait(timeout=60)
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        refused = client.post("/v1/images/generations", json={"prompt": "a cat"})
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "not_ready"
        recording.gate.set()
        portal(client).call(app.state.backend.ready.wait)
        assert client.get("/readyz").status_code == 200


def test_an_inference_failure_is_a_500_json_and_the_server_lives_on(serve: AppFactory) -> None:
    # 60 is not a multiple of 8: the real pipeline raises.
    client = serve(make_settings(limits=make_limits(sizes=((64, 64), (60, 60)))))

    failed = client.post("/v1/images/generations", json={"prompt": "a cat", "size": "60x60"})
    after = client.post("/v1/images/generations", json={"prompt": "a cat", "size": "64x64"})

    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "server_error"
    assert failed.json()["error"]["code"] == "inference_failed"
    assert after.status_code == 200


def test_unknown_route_and_wrong_method_are_openai_shaped(serve: AppFactory) -> None:
    client = serve()

    missing = client.get("/v1/nothing")
    wrong = client.get("/v1/images/generations")

    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "invalid_request_error"
    assert wrong.status_code == 405
    assert set(wrong.json()["error"]) == {"message", "type", "param", "code"}


def test_a_model_that_fails_to_load_keeps_readyz_503_and_reports_why(tiny_model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    failures: list[str] = []
    load = lambda: pipeline_runner(load_pipeline(broken, torch.device("cpu")))  # noqa: E731
    app = create_app(make_settings(), load, on_load_failure=failures.append)

    with TestClient(app) as client:
        portal(client).call(app.state.backend.settled.wait)
        ready = client.get("/readyz")
        refused = client.post("/v1/images/generations", json={"prompt": "a cat"})

    assert ready.status_code == 503
    assert ready.json()["status"] == "failed"
    assert len(failures) == 1 and ready.json()["error"] == failures[0]
    assert refused.status_code == 503
