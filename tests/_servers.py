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

    def stop(self, grace: float = 0.0) -> None:
        self.run(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def test_settings(model: str, **overrides: Any) -> Settings:
    base = Settings(model=model, host="127.0.0.1", port=0, device="cpu", warmup=False)
    return dataclasses.replace(base, **overrides)


test_settings.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
