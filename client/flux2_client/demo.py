"""The quick-start demo: start an encoder server, encode a prompt through it, generate, stop the server.

With no `--model` it runs on tiny random models built on the spot, so it works offline on a CPU in about
a minute; their image is noise. `--family klein` builds tiny FLUX.2 [klein] models instead (a Qwen3
encoder on the server, the step-distilled Klein DiT on the client). `--model black-forest-labs/FLUX.2-dev`
gives a real image (GPU, HF_TOKEN): the single-machine mode, server and DiT on one card, the DiT planned
within what the server leaves (`--encoder-precision int8|nf4` to fit a 16-24 GB card).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .planner import PlanError, fmt_bytes, parse_size

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


def wait_serving(
    target: str, proc: subprocess.Popen, timeout: float = 600.0, credentials: grpc.ChannelCredentials | None = None
) -> None:
    """Poll grpc.health.v1 until SERVING (the model is loaded and warmed up); `credentials`: a TLS server."""
    deadline = time.monotonic() + timeout
    channel_cm = grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
    with channel_cm as channel:
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


ENCODER_PRECISIONS = ("bf16", "fp8", "int8", "nf4")  # the server's --precision tiers
DEMO_FAMILIES = ("flux2", "klein")  # the tiny models the demo builds


@dataclass(frozen=True)
class SharedCard:
    """One card shared by the encoder server and this process (the single-machine mode).

    `budget`: what both may hold on the card together (`--vram`), None for the whole card;
    `encoder_bytes`: what the server holds, measured once it reports SERVING (its weights, CUDA context
    and the activations of its warm-up batch, which is the size of the demo's own request).
    """

    budget: int | None
    encoder_bytes: int

    def dit_vram(self) -> int | None:
        """The budget for this process's plan: `budget` minus what the encoder holds. None (no `budget`)
        leaves the planner to read the free memory at planning time, which the server's share is
        already missing from."""
        if self.budget is None:
            return None
        left = self.budget - self.encoder_bytes
        if left <= 0:
            raise PlanError(
                f"vram budget {fmt_bytes(self.budget)} is used up by the encoder server alone "
                f"({fmt_bytes(self.encoder_bytes)}); give a lower --encoder-precision or a larger --vram"
            )
        return left

    def describe(self) -> str:
        whole = "the card's free memory" if self.budget is None else fmt_bytes(self.budget)
        dit = self.dit_vram()
        rest = "what is free when the DiT is planned" if dit is None else fmt_bytes(dit)
        return f"{whole} shared: the encoder server holds {fmt_bytes(self.encoder_bytes)}, the DiT plans within {rest}"


def _card_free(device: Any) -> int:
    import torch

    return int(torch.cuda.mem_get_info(device)[0])


def run_demo(
    workdir: Path,
    model: str | None = None,
    prompt: str = "a watercolor fox",
    *,
    dit: str | None = None,
    encoder_precision: str = "bf16",
    vram: str | int | None = None,
    family: str = "flux2",
) -> Path:
    """Start a server on `model` (tiny random models when None) with `encoder_precision` weights, generate
    one image through it with `generate_to_files` (what `flux2-client generate` runs), stop the server;
    returns the PNG's path. `family` picks the tiny models' family ("flux2" or "klein"); with `model` the
    model's own model_index.json decides.

    With real weights on a GPU the server and the DiT share the card: the server is measured once it
    reports SERVING and the DiT's plan gets what is left of `vram` (the whole card when None; see
    `SharedCard`). On a 16-24 GB card that needs an 8-bit or 4-bit encoder (`encoder_precision` int8 or
    nf4), whose embeddings are not bit-identical to diffusers' (README, "One machine").
    """
    from .endpoints import EncoderPool
    from .generation import GenerationParams, generate_to_files
    from .tiny import make_tiny_flux2
    from .tiny_klein import make_tiny_klein

    if family not in DEMO_FAMILIES:
        raise ValueError(f"family: expected one of {', '.join(DEMO_FAMILIES)}, got {family!r}")
    if model is not None and family != "flux2":
        raise ValueError("family: picks the tiny models; with a model, its model_index.json decides the family")
    if encoder_precision not in ENCODER_PRECISIONS:
        choices = ", ".join(ENCODER_PRECISIONS)
        raise ValueError(f"encoder_precision: expected one of {choices}, got {encoder_precision!r}")
    workdir.mkdir(parents=True, exist_ok=True)
    card, free_before = None, 0
    if model is None:
        shown = "FLUX.2 [klein]" if family == "klein" else "FLUX.2-dev"
        print(f"== building tiny random {shown} models (offline) ==", flush=True)
        if family == "klein":
            klein = make_tiny_klein(workdir / "models")
            encoder_model, dit = str(klein.distilled), str(klein.nf4_repo)
        else:
            paths = make_tiny_flux2(workdir / "models")
            encoder_model, dit = str(paths.pipeline), str(paths.nf4_repo)
        size, steps, device, offload, server_args = 128, 4, "cpu", "leaf_level", ["--device", "cpu"]
        dit_vram = None
    else:
        import torch

        from .families import default_dit

        if not torch.cuda.is_available():
            raise RuntimeError("demo --model: real weights need a CUDA GPU (without one, run the demo on tiny models)")
        encoder_model, dit = model, dit or default_dit(model)
        size, steps, device, offload, server_args = 1024, 50, "cuda", "plan", []
        card = torch.device("cuda", torch.cuda.current_device())
        free_before = _card_free(card)  # this process's CUDA context already counted
    server_args = [*server_args, "--precision", encoder_precision]

    print(f"== starting the encoder server on {encoder_model} ({encoder_precision}) ==", flush=True)
    proc, target = start_server(encoder_model, server_args, workdir / "server.log")
    try:
        wait_serving(target, proc)
        if card is not None:
            shared = SharedCard(parse_size(vram) if vram is not None else None, max(0, free_before - _card_free(card)))
            print(f"== one card: {shared.describe()} ==", flush=True)
            dit_vram = shared.dit_vram()
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
                vram=dit_vram,
                verbose=True,
            )
    finally:
        code = stop_server(proc)
        print(f"== server stopped (exit code {code}) ==", flush=True)
    if model is None:
        print(
            "\nNote: the tiny models have random weights, so the image is noise. For a real image run\n"
            "  flux2-client demo --model black-forest-labs/FLUX.2-dev --encoder-precision nf4\n"
            "(needs a GPU, 16 GB or more with nf4, and HF_TOKEN with access to the FLUX.2-dev repo).",
            flush=True,
        )
    print(f"\nimage: {path}  (server log: {workdir / 'server.log'}, HF_TOKEN set: {'HF_TOKEN' in os.environ})")
    return path
