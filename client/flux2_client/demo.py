"""The quick-start demo: start an encoder server, encode a prompt through it, generate, stop the server.

With no `--model` it runs on tiny random models built on the spot, so it works offline on a CPU in about
a minute; their image is noise. `--model black-forest-labs/FLUX.2-dev` gives a real image (GPU, HF_TOKEN).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_LISTENING = re.compile(r"listening on (\S+):(\d+)")


def start_server(model: str, extra_args: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start `flux2-encoder-server serve` on a free port; returns (process, "127.0.0.1:port")."""
    cmd = [
        sys.executable,
        "-m",
        "flux2_encoder_server",
        "serve",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    ]
    log = log_path.open("w")
    proc = subprocess.Popen(cmd + extra_args, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = _LISTENING.search(line)
    if not match:
        proc.kill()
        raise RuntimeError(f"server did not start (see {log_path}): {line.strip()}")
    return proc, f"127.0.0.1:{match.group(2)}"


def wait_serving(target: str, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    """Poll grpc.health.v1 until SERVING (the model is loaded and warmed up)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode} while loading")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"server at {target} not SERVING after {timeout:.0f}s")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def run_demo(workdir: Path, model: str | None = None, prompt: str = "a watercolor fox") -> Path:
    """Start a server on `model` (tiny random models when None), generate one image through it with
    `generate_to_files` (what `flux2-client generate` runs), stop the server; returns the PNG's path."""
    from .endpoints import EncoderPool
    from .generation import GenerationParams, generate_to_files
    from .tiny import make_tiny_flux2

    workdir.mkdir(parents=True, exist_ok=True)
    if model is None:
        print("== building tiny random models (offline) ==", flush=True)
        paths = make_tiny_flux2(workdir / "models")
        encoder_model, dit = str(paths.pipeline), str(paths.nf4_repo)
        size, steps, device, offload, server_args = 128, 4, "cpu", "leaf_level", ["--device", "cpu"]
    else:
        encoder_model, dit = model, "diffusers/FLUX.2-dev-bnb-4bit"
        size, steps, device, offload, server_args = 1024, 50, None, None, []

    print(f"== starting the encoder server on {encoder_model} ==", flush=True)
    proc, target = start_server(encoder_model, server_args, workdir / "server.log")
    try:
        wait_serving(target, proc)
        print(f"== server SERVING at {target}; generating ==", flush=True)
        with EncoderPool([target], timeout=300.0) as pool:
            (path,) = generate_to_files(
                pool,
                [prompt],
                workdir / "demo.png",
                GenerationParams(height=size, width=size, num_inference_steps=steps, guidance_scale=4.0, seed=0),
                model=encoder_model,
                dit=dit,
                device=device,
                offload=offload,
                verbose=True,
            )
    finally:
        code = stop_server(proc)
        print(f"== server stopped (exit code {code}) ==", flush=True)
    if model is None:
        print(
            "\nNote: the tiny models have random weights, so the image is noise. For a real image run\n"
            "  flux2-client demo --model black-forest-labs/FLUX.2-dev\n"
            "(needs a GPU and HF_TOKEN with access to the FLUX.2-dev repo).",
            flush=True,
        )
    print(f"\nimage: {path}  (server log: {workdir / 'server.log'}, HF_TOKEN set: {'HF_TOKEN' in os.environ})")
    return path
