"""The server's seams: the core imports no transport, a missing `server` extra is one line, and each
front-end maps every service error to a status in its own table."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
from flux2_encoder_server import errors
from flux2_encoder_server.grpc_service import GRPC_STATUS
from flux2_encoder_server.http_app import HTTP_STATUS

ROOT = Path(__file__).resolve().parents[1]


def run_with_blocked_imports(blocked: set[str], code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter in which importing any of `blocked` (or their submodules) raises
    ImportError, as it does where they are not installed."""
    prelude = textwrap.dedent(
        f"""
        import sys

        class _Blocked:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in {sorted(blocked)!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
                return None

        sys.meta_path.insert(0, _Blocked())
        """
    )
    source_dirs = [str(ROOT / sub) for sub in ("proto", "encoder_server", "client")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*source_dirs, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )


def test_core_batcher_engine_and_errors_work_without_grpc():
    done = run_with_blocked_imports(
        {"grpc", "grpc_status", "grpc_health", "grpc_reflection", "starlette", "uvicorn"},
        """
        import asyncio

        import torch
        from flux2_encoder_server import batcher, core, engine, errors, fingerprint
        from flux2_encoder_server.testing import FakeEngine, local_settings

        assert not any(m.partition(".")[0] in ("grpc", "starlette", "uvicorn") for m in sys.modules)

        async def scenario(encoder_core):
            async with encoder_core.request("test") as req:
                result = await req.encode(["a fox", "a cat"])
            try:
                async with encoder_core.request("test") as req:
                    await req.encode([])
            except errors.InvalidArgument as exc:
                refused = exc
            return result, refused

        fake = FakeEngine()
        encoder_core = core.EncoderCore(local_settings(cache_bytes=0))
        encoder_core.start(fake)
        try:
            result, refused = asyncio.run(scenario(encoder_core))
        finally:
            encoder_core.close()
        assert result.embeds.shape == (2, 512, 192)
        assert torch.equal(result.embeds, torch.cat([fake.encode(["a fox"]), fake.encode(["a cat"])]))
        assert refused.code == "INVALID_ARGUMENT" and "at least one prompt" in str(refused)
        assert encoder_core.metrics.value("flux2_encoder_requests_total", {"frontend": "test", "code": "OK"}) == 1
        print("core served without grpc")
        """,
    )
    assert done.returncode == 0, done.stderr
    assert "core served without grpc" in done.stdout


def test_serve_without_the_server_extra_prints_one_line_naming_it():
    done = run_with_blocked_imports(
        {"torch"},
        """
        import flux2_encoder_server  # the package itself imports nothing heavy

        try:
            flux2_encoder_server.EncoderEngine
        except ImportError as exc:
            assert "pip install 'flux2-split[server]'" in str(exc), exc
        else:
            raise AssertionError("EncoderEngine imported without torch")
        from flux2_encoder_server.cli import main

        sys.exit(main(["serve", "--help"]))
        """,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "'torch'" in lines[0] and "pip install 'flux2-split[server]'" in lines[0]


def test_each_front_end_maps_every_service_error():
    every = [errors.ServiceError, *errors.service_errors()]
    assert set(GRPC_STATUS) == set(every) == set(HTTP_STATUS)
    for cls in every:
        # The transport-neutral code name the access log and metrics use is the gRPC code's name.
        assert GRPC_STATUS[cls].name == cls.code, cls
    assert errors.status_for(errors.RateLimited("slow down", limit="x"), HTTP_STATUS) == 429
    assert errors.status_for(errors.RateLimited("slow down", limit="x"), GRPC_STATUS) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    # Errors worth retrying suggest a delay; a bad request does not.
    assert errors.ResourceExhausted("full").retry_after_s == errors.DEFAULT_RETRY_AFTER_S
    assert errors.Unavailable("loading").retry_after_s == errors.DEFAULT_RETRY_AFTER_S
    assert errors.InvalidArgument("bad").retry_after_s is None
