"""The `quotagate` command: run the stack or the gateway, manage keys, plans and accounts, check config."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from gateway.admission.brownout import applied_in
from gateway.admission.identity import KeyStore
from gateway.config.quotas import Config, Plan, load_config
from gateway.config.settings import Settings
from gateway.errors import ConfigError
from gateway.observe.metrics import shared_across_workers
from gateway.ops.accounts import Accounts, UnknownAccount
from gateway.ops.datadir import DataDir
from limits import Engine, LimitsError, connect


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `quotagate` console script."""
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError, UnknownAccount) as exc:
        print(f"quotagate: {exc}", file=sys.stderr)
        return 1
    except (RedisError, LimitsError) as exc:
        print(f"quotagate: redis unavailable: {exc}", file=sys.stderr)
        return 1


def _up(args: argparse.Namespace) -> int:
    from gateway.ops.stack import up

    data = DataDir.resolve(args.data_dir)
    return up(
        Path(args.config), port=args.port, data=data, host=args.host, model=args.model, admin_port=args.admin_port
    )


def _serve(args: argparse.Namespace) -> int:
    from gateway.ops.supervisor import serve

    overrides = {
        "QUOTAGATE_CONFIG": args.config,
        "QUOTAGATE_REDIS_URL": args.redis_url,
        "QUOTAGATE_UPSTREAMS": " ".join(args.upstream) if args.upstream else None,
    }
    os.environ.update({k: v for k, v in overrides.items() if v})
    settings = Settings.from_env()  # refuse a bad environment or config before any worker starts
    load_config(settings.config_path)
    with shared_across_workers(args.workers), _admin_api(args, settings):
        serve(host=args.host, port=args.port, workers=args.workers)
    return 0


@contextmanager
def _admin_api(args: argparse.Namespace, settings: Settings) -> Iterator[None]:
    """The admin API on its own port, for as long as the gateway serves; nothing without --admin-port."""
    if args.admin_port is None:
        yield
        return
    from gateway.ops.admin import TOKEN_ENV, AdminServer, check_token

    token = check_token(os.environ.get(TOKEN_ENV))
    server = AdminServer(settings, token, host=args.admin_host, port=args.admin_port)
    server.start()
    try:
        yield
    finally:
        server.stop()


def _keys_create(args: argparse.Namespace) -> int:
    redis_url, secret, config = _target(args)
    if config is not None and args.plan not in config.plans:
        raise ValueError(f"plan {args.plan!r} is not in {config.source}; plans: {', '.join(config.plans)}")
    key = asyncio.run(_with_store(redis_url, secret, lambda store: store.create_key(args.account, args.plan)))
    if args.json:
        print(json.dumps({"key": key, "account": args.account, "plan": args.plan}))
    else:
        print(f"{key}\n(account {args.account}, plan {args.plan}; shown once: it is stored only as a hash)")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    redis_url, secret, _ = _target(args)
    infos = asyncio.run(_with_store(redis_url, secret, lambda store: store.list_keys(args.account)))
    if args.json:
        print(json.dumps([{"key_id": i.key_id, "account": i.account, "created": i.created} for i in infos]))
    else:
        for info in infos:
            created = datetime.fromtimestamp(info.created, UTC).isoformat(timespec="seconds")
            print(f"{info.key_id}  created {created}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    redis_url, secret, _ = _target(args)
    account = asyncio.run(_with_store(redis_url, secret, lambda store: store.revoke(args.key_id)))
    print(
        json.dumps({"revoked": args.key_id, "account": account}) if args.json else f"revoked {args.key_id} ({account})"
    )
    return 0


def _plan_set(args: argparse.Namespace) -> int:
    redis_url, secret, config = _target(args)
    if config is not None and args.plan not in config.plans:
        raise ValueError(f"plan {args.plan!r} is not in {config.source}; plans: {', '.join(config.plans)}")
    asyncio.run(_with_store(redis_url, secret, lambda store: store.set_plan(args.account, args.plan)))
    print(json.dumps({"account": args.account, "plan": args.plan}) if args.json else f"{args.account} → {args.plan}")
    return 0


def _usage(args: argparse.Namespace) -> int:
    return _account_command(args, lambda accounts: accounts.usage(args.account))


def _grant(args: argparse.Namespace) -> int:
    if args.images < 1:
        raise ValueError(f"grant at least 1 image, not {args.images}")
    return _account_command(args, lambda accounts: accounts.grant(args.account, args.images))


def _reset(args: argparse.Namespace) -> int:
    return _account_command(args, lambda accounts: accounts.reset(args.account))


def _account_command(args: argparse.Namespace, action: Callable[[Accounts], Awaitable[dict[str, Any]]]) -> int:
    redis_url, secret, config = _target(args)
    if config is None:
        raise ValueError("no quota file to read plans from: pass --config or set QUOTAGATE_CONFIG")

    async def run() -> dict[str, Any]:
        redis = connect(redis_url, timeout=5.0)
        try:
            async with Engine(redis) as engine:
                keys = KeyStore(redis, secret)
                return await action(Accounts(engine, keys, lambda: config, brownouts=lambda: applied_in(redis)))
        finally:
            await redis.aclose()

    result = asyncio.run(run())
    print(json.dumps(result) if args.json else _describe(result))
    return 0


def _describe(usage: dict[str, Any]) -> str:
    """An account's usage for a person: one line per limit."""
    lines = [f"{usage['account']} (plan {usage['plan']})"]
    if "granted_today" in usage:
        lines[0] += f", {usage['granted_today']} images granted today"
    if "temporary" in usage:
        lines.append(f"  {usage['temporary']}")
    for limit in usage["limits"]:
        if limit["kind"] == "rate":
            state = f"{limit['remaining']} of {limit['burst']} left, full in {limit['full_in_s']:.0f} s"
        elif limit["limit"] is None:
            state = f"unlimited, {limit['used']} used today, day ends in {limit['resets_in_s']:.0f} s"
            state += f" ({limit['timezone']})"
        else:
            state = f"{limit['used']} used, {limit['remaining']} left of {limit['limit']}, "
            state += f"resets in {limit['resets_in_s']:.0f} s"
            state += f" ({limit['timezone']})"
        lines.append(f"  {limit['name']:<16} {limit['kind']:<6} {state}")
    return "\n".join(lines)


def _config_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        if not args.json:
            raise
        print(json.dumps({"file": args.file, "ok": False, "error": str(exc)}))
        return 1
    if args.json:
        summary = {"file": config.source, "ok": True, "version": config.version}
        listed = {"plans": list(config.plans), "routes": list(config.routes), "brownout": list(config.brownouts)}
        print(json.dumps(summary | listed))
        return 0
    print(f"{config.source}: ok ({len(config.plans)} plans, {len(config.routes)} routes, version {config.version})")
    now = time.time()
    for name, override in config.overrides.items():
        state = "in force" if now < override.until.timestamp() else "expired: no longer applies"
        print(
            f"  override {name}: {_limits_of(override.plan)}"
            f" until {override.until.isoformat()} ({state}): {override.reason}"
        )
    for name, rule in config.brownouts.items():
        first = config.overrides.get(rule.plan.name)
        masked = first is not None and now < first.until.timestamp()
        print(
            f"  brownout {name}: while the {rule.line} line waits over {rule.waits_over_s:g} s for {rule.for_s:g} s,"
            f" plan {rule.plan.name} {_limits_of(rule.plan)}: {rule.reason}"
            + (f" (the override of plan {rule.plan.name} in force comes first)" if masked else "")
        )
    return 0


def _limits_of(plan: Plan) -> str:
    """The daily quota and rate of `plan`, as `config check` lists them."""
    (bucket,), (quota,) = plan.limits.buckets, plan.limits.quotas
    daily = "unlimited" if quota.limit is None else quota.limit
    return f"daily_images {daily}, rate {bucket.rate}/{bucket.period}s burst {bucket.burst}"


def _target(args: argparse.Namespace) -> tuple[str, bytes, Config | None]:
    """Redis URL, key secret and config for an admin command: flags, then environment, then the data dir."""
    data = DataDir.resolve(args.data_dir)
    stack = {} if (args.redis_url or os.environ.get("QUOTAGATE_REDIS_URL")) else data.read_stack()
    redis_url = args.redis_url or os.environ.get("QUOTAGATE_REDIS_URL") or stack["redis_url"]
    secret = os.environ.get("QUOTAGATE_KEY_SECRET", "").encode() or data.key_secret()
    config_path = args.config or os.environ.get("QUOTAGATE_CONFIG") or stack.get("config")
    return redis_url, secret, load_config(config_path) if config_path else None


async def _with_store(redis_url: str, secret: bytes, action):  # type: ignore[no-untyped-def]
    redis = connect(redis_url, timeout=5.0)
    try:
        return await action(KeyStore(redis, secret))
    finally:
        await redis.aclose()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quotagate", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run redis-server, the backend and the gateway in the foreground")
    up.add_argument("--config", default="config/quotas.yaml")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--data-dir", help="state of this stack (default: $QUOTAGATE_DATA_DIR or ./.quotagate)")
    up.add_argument("--model", default="tiny", help="a local diffusers directory, or `tiny` (made on first run)")
    up.add_argument("--admin-port", type=int, help="serve the admin API here (token in DATA_DIR/admin-token)")
    up.set_defaults(run=_up)

    serve = commands.add_parser("serve", help="run the gateway alone (settings from QUOTAGATE_* variables)")
    serve.add_argument("--config", help="quota YAML (QUOTAGATE_CONFIG)")
    serve.add_argument("--redis-url", help="redis://, rediss:// or unix:// URL (QUOTAGATE_REDIS_URL)")
    serve.add_argument("--upstream", action="append", metavar="NAME=URL[,URL]", help="an upstream pool; repeatable")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--admin-port", type=int, help="serve the admin API on this port (needs QUOTAGATE_ADMIN_TOKEN)")
    serve.add_argument("--admin-host", default="127.0.0.1", help="address of the admin API (default 127.0.0.1)")
    serve.set_defaults(run=_serve)

    def admin(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--data-dir", help="the data directory of a running `quotagate up`")
        sub.add_argument("--redis-url", help="Redis to write to (default: the running stack's)")
        sub.add_argument("--config", help="quota YAML to check the plan against")
        sub.add_argument("--json", action="store_true", help="print one JSON object")

    keys = commands.add_parser("keys", help="API keys").add_subparsers(required=True, metavar="ACTION")
    create = keys.add_parser("create", help="create a key for an account, and set the account's plan")
    create.add_argument("account")
    create.add_argument("--plan", required=True)
    admin(create)
    create.set_defaults(run=_keys_create)

    listing = keys.add_parser("list", help="an account's keys (ids and creation times, never secrets)")
    listing.add_argument("account")
    admin(listing)
    listing.set_defaults(run=_keys_list)

    revoke = keys.add_parser("revoke", help="revoke a key; every gateway replica refuses it at once")
    revoke.add_argument("key_id", help="the key id `keys list` shows (or the whole key)")
    admin(revoke)
    revoke.set_defaults(run=_keys_revoke)

    plan = commands.add_parser("plan", help="accounts' plans").add_subparsers(required=True, metavar="ACTION")
    plan_set = plan.add_parser("set", help="move an account to a plan")
    plan_set.add_argument("account")
    plan_set.add_argument("plan")
    admin(plan_set)
    plan_set.set_defaults(run=_plan_set)

    usage = commands.add_parser("usage", help="where an account's limits stand (charges nothing)")
    usage.add_argument("account")
    admin(usage)
    usage.set_defaults(run=_usage)

    grant = commands.add_parser("grant", help="give an account N more images today")
    grant.add_argument("account")
    grant.add_argument("images", type=int, metavar="N")
    admin(grant)
    grant.set_defaults(run=_grant)

    reset = commands.add_parser("reset", help="forget an account's usage: buckets full, today's quota unused")
    reset.add_argument("account")
    admin(reset)
    reset.set_defaults(run=_reset)

    config = commands.add_parser("config", help="the quota YAML").add_subparsers(required=True, metavar="ACTION")
    check = config.add_parser("check", help="check a quota file; exit 1 with file:line: field: problem")
    check.add_argument("file")
    check.add_argument("--json", action="store_true", help="print one JSON object, also when the file is refused")
    check.set_defaults(run=_config_check)
    return parser


if __name__ == "__main__":
    sys.exit(main())
