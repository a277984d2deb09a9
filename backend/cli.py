"""`quotagate-backend`: make the tiny model, or serve a model over HTTP.

torch, diffusers and uvicorn are imported only by the command that needs them, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backend.app import ServeSettings

__all__ = ["main"]

DEFAULT_SIZES = "64x64,128x128,256x256,512x512"
DEFAULT_SIZE = "256x256"
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quotagate-backend", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    make = commands.add_parser("make-tiny-model", help="write a tiny random-weight pipeline to DIR")
    make.add_argument("directory", metavar="DIR", type=Path)
    make.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")

    serve = commands.add_parser("serve", help="serve a diffusers model directory")
    serve.add_argument("--model", required=True, help="model directory, or 'tiny' for DATA_DIR/models/tiny")
    serve.add_argument("--model-id", help="id clients name in 'model' (default: the directory name)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8001)
    serve.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    serve.add_argument("--data-dir", type=Path, default=Path(".quotagate"))
    serve.add_argument("--sizes", default=DEFAULT_SIZES, help=f"served sizes (default {DEFAULT_SIZES})")
    serve.add_argument("--default-size", default=DEFAULT_SIZE, help=f"size when none is asked (default {DEFAULT_SIZE})")
    serve.add_argument("--max-n", type=int, default=4, help="images per request (default 4)")
    serve.add_argument("--default-steps", type=int, default=2)
    serve.add_argument("--max-steps", type=int, default=8)
    serve.add_argument("--guidance-scale", type=float, default=1.0, help="1 turns classifier-free guidance off")
    serve.add_argument("--batching", choices=("on", "off"), default="on", help="off = --max-batch-images 1")
    serve.add_argument("--max-batch-images", type=int, default=8)
    serve.add_argument("--max-wait-ms", type=float, default=10.0, help="hold a partial batch this long")
    serve.add_argument("--max-queue", type=int, default=64, help="images that may wait (default 64)")
    serve.add_argument("--max-queue-wait", type=float, default=30.0, help="refuse when the wait would exceed (s)")
    serve.add_argument("--priority-aging-s", type=float, default=1.0, help="seconds of waiting worth 1 priority")
    serve.add_argument("--threads", type=int, help="torch threads of the inference worker")
    serve.add_argument("--log-level", default="info")
    return parser


def _fail(message: str) -> int:
    print(f"quotagate-backend: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _make_tiny(args: argparse.Namespace) -> int:
    from backend.tiny_model import make_tiny_model

    directory = make_tiny_model(args.directory, seed=args.seed)
    print(f"tiny model written to {directory}")
    return 0


def _model_path(args: argparse.Namespace) -> Path:
    if args.model != "tiny":
        return Path(args.model)
    path = Path(args.data_dir) / "models" / "tiny"
    if not (path / "model_index.json").is_file():
        from backend.tiny_model import make_tiny_model

        make_tiny_model(path)
    return path


def _settings(args: argparse.Namespace, path: Path) -> ServeSettings:
    """Raises ValueError naming the bad flag value."""
    from backend.app import ServeSettings
    from backend.batcher import BatcherSettings
    from backend.validation import RequestLimits, parse_size

    off = args.batching == "off"
    limits = RequestLimits(
        model_id=args.model_id or path.resolve().name,
        sizes=tuple(parse_size(text.strip()) for text in args.sizes.split(",") if text.strip()),
        default_size=parse_size(args.default_size),
        max_n=args.max_n,
        default_steps=args.default_steps,
        max_steps=args.max_steps,
    )
    batcher = BatcherSettings(
        max_batch_images=1 if off else args.max_batch_images,
        max_wait_s=0.0 if off else args.max_wait_ms / 1000,
        max_queue_images=args.max_queue,
        max_queue_wait_s=args.max_queue_wait,
        aging_s=args.priority_aging_s,
    )
    return ServeSettings(limits=limits, batcher=batcher, torch_threads=args.threads)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from backend.app import create_app
    from backend.errors import ModelUnavailable
    from backend.pipeline import load_pipeline, pipeline_runner, resolve_device

    path = _model_path(args)
    if not (path / "model_index.json").is_file():
        return _fail(f"{path} is not a diffusers model directory (no model_index.json)")
    try:
        device = resolve_device(args.device)
        settings = _settings(args, path)
    except (ValueError, ModelUnavailable) as exc:
        return _fail(str(exc))

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failures: list[str] = []

    def stop(message: str) -> None:
        failures.append(message)
        server.should_exit = True

    guidance = args.guidance_scale
    app = create_app(
        settings,
        lambda: pipeline_runner(load_pipeline(path, device), guidance_scale=guidance),
        on_load_failure=stop,
    )
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    server.run()
    if failures:
        print(f"quotagate-backend: error: cannot start the model: {failures[0]}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "make-tiny-model":
        return _make_tiny(args)
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
