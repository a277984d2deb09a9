"""Brownouts against a real Redis: when a rule applies and lifts, that every replica agrees, and what it changes.

Time is passed in (`now`), never slept through; the waits are what the test says each replica reads.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.admission.brownout import Brownouts, RuleState, applied_in
from gateway.admission.decision import admit
from gateway.admission.identity import Identity
from gateway.admission.storefailure import CircuitBreaker, LocalBudget, StoreGuard
from gateway.config.quotas import Brownout, Config, parse_config
from gateway.errors import QuotaExceeded
from gateway.observe.logs import JsonFormatter
from gateway.observe.metrics import GatewayMetrics
from gateway.ops.accounts import Accounts
from gateway.ops.embedded_redis import RedisServer
from limits import RedisClient, connect
from tests.conftest import MakeEngine
from tests.limits.cluster import LocalCluster
from tests.support.keys import key_store
from tests.support.quotas import QUOTAS

from .brownout_model import RuleModel

pytestmark = pytest.mark.anyio

T0 = 1_800_000_000.0
_keys = itertools.count()


def rule_text(name: str = "free-one-a-day", *, line: str = "free", over: float = 120, for_s: float = 300) -> str:
    target = "{plan: free, daily_images: 1}" if name.startswith("free") else "{plan: pro, daily_images: 100}"
    return (
        f"  - name: {name}\n    line: {line}\n    waits_over: {over}\n    for: {for_s}\n"
        f"    apply: {target}\n    reason: GPUs saturated\n"
    )


def config_with(*rules: str) -> Config:
    return parse_config(QUOTAS + "brownout:\n" + "".join(rules), source="q.yaml")


class Replica:
    """One gateway process's Brownouts, reading the waits the test sets."""

    def __init__(
        self,
        redis: RedisClient,
        config: Config,
        *,
        key: str = "qg:brownout",
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.config = config
        self.waits: dict[str, float | None] = {}
        self.brownouts = Brownouts(redis, lambda: self.config.brownouts, self._wait_of, metrics=metrics, key=key)

    async def _wait_of(self, line: str) -> float | None:
        return self.waits.get(line)

    async def states(self) -> dict[str, RuleState]:
        return await self.brownouts.states()

    async def reads(self, now: float, **waits: float | None) -> frozenset[str]:
        """Tick at `now` having read these waits (every other line unknown)."""
        self.waits = dict(waits)
        return await self.brownouts.tick(now)


@pytest.fixture
async def other_client(redis_url: str) -> AsyncIterator[Redis]:
    """A second connection, as a second replica has."""
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


APPLIED = frozenset({"free-one-a-day"})
NONE: frozenset[str] = frozenset()


async def test_a_rule_applies_only_once_the_wait_has_stayed_over_for_its_for(redis_client: Redis) -> None:
    replica = Replica(redis_client, config_with(rule_text()))
    assert await replica.reads(T0, free=130) == NONE
    assert await replica.reads(T0 + 299, free=500) == NONE
    assert await replica.reads(T0 + 300, free=121) == APPLIED
    assert replica.brownouts.applied() == APPLIED


async def test_a_dip_to_the_threshold_or_under_starts_the_count_again(redis_client: Redis) -> None:
    replica = Replica(redis_client, config_with(rule_text()))
    assert await replica.reads(T0, free=130) == NONE
    assert await replica.reads(T0 + 200, free=120) == NONE  # at the threshold is not over it
    assert await replica.reads(T0 + 250, free=130) == NONE
    assert await replica.reads(T0 + 500, free=130) == NONE  # 250 s over since the dip, not 500
    assert await replica.reads(T0 + 550, free=130) == APPLIED


async def test_an_applied_rule_lifts_only_once_the_wait_has_stayed_under_for_its_for(redis_client: Redis) -> None:
    replica = Replica(redis_client, config_with(rule_text()))
    await replica.reads(T0, free=130)
    assert await replica.reads(T0 + 300, free=130) == APPLIED
    assert await replica.reads(T0 + 400, free=10) == APPLIED
    assert await replica.reads(T0 + 600, free=121) == APPLIED  # a spike: the count starts again
    assert await replica.reads(T0 + 650, free=120) == APPLIED
    assert await replica.reads(T0 + 949, free=0) == APPLIED
    assert await replica.reads(T0 + 950, free=0) == NONE
    assert await replica.states() == {}  # idle again: nothing left in Redis


async def test_an_unknown_wait_neither_starts_nor_breaks_a_run(redis_client: Redis) -> None:
    replica = Replica(redis_client, config_with(rule_text()))
    assert await replica.reads(T0) == NONE  # no wait read for the line at all
    assert await replica.reads(T0 + 10, free=None) == NONE
    assert await replica.states() == {}
    assert await replica.reads(T0 + 20, free=130) == NONE
    assert await replica.reads(T0 + 200, free=None) == NONE
    assert await replica.reads(T0 + 320, free=130) == APPLIED


async def test_with_for_zero_the_first_read_over_applies_and_the_first_under_lifts(redis_client: Redis) -> None:
    replica = Replica(redis_client, config_with(rule_text(for_s=0)))
    assert await replica.reads(T0, free=120) == NONE
    assert await replica.reads(T0, free=120.5) == APPLIED
    assert await replica.reads(T0, free=120) == NONE


async def test_a_rule_watching_another_line_counts_afresh(redis_client: Redis) -> None:
    replica = Replica(redis_client, config_with(rule_text()))
    await replica.reads(T0, free=130)
    replica.config = config_with(rule_text(line="pro"))  # a reload: the same rule now watches the pro line
    assert await replica.reads(T0 + 300, pro=130) == NONE  # the free line's 300 s do not count for pro
    assert await replica.reads(T0 + 600, pro=130) == APPLIED


async def test_two_replicas_share_one_count_and_agree(redis_client: Redis, other_client: Redis) -> None:
    config = config_with(rule_text())
    one, two = Replica(redis_client, config), Replica(other_client, config)
    assert await one.reads(T0, free=130) == NONE
    assert await two.reads(T0 + 150, free=140) == NONE
    assert await two.reads(T0 + 300, free=150) == APPLIED  # one's first read started the run two completes
    assert one.brownouts.applied() == NONE  # one has not ticked since: its copy is a tick old
    assert await one.reads(T0 + 301) == APPLIED
    assert await one.reads(T0 + 400, free=10) == APPLIED
    assert await two.reads(T0 + 500, free=200) == APPLIED  # two's read over breaks one's run under
    assert await one.reads(T0 + 700, free=10) == APPLIED
    assert await two.reads(T0 + 999, free=10) == APPLIED
    assert await one.reads(T0 + 1000, free=10) == NONE  # 300 s under since one's read at 700
    assert await two.reads(T0 + 1001) == NONE


async def test_a_rule_reloaded_away_while_applied_lifts_itself(
    redis_client: Redis, other_client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    config = config_with(rule_text(), rule_text("pro-later", line="pro"))
    one = Replica(redis_client, config, metrics=GatewayMetrics(registry))
    two = Replica(other_client, config)
    await one.reads(T0, free=130, pro=130)
    assert await one.reads(T0 + 300, free=130) == APPLIED  # pro-later is still counting
    assert set(await one.states()) == {"free-one-a-day", "pro-later"}
    one.config = two.config = config_with(rule_text("pro-later", line="pro"))  # both rules' file loses free's
    with caplog.at_level(logging.INFO, logger="quotagate.brownout"):
        assert await one.reads(T0 + 301) == NONE  # no wait read at all: the rule left, so it lifts at once
    assert "brownout free-one-a-day lifted: its rule is no longer in the quota file" in caplog.text
    assert registry.get_sample_value("quotagate_brownout_active", {"rule": "free-one-a-day"}) == 0
    assert set(await one.states()) == {"pro-later"}  # the counting rule that stays keeps its count
    assert await two.reads(T0 + 600, pro=130) == frozenset({"pro-later"})


async def test_without_now_the_count_runs_on_redis_time(redis_client: Redis) -> None:
    replica = Replica(redis_client, config_with(rule_text()))
    before = await redis_client.time()
    replica.waits = {"free": 130.0}
    await replica.brownouts.tick()
    after = await redis_client.time()
    (state,) = (await replica.brownouts.states()).values()
    assert state.since is not None
    assert before[0] + before[1] / 1e6 <= state.since <= after[0] + after[1] / 1e6


async def test_each_change_is_logged_once_by_the_replica_that_made_it(
    redis_client: Redis, other_client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_with(rule_text())
    one, two = Replica(redis_client, config), Replica(other_client, config)
    with caplog.at_level(logging.INFO, logger="quotagate.brownout"):
        await one.reads(T0, free=130)
        await two.reads(T0 + 300, free=150)
        await one.reads(T0 + 301, free=150)
        await two.reads(T0 + 302)
        records = [record for record in caplog.records if record.name == "quotagate.brownout"]
        assert len(records) == 1 and records[0].levelno == logging.WARNING
        line = json.loads(JsonFormatter().format(records[0]))
        assert line["message"] == (
            "brownout free-one-a-day applied: the free line waited over 120 s for 300 s; "
            "the free plan has temporary limits: GPUs saturated"
        )
        assert {key: line[key] for key in ("logger", "rule", "state", "line", "wait_s", "plan", "reason")} == {
            "logger": "quotagate.brownout",
            "rule": "free-one-a-day",
            "state": "applied",
            "line": "free",
            "wait_s": 150,
            "plan": "free",
            "reason": "GPUs saturated",
        }
        caplog.clear()
        await one.reads(T0 + 400, free=0)
        await one.reads(T0 + 700, free=0)
        (lifted,) = [record for record in caplog.records if record.name == "quotagate.brownout"]
        assert lifted.levelno == logging.INFO and json.loads(JsonFormatter().format(lifted))["state"] == "lifted"


async def test_the_gauge_is_1_while_a_rule_applies_and_0_otherwise(redis_client: Redis) -> None:
    registry = CollectorRegistry()
    replica = Replica(redis_client, config_with(rule_text(for_s=0)), metrics=GatewayMetrics(registry))

    def active() -> float | None:
        return registry.get_sample_value("quotagate_brownout_active", {"rule": "free-one-a-day"})

    assert active() == 0  # every rule exists at 0 before the first tick
    await replica.reads(T0, free=130)
    assert active() == 1
    await replica.reads(T0 + 1, free=10)
    assert active() == 0


async def test_while_redis_is_unreachable_applied_rules_stay_applied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    client = connect(server.url)
    registry = CollectorRegistry()
    try:
        replica = Replica(client, config_with(rule_text(for_s=0)), metrics=GatewayMetrics(registry))
        assert await replica.reads(T0, free=130) == APPLIED
        server.kill()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="quotagate.brownout"):
            assert await replica.reads(T0 + 1, free=0) == APPLIED
            assert await replica.reads(T0 + 2, free=0) == APPLIED
        assert replica.brownouts.applied() == APPLIED
        assert registry.get_sample_value("quotagate_redis_errors_total", {"operation": "brownout"}) == 2
        assert registry.get_sample_value("quotagate_brownout_active", {"rule": "free-one-a-day"}) == 1
        warnings = [r for r in caplog.records if r.name == "quotagate.brownout" and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "Redis cannot be reached" in warnings[0].getMessage()  # once per outage
        server.start()  # the same data directory: its append-only file kept the state
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="quotagate.brownout"):
            assert await replica.reads(T0 + 3, free=0) == NONE
        assert "brownout state reachable again" in caplog.text
    finally:
        await client.aclose()
        server.stop()


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real three-master Redis Cluster (a cluster refuses some commands a single Redis takes)."""
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    yield cluster.url
    cluster.stop()


@pytest.mark.slow
async def test_two_replicas_agree_on_a_redis_cluster_too(cluster_url: str) -> None:
    one, two = connect(cluster_url), connect(cluster_url)
    try:
        config = config_with(rule_text())
        first, second = Replica(one, config), Replica(two, config)
        await first.brownouts.tick()  # on the cluster's clock: nothing read, nothing counted
        assert await first.reads(T0, free=130) == NONE
        assert await second.reads(T0 + 300, free=130) == APPLIED
        assert await first.reads(T0 + 301) == APPLIED
        first.waits = {"free": 0.0}
        assert await first.brownouts.tick() == APPLIED  # the cluster's clock: long past T0, a run under starts
        assert (await second.states())["free-one-a-day"].since is not None
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_wait_that_cannot_be_read_is_unknown(redis_client: Redis) -> None:
    async def unreadable(line: str) -> float | None:
        raise RedisConnectionError("the line's store is down")

    registry = CollectorRegistry()
    config = config_with(rule_text(for_s=0))
    brownouts = Brownouts(redis_client, lambda: config.brownouts, unreadable, metrics=GatewayMetrics(registry))
    assert await brownouts.tick(T0) == NONE
    assert registry.get_sample_value("quotagate_redis_errors_total", {"operation": "brownout"}) == 1


# The rule really changes what the engine decides.


async def test_while_applied_the_free_plan_is_refused_after_one_image(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    config = config_with(rule_text(for_s=0))
    replica = Replica(redis_client, config)
    breaker = CircuitBreaker()
    store = StoreGuard(make_engine(redis_client), GatewayMetrics(CollectorRegistry()), breaker, LocalBudget())
    ann = Identity("ann", "free", None)

    async def request() -> QuotaExceeded | None:
        """One image for ann under the plan in force now; the refusal, if refused."""
        plan = config.plan_at("free", T0, replica.brownouts.applied())
        assert plan is not None
        try:
            await admit(store, ann, plan, 1)
        except QuotaExceeded as refused:
            return refused
        return None

    assert await replica.reads(T0, free=130) == APPLIED
    assert await request() is None
    refused = await request()
    assert refused is not None and refused.status == 429
    assert refused.message.endswith("Temporary limit (brownout free-one-a-day): GPUs saturated")
    assert await replica.reads(T0 + 1, free=0) == NONE  # lifted: the plan's own 3 a day, the one used counts
    assert [await request(), await request()] == [None, None]
    refused = await request()
    assert refused is not None and "brownout" not in refused.message


async def test_usage_shows_the_limits_in_force_while_a_rule_applies(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    config = config_with(rule_text(for_s=0))
    keys = key_store(redis_client)
    await keys.create_key("ann", "free")
    accounts = Accounts(make_engine(redis_client), keys, lambda: config, brownouts=lambda: applied_in(redis_client))
    replica = Replica(redis_client, config)

    async def daily() -> tuple[int | None, str | None]:
        usage = await accounts.usage("ann")
        (quota,) = [limit for limit in usage["limits"] if limit["kind"] == "daily"]
        return quota["limit"], usage.get("temporary")

    assert await daily() == (3, None)
    await replica.reads(T0, free=130)
    assert await daily() == (1, "Temporary limit (brownout free-one-a-day): GPUs saturated")
    await replica.reads(T0, free=0)
    assert await daily() == (3, None)


# Every replica agrees with one shared state machine, whatever the waits and the order of their ticks.

waits = st.none() | st.sampled_from([0.0, 29.9, 30.0, 30.1, 119.9, 120.0, 120.1, 500.0]) | st.floats(0, 400)
steps = st.lists(
    st.tuples(
        st.sampled_from(["one", "two", "both"]),  # who ticks: one replica, or both at once
        st.integers(0, 200),  # seconds since the step before
        st.tuples(waits, waits),  # what the first to tick reads on the free and the pro line
        st.tuples(waits, waits),  # what the other reads, when both tick
    ),
    min_size=1,
    max_size=30,
)


def _expected(models: Mapping[str, RuleModel]) -> frozenset[str]:
    return frozenset(name for name, model in models.items() if model.applied)


def _same(states: Mapping[str, RuleState], models: Mapping[str, RuleModel]) -> bool:
    return all(
        (states.get(name, RuleState()).applied, states.get(name, RuleState()).since) == (model.applied, model.since)
        for name, model in models.items()
    )


Read = tuple[float | None, float | None]  # the waits of the free and the pro line
Script = list[tuple[str, int, Read, Read]]


def _read(models: dict[str, RuleModel], rules: Mapping[str, Brownout], read: Read, now: float) -> dict[str, RuleModel]:
    """`models` after one replica read (free, pro) at `now`."""
    out = {name: model.copy() for name, model in models.items()}
    by_line = dict(zip(("free", "pro"), read, strict=True))
    for name, model in out.items():
        model.read(by_line[rules[name].line], now)
    return out


async def _agree(redis_url: str, fors: tuple[int, int], script: Script) -> None:
    config = config_with(rule_text(for_s=fors[0]), rule_text("pro-slower", line="pro", over=30, for_s=fors[1]))
    rules = config.brownouts
    key = f"qg:brownout:agree-{next(_keys)}"
    clients = [Redis.from_url(redis_url), Redis.from_url(redis_url)]
    try:
        replicas = {"one": Replica(clients[0], config, key=key), "two": Replica(clients[1], config, key=key)}
        models = {name: RuleModel(rule.waits_over_s, rule.for_s) for name, rule in rules.items()}
        now = T0
        for who, step, first, second in script:
            now += step
            if who != "both":
                got = await replicas[who].reads(now, free=first[0], pro=first[1])
                models = _read(models, rules, first, now)
                assert got == _expected(models)
            else:
                await asyncio.gather(
                    replicas["one"].reads(now, free=first[0], pro=first[1]),
                    replicas["two"].reads(now, free=second[0], pro=second[1]),
                )
                # Atomic ticks: the state is what one order or the other makes, never a mix of both.
                orders = [
                    _read(_read(models, rules, first, now), rules, second, now),
                    _read(_read(models, rules, second, now), rules, first, now),
                ]
                states = await replicas["one"].brownouts.states()
                matching = [order for order in orders if _same(states, order)]
                assert matching, (states, orders)
                models = matching[0]
            assert _same(await replicas["one"].brownouts.states(), models)
            # Each replica, ticking with nothing read, sees the same rules applied.
            assert await replicas["one"].reads(now) == await replicas["two"].reads(now) == _expected(models)
    finally:
        for client in clients:
            await client.aclose()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fors=st.tuples(st.sampled_from([0, 60, 300]), st.sampled_from([0, 60, 300])), script=steps)
def test_every_replica_agrees_with_the_reference_model(redis_url: str, fors: tuple[int, int], script: Script) -> None:
    asyncio.run(_agree(redis_url, fors, script))
