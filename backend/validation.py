"""Parse and check a generation request body into a frozen value; every failure is an InvalidRequest."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from backend.errors import InvalidRequest

__all__ = [
    "MAX_PRIORITY",
    "MAX_SEED",
    "GenerationRequest",
    "RequestLimits",
    "format_size",
    "parse_generation",
    "parse_priority",
    "parse_size",
]

MAX_PRIORITY = 100
MAX_SEED = 2**32 - 1
_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
_KNOWN = frozenset({"prompt", "n", "size", "response_format", "model", "seed", "steps"})
# Sent by some OpenAI clients; accepted and ignored.
_IGNORED = frozenset({"user"})

Size = tuple[int, int]


def parse_size(text: str) -> Size:
    """'WxH' -> (width, height); ValueError when malformed."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"size must look like '256x256', got {text!r}")
    return int(match.group(1)), int(match.group(2))


def format_size(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


@dataclass(frozen=True, kw_only=True)
class RequestLimits:
    """What the served model accepts: sizes, images per request, steps, prompt and body length."""

    model_id: str
    sizes: tuple[Size, ...]
    default_size: Size
    max_n: int = 4
    default_steps: int = 2
    max_steps: int = 8
    max_prompt_chars: int = 1000
    max_body_bytes: int = 64 * 1024
    served_sizes: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        if not self.sizes:
            raise ValueError("sizes must name at least one size, e.g. '256x256'")
        if self.default_size not in self.sizes:
            raise ValueError(f"default size {format_size(self.default_size)} is not among the served sizes")
        if not 1 <= self.default_steps <= self.max_steps:
            raise ValueError("default_steps must be between 1 and max_steps")
        if self.max_n < 1 or self.max_prompt_chars < 1 or self.max_body_bytes < 1:
            raise ValueError("max_n, max_prompt_chars and max_body_bytes must be positive")
        object.__setattr__(self, "served_sizes", frozenset(format_size(s) for s in self.sizes))


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """One checked request; image i uses seed + i when a seed is given."""

    prompt: str
    n: int
    width: int
    height: int
    steps: int
    seed: int | None
    priority: int = 0


def parse_priority(value: str | None) -> int:
    """The X-Quotagate-Priority header: missing or not an integer -> 0; clamped to 0..MAX_PRIORITY."""
    if value is None:
        return 0
    try:
        priority = int(value.strip())
    except ValueError:
        return 0
    return min(max(priority, 0), MAX_PRIORITY)


def _integer(body: dict[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int subclass: `"n": true` must not mean 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{name}' must be an integer.", param=name, code="invalid_type")
    if not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be between {low} and {high}.", param=name, code="out_of_range")
    return value


def _decode(body: bytes) -> dict[str, Any]:
    try:
        decoded = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(decoded, dict):
        raise InvalidRequest("Request body must be a JSON object.", code="invalid_json")
    return decoded


def parse_generation(body: bytes, limits: RequestLimits, *, priority: int = 0) -> GenerationRequest:
    """Check an OpenAI images/generations body against `limits`."""
    data = _decode(body)
    unknown = sorted(set(data) - _KNOWN - _IGNORED)
    if unknown:
        raise InvalidRequest(f"Unrecognized request argument: {unknown[0]}.", param=unknown[0], code="unknown_param")

    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequest("'prompt' must be a non-empty string.", param="prompt", code="invalid_prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidRequest(
            f"'prompt' is longer than {limits.max_prompt_chars} characters.", param="prompt", code="prompt_too_long"
        )

    response_format = data.get("response_format", "b64_json")
    if response_format != "b64_json":
        raise InvalidRequest(
            "Only response_format 'b64_json' is supported; this server does not host image URLs.",
            param="response_format",
            code="unsupported_response_format",
        )

    model = data.get("model")
    if model is not None and model != limits.model_id:
        raise InvalidRequest(
            f"Model {model!r} is not served here; use {limits.model_id!r}.", param="model", code="model_not_found"
        )

    size_text = data.get("size", format_size(limits.default_size))
    if not isinstance(size_text, str) or size_text not in limits.served_sizes:
        served = ", ".join(format_size(s) for s in limits.sizes)
        raise InvalidRequest(f"'size' must be one of: {served}.", param="size", code="invalid_size")
    width, height = parse_size(size_text)

    n = _integer(data, "n", 1, 1, limits.max_n)
    steps = _integer(data, "steps", limits.default_steps, 1, limits.max_steps)
    seed = _integer(data, "seed", None, 0, MAX_SEED)
    assert n is not None and steps is not None
    return GenerationRequest(prompt=prompt, n=n, width=width, height=height, steps=steps, seed=seed, priority=priority)
