"""The `quotagate` command: run the stack or the gateway, manage keys and plans, check config."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from gateway.config import Config, load_config
from gateway.datadir import DataDir
from gateway.errors import ConfigError
from gateway.identity import KeyStore
from gateway.metrics import shared_across_workers
from gateway.settings import Settings
from limits import connect


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `quotagate` console script."""
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"quotagate: {exc}", file=sys.stderr)
        return 1


def _up(args: argparse.Namespace) -> int:
    from gateway.stack import up

    return up(Path(args.config), port=args.port, data=DataDir.resolve(args.data_dir), host=args.host, model=args.model)


def _serve(args: argparse.Namespace) -> int:
    from gateway.supervisor import serve

    overrides = {
        "QUOTAGATE_CONFIG": args.config,
        "QUOTAGATE_REDIS_URL": args.redis_url,
        "QUOTAGATE_UPSTREAMS": " ".join(args.upstream) if args.upstream else None,
    }
    os.environ.update({k: v for k, v in overrides.items() if v})
    settings = Settings.from_env()  # refuse a bad environment or config before any worker starts
    load_config(settings.config_path)
    with shared_across_workers(args.workers):
        serve(host=args.host, port=args.port, workers=args.workers)
    return 0


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


def _config_check(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    print(f"{config.source}: ok ({len(config.plans)} plans, {len(config.routes)} routes, version {config.version})")
    now = time.time()
    for name, override in config.overrides.items():
        state = "in force" if now < override.until.timestamp() else "expired: no longer applies"
        (bucket,), (quota,) = override.plan.limits.buckets, override.plan.limits.quotas
        daily = "unlimited" if quota.limit is None else quota.limit
        print(
            f"  override {name}: daily_images {daily}, rate {bucket.rate}/{bucket.period}s burst {bucket.burst}"
            f" until {override.until.isoformat()} ({state}): {override.reason}"
        )
    return 0


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
    up.set_defaults(run=_up)

    serve = commands.add_parser("serve", help="run the gateway alone (settings from QUOTAGATE_* variables)")
    serve.add_argument("--config", help="quota YAML (QUOTAGATE_CONFIG)")
    serve.add_argument("--redis-url", help="redis://, rediss:// or unix:// URL (QUOTAGATE_REDIS_URL)")
    serve.add_argument("--upstream", action="append", metavar="NAME=URL[,URL]", help="an upstream pool; repeatable")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
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

    config = commands.add_parser("config", help="the quota YAML").add_subparsers(required=True, metavar="ACTION")
    check = config.add_parser("check", help="check a quota file; exit 1 with file:line: field: problem")
    check.add_argument("file")
    check.set_defaults(run=_config_check)
    return parser


if __name__ == "__main__":
    sys.exit(main())
