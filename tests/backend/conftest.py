"""Backend fixtures: the real tiny diffusers pipeline, made once per session, and apps built around it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from anyio.from_thread import BlockingPortal
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from backend.app import BackendState, ServeSettings, create_app
from backend.batcher import Batcher, BatcherSettings, Runner
from backend.pipeline import load_pipeline, pipeline_runner
from backend.scheduling import Job
from backend.tiny_model import make_tiny_model
from backend.validation import GenerationRequest, RequestLimits

# Images depend on the thread count (1 and 2 threads differ by up to 1/255): fix it for every test.
torch.set_num_threads(1)

TEST_SIZES = ((64, 64), (128, 128), (256, 256))


class FakeClock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingRunner:
    """The real pipeline runner, recording each call's prompts; `gate` holds calls while cleared."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner
        self.calls: list[list[str]] = []
        self.shapes: list[tuple[tuple[int, int], int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(
        self, prompts: Sequence[str], seeds: Sequence[int], size: tuple[int, int], steps: int, pad_to: int
    ) -> list[bytes]:
        self.entered.set()
        if not self.gate.wait(timeout=60):
            raise TimeoutError("the test never opened the gate")
        self.calls.append(list(prompts))
        self.shapes.append((size, pad_to))
        return self._runner(prompts, seeds, size, steps, pad_to)

    @property
    def prompts(self) -> list[str]:
        return [prompt for call in self.calls for prompt in call]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_runner(tiny_model_dir: Path) -> Runner:
    """Loaded once; every test runs it on one worker thread at a time, as the server does."""
    return pipeline_runner(load_pipeline(tiny_model_dir, torch.device("cpu")))


@pytest.fixture
def recording(tiny_runner: Runner) -> RecordingRunner:
    return RecordingRunner(tiny_runner)


def make_limits(**overrides: object) -> RequestLimits:
    options: dict[str, object] = {"model_id": "tiny", "sizes": TEST_SIZES, "default_size": (64, 64), "max_n": 4}
    options.update(overrides)
    return RequestLimits(**options)  # type: ignore[arg-type]


def make_settings(*, limits: RequestLimits | None = None, **batcher: object) -> ServeSettings:
    options: dict[str, object] = {"max_batch_images": 4, "max_wait_s": 0.0}
    options.update(batcher)
    return ServeSettings(
        limits=limits or make_limits(),
        batcher=BatcherSettings(**options),  # type: ignore[arg-type]
        torch_threads=1,
    )


AppFactory = Callable[..., TestClient]


@pytest.fixture
def serve(recording: RecordingRunner) -> Iterator[AppFactory]:
    """serve(settings=..., clock=...) -> a started TestClient whose model is loaded and warm."""
    clients: list[TestClient] = []

    def start(
        settings: ServeSettings | None = None,
        *,
        clock: Callable[[], float] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> TestClient:
        kwargs = {"clock": clock} if clock is not None else {}
        app = create_app(settings or make_settings(), lambda: recording, registry=registry, **kwargs)
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        state: BackendState = app.state.backend
        portal(client).call(state.settled.wait)
        assert state.ready.is_set(), state.load_error
        recording.calls.clear()
        recording.shapes.clear()
        recording.entered.clear()
        return client

    yield start
    for client in reversed(clients):
        client.__exit__(None, None, None)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    """The single inference thread, as the app builds it."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="inference", initializer=torch.set_num_threads, initargs=(1,))
    yield pool
    pool.shutdown(wait=True)


def request(
    prompt: str, *, n: int = 1, size: int = 64, priority: int = 0, seed: int | None = None
) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, n=n, width=size, height=size, steps=1, seed=seed, priority=priority)


def portal(client: TestClient) -> BlockingPortal:
    """The event loop of a started TestClient, to run code beside the app."""
    assert client.portal is not None, "start the client first"
    return client.portal


def backend_state(client: TestClient) -> BackendState:
    state: BackendState = client.app.state.backend  # type: ignore[attr-defined]
    return state


def batcher_of(client: TestClient) -> Batcher:
    """The started app's batcher."""
    batcher = backend_state(client).batcher
    assert batcher is not None
    return batcher


def hold_worker(client: TestClient, recording: RecordingRunner) -> Job:
    """Close the gate and give the worker one job: it stays busy until the test opens the gate."""
    recording.gate.clear()
    blocker = portal(client).call(batcher_of(client).submit, request("blocker"))
    assert recording.entered.wait(timeout=60)
    return blocker
