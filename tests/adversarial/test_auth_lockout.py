"""A valid key is never refused because of others' failures; failures slow down only bad credentials.

One address (a NAT, a load balancer) is shared by a client that keeps sending junk keys and by
clients with good keys. Against a real gateway process and real Redis.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.adversarial.gateways import served
from tests.support.keys import new_key
from tests.support.processes import Service
from tests.support.quotas import IMAGES

pytestmark = pytest.mark.slow

# Two failures a minute from one address: the third is refused, and stays refused for ~30 s.
FAILURES_PER_MINUTE = 2
ATTEMPTS = settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))


class Keys:
    """A good key of each plan, and credentials that must fail in each way the gateway can tell apart."""

    def __init__(self, redis_url: str) -> None:
        self.free = new_key(redis_url, "ann", "free")
        self.pro = new_key(redis_url, "bob", "pro")
        key_id = self.pro.split("_")[1]
        self.bad = {
            "wrong secret of a real key": f"Bearer qg_{key_id}_{'0' * 48}",
            "unknown key": "Bearer qg_0123456789abcdef_" + "1" * 48,
            "malformed": "Bearer not-a-key",
            "not bearer": f"Basic {self.pro}",
            "none": None,
        }


@pytest.fixture
def gateway(redis_url: str, tmp_path: Path) -> Iterator[tuple[Service, Keys]]:
    env = {"QUOTAGATE_AUTH_FAILURES_PER_MINUTE": str(FAILURES_PER_MINUTE)}
    with served(redis_url, tmp_path, env) as (gateway, _):
        yield gateway, Keys(redis_url)


# One attempt: (good or bad, which credential, which path).
attempts = st.lists(
    st.tuples(st.sampled_from(["good", "bad"]), st.integers(0, 4), st.sampled_from(["quota", "images"])),
    min_size=1,
    max_size=8,
)


def test_good_keys_pass_from_an_address_blocked_for_failures(gateway: tuple[Service, Keys]) -> None:
    process, keys = gateway
    tally: Counter[str] = Counter()
    with httpx.Client(base_url=process.url, timeout=30) as client:

        def attempt(authorization: str | None, path: str) -> int:
            headers = {} if authorization is None else {"Authorization": authorization}
            if path == "quota":
                return client.get("/v1/quota", headers=headers).status_code
            return client.post(IMAGES, json={"prompt": "x", "n": 1}, headers=headers).status_code

        # Junk keys until the address is blocked.
        statuses = [attempt(keys.bad["unknown key"], "quota") for _ in range(FAILURES_PER_MINUTE + 1)]
        assert statuses[-1] == 429, statuses

        @ATTEMPTS
        @given(attempts)
        def mixed(sequence: list[tuple[str, int, str]]) -> None:
            for kind, which, path in sequence:
                if kind == "good":
                    # The pro key on the image route (its quota is unlimited), the free key on /v1/quota.
                    key = keys.pro if path == "images" else (keys.free, keys.pro)[which % 2]
                    status = attempt(f"Bearer {key}", path)
                    assert status == 200, f"a good key on {path} got {status} from a blocked address"
                else:
                    name = list(keys.bad)[which]
                    status = attempt(keys.bad[name], path)
                    assert status in (401, 429), f"{name} on {path} got {status}"
                tally[f"{kind} {status}"] += 1

        mixed()
    assert tally["good 200"] > 0 and tally["bad 429"] > 0, tally
