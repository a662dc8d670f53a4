"""Real encoder servers for tests: an in-process gRPC server on a free localhost port, driven by its
own event loop in a background thread, exactly as `flux2-encoder-server serve` builds it."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from flux2_encoder_server import EncoderEngine, EncoderServer, Settings


class ServerThread:
    def __init__(self, settings: Settings, engine_factory: Callable[[Settings], EncoderEngine]):
        self.server = EncoderServer(settings, engine_factory)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.target = ""
        self.http_url = ""  # "http://127.0.0.1:PORT" when the settings enable HTTP

    def run(self, coro: Any, timeout: float = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, load: bool = True) -> ServerThread:
        self._thread.start()
        port = self.run(self.server.start())
        self.target = f"127.0.0.1:{port}"
        if self.server.http_port is not None:
            self.http_url = f"http://127.0.0.1:{self.server.http_port}"
        if load:
            self.run(self.server.load())
        return self

    @property
    def core(self) -> Any:
        return self.server.core

    def stop(self, grace: float = 0.0) -> None:
        self.run(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def test_settings(model: str, **overrides: Any) -> Settings:
    base = Settings(model=model, host="127.0.0.1", port=0, device="cpu", warmup=False)
    return dataclasses.replace(base, **overrides)


test_settings.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


class InstrumentedEngine:
    """Wraps a real engine for fault tests: records every batch the model is given, can hold the
    worker at a gate, and raises inside any batch holding a prompt that contains `poison`."""

    def __init__(self, engine: EncoderEngine, poison: str = "\N{COLLISION SYMBOL}poison"):
        self.engine = engine
        self.poison = poison
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set each time a batch reaches the model
        self._lock = threading.Lock()

    @property
    def fingerprint(self) -> Any:
        return self.engine.fingerprint

    @property
    def embedding_dim(self) -> int:
        return self.engine.embedding_dim

    @property
    def prompts_seen(self) -> list[str]:
        with self._lock:
            return [p for batch in self.batches for p in batch]

    def encode(self, prompts: list[str]) -> Any:
        with self._lock:
            self.batches.append(list(prompts))
        self.entered.set()
        if not self.gate.wait(60):
            raise RuntimeError("test gate never opened")
        if any(self.poison in p for p in prompts):
            raise RuntimeError("injected failure")
        return self.engine.encode(prompts)

    launch = encode  # the server launches batches; this wrapper answers at once

    def hold(self) -> None:
        self.entered.clear()
        self.gate.clear()


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Polls `predicate` (state, not time, is what tests assert; the timeout only stops a hang)."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
