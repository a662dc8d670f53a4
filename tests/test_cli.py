"""`flux2-client` as a tool people trust: every failure class is one line on stderr with its documented
exit code and no traceback (--verbose adds it); bad values are refused when parsed, naming the option and
the rule; --model/--dit are checked before a server is asked; --plan-only plans FLUX.2-dev with the
network cut; --revision/--dit-revision reach every file fetch; the server's --version and log format.

Most tests load no model: model checks run on a folder of JSON files, servers are a closed port, a bare
plaintext gRPC server, or the tiny real server (token, fingerprint, a server that dies mid-encode)."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import huggingface_hub
import pytest
import torch
from flux2_client import _allocator
from flux2_client._errors import EXIT_CODES, ExitCode, describe_failure
from flux2_client._known_dits import FLUX2_DEV_DIT
from flux2_client._logging import _QuietNotice, cli_logging, library_logging_routed
from flux2_client.cli import main
from flux2_client.planner import Budget, GiB, Workload, plan_memory, spec_from_config
from flux2_encoder_server.testing import FakeEngine, ServerThread, local_settings

REPO = Path(__file__).resolve().parents[1]
TOKEN = "right-token-right-token"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """`flux2-client argv` in this process: (exit code, stdout, stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse: --help, --version, a refused value
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str, code: int, expected: ExitCode, *words: str) -> str:
    """Assert a failure reported as exactly one stderr line, no traceback, the expected code and words."""
    assert code == expected, f"exit {code}, expected {int(expected)}: {err}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def fake_model(tmp_path) -> Path:
    """A FLUX.2-dev folder as far as the checks before loading can tell: its JSON files and no weights."""
    root = tmp_path / "FLUX.2-dev-json"
    for name, content in {
        "model_index.json": {"_class_name": "Flux2Pipeline"},
        "vae/config.json": {"_class_name": "AutoencoderKLFlux2"},
        "scheduler/scheduler_config.json": {"_class_name": "FlowMatchEulerDiscreteScheduler"},
        "transformer/config.json": {"_class_name": "Flux2Transformer2DModel"},
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(content))
    return root


@pytest.fixture
def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


def generate_argv(model: Path, server: str, *extra: str) -> list[str]:
    return ["generate", "--prompt", "a fox", "--model", str(model), "--server", server, "--retries", "1", *extra]


# -- version, help, the exit-code table ----------------------------------------------------------------------
def test_version_of_both_commands(capsys):
    from flux2_client import __version__
    from flux2_encoder_server.cli import main as server_main

    code, out, _ = run(capsys, "--version")
    assert (code, out) == (0, f"flux2-client {__version__}\n")
    assert server_main(["--version"]) == 0
    assert capsys.readouterr().out == f"flux2-encoder-server {__version__}\n"
    # Neither needs the model stack: both answer in a process where torch never loads.
    check = (
        "import contextlib, sys\n"
        "from flux2_client.cli import main as client\n"
        "from flux2_encoder_server.cli import main as server\n"
        "with contextlib.suppress(SystemExit):\n"
        "    client(['--version'])\n"
        "server(['--version'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("client", "proto", "encoder_server")))
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"flux2-client {__version__}\nflux2-encoder-server {__version__}\n"


def test_exit_codes_are_the_same_in_help_and_readme(capsys):
    code, out, _ = run(capsys, "generate", "--help")
    assert code == 0
    readme = (REPO / "README.md").read_text()
    documented = {int(n): text for n, text in re.findall(r"^\| `(\d+)` \| (.+) \|$", readme, flags=re.M)}
    assert set(documented) == {int(c) for c, _ in EXIT_CODES}
    for exit_code, text in EXIT_CODES:
        assert re.search(rf"^ +{int(exit_code)}  ", out, flags=re.M), f"{exit_code} missing from --help"
        assert documented[int(exit_code)] == text, f"README and EXIT_CODES differ for {int(exit_code)}"


# -- values refused when parsed ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flag, value, rule",
    [
        ("--guidance", "nan", "must be a finite number"),
        ("--guidance", "inf", "must be a finite number"),
        ("--guidance", "-inf", "must be a finite number"),
        ("--vram", "0", "must be at least 1.00 GiB"),
        ("--vram", "1KB", "must be at least 1.00 GiB"),
        ("--vram", "-5GB", "expected a positive size like 8GB"),
        ("--retries", "0", "must be at least 1"),
        ("--timeout", "0", "must be more than 0 seconds"),
        ("--deadline", "-1", "must be more than 0 seconds"),
        ("--steps", "0", "must be at least 1"),
        ("--server", "not a server!!", "expected host:port"),
        ("--server", "localhost:99999", "port from 1 to 65535"),
        ("--server", "http:///predict", "expected an http(s)://host[:port]/predict URL"),
        ("--server", "https://encoder:0/predict", "expected an http(s)://host[:port]/predict URL"),
    ],
)
def test_bad_values_are_refused_naming_the_option_and_rule(capsys, flag, value, rule):
    code, _, err = run(capsys, "generate", "--prompt", "x", "--server", "127.0.0.1:50051", flag, value)
    one_line(err, code, ExitCode.USAGE, f"argument {flag}:", rule, repr(value))


def test_the_plan_says_what_a_too_small_vram_needs(capsys):
    code, _, err = run(capsys, "generate", "--plan-only", "--vram", "1.5GB")
    one_line(err, code, ExitCode.MEMORY, "--vram: vram budget 1.50 GiB is too small", "the smallest plan needs")


# -- local files named on the command line -----------------------------------------------------------------------
def _truncated_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(buffer, format="PNG")
    return buffer.getvalue()[:200]


@pytest.mark.parametrize(
    "content, why",
    [
        (b"", "an empty file"),
        (b"this is a caption, not a picture\n", "not an image format PIL can read"),
        (_truncated_png(), "cannot be read as an image"),
    ],
    ids=["empty", "not-an-image", "truncated"],
)
def test_a_corrupt_or_empty_image_is_named(capsys, tmp_path, fake_model, closed_port, content, why):
    image = tmp_path / "ref.png"
    image.write_bytes(content)
    code, _, err = run(capsys, *generate_argv(fake_model, closed_port, "--image", str(image)))
    one_line(err, code, ExitCode.USAGE, f"--image: {image}", why)


def test_a_cache_dir_that_is_a_file_is_refused(capsys, tmp_path, fake_model, closed_port):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("")
    code, _, err = run(capsys, *generate_argv(fake_model, closed_port, "--cache-dir", str(not_a_folder)))
    one_line(err, code, ExitCode.USAGE, f"--cache-dir: {not_a_folder} is a file")


# -- --model / --dit, before any server is asked ----------------------------------------------------------------
def test_a_missing_model_or_dit_fails_before_the_server_is_asked(capsys, tmp_path, fake_model, closed_port):
    """The server is a closed port: had the embeddings been fetched first, the exit code would be 4."""
    missing = tmp_path / "no-such-model"
    code, _, err = run(capsys, *generate_argv(missing, closed_port))
    one_line(err, code, ExitCode.MODEL, f"--model: no such folder {missing}")
    code, _, err = run(capsys, *generate_argv(fake_model, closed_port, "--dit", str(missing)))
    one_line(err, code, ExitCode.MODEL, f"--dit: no such folder {missing}")
    code, _, err = run(capsys, *generate_argv(fake_model, closed_port, "--dit", str(fake_model / "vae")))
    one_line(err, code, ExitCode.MODEL, "--dit: the folder", "has no transformer/config.json")
    code, _, err = run(capsys, *generate_argv(fake_model, closed_port, "--revision", "v1"))
    one_line(err, code, ExitCode.MODEL, "--model:", "a revision applies to hub repos only")


# -- the encoder servers -----------------------------------------------------------------------------------------
def test_an_unreachable_server(capsys, fake_model, closed_port):
    code, _, err = run(capsys, *generate_argv(fake_model, closed_port))
    one_line(err, code, ExitCode.UNREACHABLE, f"cannot reach the encoder server {closed_port}", "check that it runs")


@pytest.fixture
def plaintext_grpc_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_tls_against_a_plaintext_server(capsys, fake_model, plaintext_grpc_server):
    code, _, err = run(capsys, *generate_argv(fake_model, plaintext_grpc_server, "--tls"))
    one_line(err, code, ExitCode.UNREACHABLE, "handshake", "the server may not use TLS: drop --tls")


@pytest.fixture(scope="module")
def auth_server(tiny, engine):
    thread = ServerThread(local_settings(str(tiny.pipeline), auth_tokens=f"tester:{TOKEN}"), lambda _s: engine).start()
    yield thread
    thread.stop()


def test_a_wrong_or_missing_token(capsys, monkeypatch, tiny, auth_server):
    monkeypatch.delenv("FLUX2_ENCODER_TOKEN", raising=False)
    argv = generate_argv(tiny.pipeline, auth_server.target, "--dit", str(tiny.nf4_repo))
    for token in (["--token", "wrong-token-wrong-token"], []):
        code, _, err = run(capsys, *argv, *token)
        one_line(err, code, ExitCode.AUTH, "refused the credentials (UNAUTHENTICATED", "check --token")


def test_a_fingerprint_mismatch(capsys, tiny, auth_server):
    argv = generate_argv(tiny.pipeline, auth_server.target, "--dit", str(tiny.nf4_repo), "--token", TOKEN)
    code, _, err = run(capsys, *argv, "--expect-fingerprint", "0" * 64)
    one_line(err, code, ExitCode.MODEL_MISMATCH, "serves another model", "--expect-fingerprint")


def test_encode_when_the_server_dies(tmp_path, tiny):
    """A real `flux2-client encode` process; the server is stopped while it holds the first request (its rows
    are FakeEngine's: what is under test is the client's exit, not the model)."""
    held = FakeEngine()
    held.hold()
    server = ServerThread(local_settings(str(tiny.pipeline)), lambda _s: held).start()
    captions = tmp_path / "captions.txt"
    captions.write_text("".join(f"caption {i}\n" for i in range(8)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("client", "proto")))
    argv = [sys.executable, "-m", "flux2_client", "encode", str(captions), "--server", server.target]
    proc = subprocess.Popen(
        [*argv, "--out", str(tmp_path / "embeds"), "--no-progress"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stopper = None
    try:
        assert held.entered.wait(120), proc.communicate(timeout=5) if proc.poll() is not None else "no request"
        stopper = threading.Thread(target=server.stop, kwargs={"grace": 0.0})
        stopper.start()
        _, err = proc.communicate(timeout=120)
    finally:
        held.release_all()
        if proc.poll() is None:
            proc.kill()
        if stopper is not None:
            stopper.join(30)
        server.core.close(60)  # the held batch finishes before the test moves on
    one_line(err, proc.returncode, ExitCode.UNREACHABLE, server.target, "rerun the same command to resume")


def _failures():
    import httpx
    from flux2_client.encoder import FingerprintMismatchError, RemoteEncoderError
    from flux2_client.http_encoder import HttpEncoderError
    from flux2_client.planner import PlanError
    from flux2split_proto.codec import WireError
    from huggingface_hub.errors import LocalEntryNotFoundError

    code = grpc.StatusCode
    return [
        (RemoteEncoderError(code.UNAVAILABLE, "connection refused"), ExitCode.UNREACHABLE, "cannot reach"),
        (RemoteEncoderError(code.DEADLINE_EXCEEDED, "deadline"), ExitCode.UNREACHABLE, "within --timeout (7 s)"),
        (RemoteEncoderError(code.CANCELLED, "server stopped"), ExitCode.UNREACHABLE, "went away mid-run"),
        (RemoteEncoderError(code.UNAUTHENTICATED, "bad token"), ExitCode.AUTH, "--token"),
        (RemoteEncoderError(code.PERMISSION_DENIED, "no"), ExitCode.AUTH, "--token"),
        (HttpEncoderError(401, code.UNKNOWN, "proxy says no"), ExitCode.AUTH, "--token"),
        (FingerprintMismatchError("digest abc"), ExitCode.MODEL_MISMATCH, "--expect-fingerprint"),
        (RemoteEncoderError(code.RESOURCE_EXHAUSTED, "queue full"), ExitCode.SERVER, "retry later"),
        (RemoteEncoderError(code.INVALID_ARGUMENT, "prompt too long"), ExitCode.SERVER, "prompt too long"),
        (httpx.ConnectError("refused"), ExitCode.UNREACHABLE, "cannot reach"),
        (WireError("sha256 mismatch"), ExitCode.SERVER, "corrupt"),
        (LocalEntryNotFoundError("not cached"), ExitCode.MODEL, "m/dev or m/dit is not in the local Hugging Face"),
        (PlanError("host RAM: streaming needs 16 GiB pinned"), ExitCode.MEMORY, "host RAM"),
        (MemoryError(), ExitCode.MEMORY, "out of host memory"),
        (ModuleNotFoundError("no", name="diffusers"), ExitCode.ENVIRONMENT, "pip install 'flux2-split[client]'"),
        (KeyboardInterrupt(), ExitCode.INTERRUPTED, "interrupted"),
        (ZeroDivisionError("x"), ExitCode.UNEXPECTED, "--verbose"),
    ]


def test_each_failure_class_has_its_exit_code():
    """The mapping table itself, for the classes no CLI test above reaches cheaply."""
    from flux2_client._errors import FailureContext

    context = FailureContext(servers=("enc:50051",), models=("m/dev", "m/dit"), timeout=7)
    for exc, code, words in _failures():
        failure = describe_failure(exc, context)
        assert (failure.code, "\n" in failure.message) == (code, False), (exc, failure.message)
        assert words in failure.message, (exc, failure.message)


# -- memory ------------------------------------------------------------------------------------------------------
def _flux2_dev_plan(vram_gib: float):
    return plan_memory(spec_from_config(FLUX2_DEV_DIT, vae_bytes=170 << 20), Workload(), Budget(int(vram_gib * GiB)))


def test_out_of_memory_names_the_plan_that_was_tried(capsys, monkeypatch, fake_model, closed_port):
    from flux2_client import generation

    def out_of_memory(*args, **kwargs):
        raise generation.PlannedOutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB", _flux2_dev_plan(8))

    monkeypatch.setattr(generation, "generate_to_files", out_of_memory)
    code, _, err = run(capsys, *generate_argv(fake_model, closed_port))
    one_line(err, code, ExitCode.MEMORY, "out of GPU memory with the stream plan for 1024x1024", "in 8.00 GiB")


def test_generate_reports_device_oom_with_its_plan():
    from flux2_client.generation import GenerationParams, PlannedOutOfMemoryError, generate

    class Transformer(torch.nn.Linear):
        is_cache_enabled = False  # diffusers' CacheMixin attribute generate() reads

    class OutOfMemoryPipe:
        transformer = Transformer(1, 1)  # no plan hook: run without the planner
        _execution_device = torch.device("cpu")

        def set_progress_bar_config(self, **kwargs):
            pass

        def __call__(self, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(torch.OutOfMemoryError) as caught:  # still what callers catch today
        generate(OutOfMemoryPipe(), torch.zeros(1, 8, 4), GenerationParams(32, 32, 1))
    assert isinstance(caught.value, PlannedOutOfMemoryError) and caught.value.memory_plan is None
    failure = describe_failure(caught.value)
    assert failure.code == ExitCode.MEMORY and "no memory plan" in failure.message


# -- --verbose, --quiet, --log-format ----------------------------------------------------------------------------
def test_verbose_adds_the_traceback_of_an_unexpected_error(capsys, monkeypatch):
    from flux2_client import cli

    def boom(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "run_generate", boom)
    code, _, err = run(capsys, "generate", "--plan-only")
    one_line(err, code, ExitCode.UNEXPECTED, "unexpected RuntimeError: boom", "--verbose")
    code, _, err = run(capsys, "generate", "--plan-only", "--verbose")
    assert code == ExitCode.UNEXPECTED and "Traceback" in err and 'raise RuntimeError("boom")' in err
    assert err.splitlines()[-1].startswith("flux2-client: error: unexpected RuntimeError: boom")


def test_json_log_format_reports_a_failure_as_one_json_object(capsys, tmp_path, fake_model, closed_port):
    missing = tmp_path / "nothing-here"
    code, _, err = run(capsys, "--log-format", "json", *generate_argv(fake_model, closed_port, "--dit", str(missing)))
    line = one_line(err, code, ExitCode.MODEL)
    entry = json.loads(line)
    assert entry["level"] == "ERROR" and entry["exit_code"] == 3 and entry["msg"] == f"--dit: no such folder {missing}"


def test_meaningless_library_notices_are_hidden_unless_verbose():
    empty_float32 = (
        "There are modules in AutoencoderKLFlux2 that should be kept in float32: []. Casting directly with `to()` "
        "can lead to inconsistent results"
    )
    kernels = "Failed to load CPU gemm_4bit_forward from kernels-community: no module. Please `pip install kernels`"
    hidden = [("diffusers.models.modeling_utils", empty_float32), ("bitsandbytes.backends.cpu.ops", kernels)]
    # The same words on another logger, and the float32 notice with modules in it, still show.
    shown_always = [
        ("somewhere.else", empty_float32),
        ("diffusers.models.modeling_utils", "There are modules in X that should be kept in float32: ['norm']."),
    ]
    for verbose in (False, True):
        stream = io.StringIO()
        with cli_logging("json", verbose=verbose, stream=stream), library_logging_routed():
            for name, message in hidden + shown_always:
                logging.getLogger(name).warning(message)
        shown = [(e["logger"], e["msg"]) for e in map(json.loads, stream.getvalue().splitlines())]
        assert shown == (hidden + shown_always if verbose else shown_always)
    # Outside the CLI nothing is filtered.
    assert not [f for f in logging.getLogger("diffusers.models.modeling_utils").filters if isinstance(f, _QuietNotice)]


def test_quiet_keeps_information_off_stderr(capsys, monkeypatch, fake_model):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", FakeHub({"someone/dit": fake_model}))
    monkeypatch.setattr(_allocator, "host_available_bytes", lambda: 64 * GiB)
    argv = ["generate", "--plan-only", "--vram", "8GB", "--dit", "someone/dit"]
    code, out, err = run(capsys, *argv)
    assert code == 0 and "fetching transformer/config.json of someone/dit" in err
    code, quiet_out, quiet_err = run(capsys, *argv, "--quiet")
    assert (code, quiet_out, quiet_err) == (0, out, "")  # the plan asked for, nothing else


# -- offline and pinned ---------------------------------------------------------------------------------------------
def test_builtin_flux2_dev_shapes_are_diffusers_defaults():
    """diffusers' Flux2Transformer2DModel defaults are FLUX.2-dev's DiT: the built-in table must equal them."""
    from diffusers import Flux2Transformer2DModel

    params = inspect.signature(Flux2Transformer2DModel.__init__).parameters
    defaults = {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}
    assert {key: defaults[key] for key in FLUX2_DEV_DIT} == dict(FLUX2_DEV_DIT)
    assert spec_from_config(FLUX2_DEV_DIT) == spec_from_config(defaults)


@contextlib.contextmanager
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network or hub access during --plan-only: {args[:2]}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)  # not even the local cache is read
    yield


@pytest.mark.parametrize("vram", ["4GB", "8GB", "24GB"])
def test_plan_only_for_flux2_dev_needs_no_network(capsys, monkeypatch, vram):
    # The plan's host-RAM check is not what this tests; this machine's free RAM must not decide it.
    monkeypatch.setattr(_allocator, "host_available_bytes", lambda: 64 * GiB)
    with no_network(monkeypatch):
        code, out, err = run(capsys, "generate", "--plan-only", "--vram", vram)
    assert code == 0, err
    assert out.startswith("DiT shapes: built-in shapes of diffusers/FLUX.2-dev-bnb-4bit (nothing fetched)\n")
    assert "memory plan" in out and f"budget          {int(vram[:-2])}.00 GiB on the card" in out


class FakeHub:
    """`hf_hub_download` over local folders standing in for hub repos; records (repo, file, revision)."""

    def __init__(self, repos: dict[str, Path]):
        self.repos, self.calls = repos, []

    def __call__(self, repo_id, filename, *, revision=None, **kwargs):
        self.calls.append((repo_id, filename, revision))
        return str(self.repos[repo_id] / filename)

    def revisions(self, repo: str) -> set[str | None]:
        return {revision for r, _, revision in self.calls if r == repo}


def test_revisions_reach_every_file_fetch(capsys, monkeypatch, fake_model, closed_port):
    hub = FakeHub({"someone/pipeline": fake_model, "someone/dit": fake_model})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    argv = generate_argv(Path("someone/pipeline"), closed_port, "--dit", "someone/dit")
    code, _, err = run(capsys, *argv, "--revision", "r-model", "--dit-revision", "r-dit")
    one_line(err, code, ExitCode.UNREACHABLE)  # every check passed, then the (closed) server was asked
    assert hub.revisions("someone/pipeline") == {"r-model"} and hub.revisions("someone/dit") == {"r-dit"}
    assert ("someone/dit", "transformer/config.json", "r-dit") in hub.calls

    hub.calls.clear()
    monkeypatch.setattr(_allocator, "host_available_bytes", lambda: 64 * GiB)
    code, out, err = run(
        capsys, "generate", "--plan-only", "--vram", "8GB", "--dit", "someone/dit", "--dit-revision", "r2"
    )
    assert code == 0, err
    assert hub.calls == [("someone/dit", "transformer/config.json", "r2")]
    assert "fetching transformer/config.json of someone/dit at revision r2 from the Hugging Face hub" in err
    assert out.startswith("DiT shapes: transformer/config.json of someone/dit at revision r2, fetched from the")


def test_load_pipeline_passes_the_revisions_on(monkeypatch, fake_model):
    import diffusers
    from flux2_client import _quantization, generation

    hub = FakeHub({"someone/pipeline": fake_model, "someone/dit": fake_model})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    loaded = {}

    class Loaded(Exception):
        pass

    def load_dit(repo, *, device, revision):
        loaded["dit"] = (repo, revision)

    def load_vae(repo, *, subfolder, dtype, revision):
        loaded["vae"] = (repo, revision)
        raise Loaded

    monkeypatch.setattr(generation, "load_nf4_transformer", load_dit)
    monkeypatch.setattr(diffusers.AutoencoderKLFlux2, "from_pretrained", load_vae)
    with pytest.raises(Loaded):
        generation.load_pipeline(
            "someone/pipeline", dit="someone/dit", device="cpu", offload="none", revision="r1", dit_revision="r2"
        )
    assert loaded == {"dit": ("someone/dit", "r2"), "vae": ("someone/pipeline", "r1")}
    assert hub.revisions("someone/pipeline") == {"r1"}
    assert _quantization._is_prequantized("someone/dit", "transformer", "r3") is False
    assert hub.calls[-1] == ("someone/dit", "transformer/config.json", "r3")


# -- the server's log format ------------------------------------------------------------------------------------
def test_server_logs_json_unless_on_a_terminal():
    from flux2_encoder_server.logs import resolve_log_format

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolve_log_format("auto", io.StringIO()) == "json"
    assert resolve_log_format("auto", Terminal()) == "text"
    assert resolve_log_format("json", Terminal()) == "json" and resolve_log_format("text", io.StringIO()) == "text"
