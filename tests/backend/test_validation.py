from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry

from backend.validation import MAX_PRIORITY, parse_generation, parse_priority
from tests.backend.conftest import AppFactory, RecordingRunner, make_limits


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"prompt": ""}, "prompt", "invalid_prompt"),
        ({"prompt": "   "}, "prompt", "invalid_prompt"),
        ({}, "prompt", "invalid_prompt"),
        ({"prompt": 42}, "prompt", "invalid_prompt"),
        ({"prompt": "x" * 1001}, "prompt", "prompt_too_long"),
        ({"prompt": "a cat", "n": 0}, "n", "out_of_range"),
        ({"prompt": "a cat", "n": 5}, "n", "out_of_range"),
        ({"prompt": "a cat", "n": "2"}, "n", "invalid_type"),
        ({"prompt": "a cat", "n": True}, "n", "invalid_type"),
        ({"prompt": "a cat", "size": "100x100"}, "size", "invalid_size"),
        ({"prompt": "a cat", "size": "big"}, "size", "invalid_size"),
        ({"prompt": "a cat", "size": 256}, "size", "invalid_size"),
        ({"prompt": "a cat", "response_format": "url"}, "response_format", "unsupported_response_format"),
        ({"prompt": "a cat", "model": "dall-e-3"}, "model", "model_not_found"),
        ({"prompt": "a cat", "steps": 9}, "steps", "out_of_range"),
        ({"prompt": "a cat", "seed": -1}, "seed", "out_of_range"),
        ({"prompt": "a cat", "style": "vivid"}, "style", "unknown_param"),
    ],
)
def test_each_bad_input_is_a_400_naming_its_param(
    serve: AppFactory, recording: RecordingRunner, body: dict[str, object], param: str, code: str
) -> None:
    client = serve()

    response = client.post("/v1/images/generations", json=body)

    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "message": response.json()["error"]["message"],
            "type": "invalid_request_error",
            "param": param,
            "code": code,
        }
    }
    assert recording.calls == []


def test_url_response_format_says_why(serve: AppFactory) -> None:
    response = serve().post("/v1/images/generations", json={"prompt": "a cat", "response_format": "url"})

    assert "b64_json" in response.json()["error"]["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_a_body_that_is_not_a_json_object_is_a_400(serve: AppFactory, raw: bytes) -> None:
    response = serve().post("/v1/images/generations", content=raw, headers={"content-type": "application/json"})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_a_body_over_the_limit_is_a_413_even_without_content_length(serve: AppFactory) -> None:
    registry = CollectorRegistry()
    client = serve(registry=registry)
    body = json.dumps({"prompt": "a cat", "user": "x" * (64 * 1024)}).encode()

    declared = client.post("/v1/images/generations", content=body)
    streamed = client.post("/v1/images/generations", content=iter([body[:1000], body[1000:]]))

    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "body_too_large"
    assert registry.get_sample_value("quotagate_backend_rejections_total", {"reason": "too_large"}) == 2


def test_a_good_body_becomes_a_frozen_request() -> None:
    limits = make_limits()
    body = b'{"prompt": "a cat", "n": 2, "size": "128x128", "seed": 5, "steps": 3, "user": "u1", "model": "tiny"}'

    request = parse_generation(body, limits, priority=10)

    assert (request.prompt, request.n, request.width, request.height) == ("a cat", 2, 128, 128)
    assert (request.seed, request.steps, request.priority) == (5, 3, 10)
    defaults = parse_generation(b'{"prompt": "a cat"}', limits)
    assert (defaults.n, defaults.width, defaults.steps, defaults.seed) == (1, 64, limits.default_steps, None)


@pytest.mark.parametrize(
    ("header", "priority"),
    [(None, 0), ("", 0), ("high", 0), ("1.5", 0), ("10", 10), (" 7 ", 7), ("-3", 0), ("1000", MAX_PRIORITY)],
)
def test_priority_header(header: str | None, priority: int) -> None:
    assert parse_priority(header) == priority


def test_limits_refuse_a_default_size_they_do_not_serve() -> None:
    with pytest.raises(ValueError, match="not among the served sizes"):
        make_limits(default_size=(512, 512))
