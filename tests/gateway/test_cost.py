"""What a request costs: a constant, the body's `n`, or `n` weighted by the image size."""

from __future__ import annotations

import json

import pytest

from gateway.admission.cost import request_cost
from gateway.config.quotas import parse_config
from gateway.errors import BadRequest
from tests.support.quotas import QUOTAS

WEIGHTED = QUOTAS.replace(
    "    cost: images\n", "    cost: images\n    size_weights: {256x256: 1, 512x512: 2, 1024x1024: 4}\n"
)
ROUTE = "/v1/images/generations"


def _cost(text: str, body: object) -> int:
    return request_cost(parse_config(text, source="q").routes[ROUTE], json.dumps(body).encode())


@pytest.mark.parametrize(
    "body,cost",
    [({"n": 3}, 3), ({"n": 3, "size": "256x256"}, 3), ({"n": 3, "size": "1024x1024"}, 12), ({"size": "512x512"}, 2)],
)
def test_larger_images_cost_their_weight_each(body: dict[str, object], cost: int) -> None:
    assert _cost(WEIGHTED, body) == cost


def test_without_weights_size_does_not_matter() -> None:
    assert _cost(QUOTAS, {"n": 3, "size": "1024x1024"}) == 3


@pytest.mark.parametrize("size", ["2048x2048", 512, "512X512"])
def test_a_size_the_route_does_not_weigh_is_a_400_naming_the_sizes(size: object) -> None:
    with pytest.raises(BadRequest, match="`size` must be one of 256x256, 512x512, 1024x1024") as refused:
        _cost(WEIGHTED, {"n": 1, "size": size})
    assert refused.value.param == "size"
