"""Doors that must stay shut: a second server on a bound port, routes without a token, request ids
that would flood or forge log lines. No model: `FakeEngine` with fixed rows."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from flux2_encoder_server.testing import FakeEngine, ServerThread, local_settings


@pytest.fixture(scope="module")
def open_server():
    with ServerThread(local_settings(http_port=0, cache_bytes=0), lambda _s: FakeEngine()) as thread:
        yield thread


def test_a_second_server_on_a_bound_port_exits_non_zero_with_one_line(open_server):
    port = open_server.target.rsplit(":", 1)[1]
    argv = [sys.executable, "-m", "flux2_encoder_server.cli", "serve", "--model", "unused", "--device", "cpu"]
    argv += ["--host", "127.0.0.1", "--port", port, "--no-warmup", "--log-format", "text"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
    assert "listening on" not in done.stdout
