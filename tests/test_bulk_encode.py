"""Bulk caption encoding: `flux2-client encode` run as a real subprocess against a real server, interrupted
halfway and restarted; the shards are complete, each row equals a direct encode, and the server's model saw
each unique caption once. Plus the caption readers and the shard loader."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from diffusers import Flux2Pipeline
from flux2_client.bulk import encode_captions
from flux2_client.captions import read_captions
from flux2_client.http_encoder import HttpTextEncoder
from flux2_client.shards import EmbeddingShards, ShardFingerprintError, ShardWriter
from flux2_client.training import open_encoder
from flux2_encoder_server.testing import ServerThread, local_settings
from flux2split_proto.v1 import encoder_pb2 as pb

REPO = Path(__file__).resolve().parents[1]


class CountingEngine:
    """The real engine, counting every prompt that reaches the model (the server-side evidence that no
    caption is encoded twice). Once `block_after` prompts have arrived, batches wait for `release`, so a
    test can interrupt the client while it is deterministically halfway."""

    def __init__(self, engine, block_after: int | None = None):
        self._engine = engine
        self.counts: Counter[str] = Counter()
        self.rows: dict[str, torch.Tensor] = {}  # what the model produced for each prompt
        self.metric_model_prompts: float | None = None  # set from the server's metrics after a run
        self.block_after = block_after
        self.seconds_per_batch = 0.0  # a slow model, e.g. while a client handles its Ctrl-C
        self.blocked = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def encode(self, prompts):
        with self._lock:
            self.counts.update(prompts)
            reached = self.block_after is not None and self.counts.total() >= self.block_after
        if reached:
            self.blocked.set()
            self.release.wait(60)
        time.sleep(self.seconds_per_batch)
        embeds = self._engine.encode(prompts)
        with self._lock:
            for prompt, row in zip(prompts, embeds, strict=True):
                self.rows.setdefault(prompt, row)
        return embeds

    launch = encode  # the server launches batches; this wrapper answers at once

    def unblock(self) -> None:
        self.block_after = None
        self.release.set()


def make_captions(unique: int, duplicates: int) -> list[str]:
    base = [f"photo {i} of a {['red', 'blue', 'green'][i % 3]} fox, style {i * 7 % 11}" for i in range(unique)]
    captions = base + [base[(i * 5) % unique] for i in range(duplicates)]
    return [captions[(i * 37) % len(captions)] for i in range(len(captions))]  # duplicates spread through


def run_encode_cli(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("client", "proto")))
    return subprocess.Popen(
        [sys.executable, "-m", "flux2_client", "encode", *args, "--no-progress"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # As from a terminal: a command started in the background by a non-interactive shell (as CI runners
        # may start the suite) inherits SIGINT ignored, Python then installs no KeyboardInterrupt handler,
        # and the test's "Ctrl-C" would be lost.
        preexec_fn=_sigint_as_in_a_terminal,
    )


def _sigint_as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupted_then_resumed(tmp_path, tiny, engine, *, unique, duplicates, shard_rows, block_after, sig):
    counting = CountingEngine(engine, block_after=block_after)
    # No server cache: a caption the client sent twice must reach the model twice, so the counts below
    # measure the client's resume logic rather than the server's cache.
    server = ServerThread(local_settings(str(tiny.pipeline), cache_bytes=0), lambda _s: counting).start()
    captions = make_captions(unique, duplicates)
    source = tmp_path / "captions.txt"
    source.write_text("\n".join(captions) + "\n", encoding="utf-8")
    out = tmp_path / "embeds"
    args = [str(source), "--server", server.target, "--out", str(out), "--shard-rows", str(shard_rows)]
    args += ["--concurrency", "4", "--request-prompts", "4"]
    try:
        first = run_encode_cli(args)
        assert counting.blocked.wait(300), first.communicate()[0] if first.poll() is not None else "not blocked"
        time.sleep(0.5)  # let the client finish writing the shards it has
        first.send_signal(sig)
        time.sleep(0.2)
        # Python runs the SIGINT handler on the main thread, which sleeps in `wait()` for a request to come
        # back unless the signal happened to land on it: the model goes on slowly, so that the first answer
        # wakes it and the rest of the captions are still to come.
        counting.seconds_per_batch = 0.2
        counting.unblock()
        output, _ = first.communicate(timeout=120)
        counting.seconds_per_batch = 0.0
        halfway = json.loads((out / "index.json").read_text())["captions"]
        assert 0 < len(halfway) < unique, output  # it really was interrupted halfway
        second = run_encode_cli(args)
        output2, _ = second.communicate(timeout=300)
        assert second.returncode == 0, output2
        assert f"{len(halfway)} already in" in output2
    finally:
        counting.unblock()
        server.stop()
    metrics = server.server.core.metrics
    counting.metric_model_prompts = metrics.value("flux2_encoder_prompts_total", {"source": "model"})
    return captions, out, counting, output, set(halfway)


def check_complete_and_exact(engine, captions, out, counting):
    unique = list(dict.fromkeys(captions))
    shards = EmbeddingShards(out, expected_fingerprint=engine.fingerprint.digest)
    assert sorted(shards.captions) == sorted(unique)
    saved = shards.prompt_embeds(unique)
    # Every row is the model's output for its own caption (no row mix-up across requests, shards, runs)...
    assert torch.equal(saved, torch.stack([counting.rows[c] for c in unique]))
    # ...and equals a direct encode outside the server (a spread-out sample keeps the test fast on 2 cores;
    # the server's bit-exactness against diffusers is test_embeddings_exact's job).
    sample = list(range(0, len(unique), max(1, len(unique) // 12)))
    assert torch.equal(saved[sample], engine.encode([unique[i] for i in sample]))


def test_bulk_encode_interrupted_by_ctrl_c_resumes_without_encoding_anything_twice(tmp_path, tiny, rows_engine):
    captions, out, counting, first_output, _ = interrupted_then_resumed(
        tmp_path, tiny, rows_engine, unique=96, duplicates=104, shard_rows=16, block_after=48, sig=signal.SIGINT
    )
    assert "interrupted: rerun the same command" in first_output
    check_complete_and_exact(rows_engine, captions, out, counting)
    # Server-side count: every unique caption reached the model exactly once over both runs.
    assert set(counting.counts) == set(captions)
    assert max(counting.counts.values()) == 1
    assert counting.metric_model_prompts == len(set(captions))  # the server's own metrics agree
    assert not list(out.glob("*.tmp"))


def test_bulk_encode_killed_hard_resumes_from_complete_shards(tmp_path, tiny, rows_engine):
    captions, out, counting, _, saved_before_kill = interrupted_then_resumed(
        tmp_path, tiny, rows_engine, unique=40, duplicates=10, shard_rows=4, block_after=20, sig=signal.SIGKILL
    )
    check_complete_and_exact(rows_engine, captions, out, counting)
    # A hard kill loses what was in flight or not yet in a shard, never a saved shard: no caption saved
    # before the kill reached the model again, and nothing reached it more than twice.
    assert all(counting.counts[c] == 1 for c in saved_before_kill)
    assert max(counting.counts.values()) <= 2


def test_bulk_encode_over_http_and_the_loader(tmp_path, tiny, rows_engine):
    counting = CountingEngine(rows_engine)
    server = ServerThread(local_settings(str(tiny.pipeline), http_port=0, cache_bytes=0), lambda _s: counting).start()
    captions = make_captions(12, 6)
    try:
        with HttpTextEncoder(server.http_url) as encoder:
            result = encode_captions(captions, tmp_path, encoder, concurrency=3, request_prompts=2, shard_rows=5)
            again = encode_captions([*captions, "one more"], tmp_path, encoder, shard_rows=5, progress=False)
    finally:
        server.stop()
    assert (result.captions, result.unique, result.encoded, result.shards_written) == (18, 12, 12, 3)
    assert (again.already_done, again.encoded) == (12, 1)
    assert max(counting.counts.values()) == 1
    shards = EmbeddingShards(tmp_path, expected_fingerprint=rows_engine.fingerprint.digest)
    batch = [captions[3], "one more", captions[0]]
    prompt_embeds, text_ids = shards.get(batch)
    assert torch.equal(prompt_embeds, rows_engine.encode(batch))
    assert torch.equal(text_ids, Flux2Pipeline._prepare_text_ids(prompt_embeds))
    with pytest.raises(KeyError, match="caption not in"):
        shards.get(["never encoded"])


def test_loader_and_writer_refuse_another_models_shards(tmp_path, server, engine):
    with open_encoder(server.target) as encoder:
        encode_captions(["a", "b", "c"], tmp_path, encoder, shard_rows=2, progress=False)
        with pytest.raises(ShardFingerprintError, match="expected digest"):
            EmbeddingShards(tmp_path, expected_fingerprint="0" * 64)
        index_path = tmp_path / "index.json"
        index = json.loads(index_path.read_text())
        index["fingerprint"]["digest"] = "f" * 64
        index_path.write_text(json.dumps(index))
        with pytest.raises(ShardFingerprintError, match="use another --out"):
            encode_captions(["d"], tmp_path, encoder, progress=False)
        # The index says another model, the shards say this one: the loader refuses them too.
        with pytest.raises(ShardFingerprintError, match="made by model digest"):
            EmbeddingShards(tmp_path, expected_fingerprint="f" * 64).get(["a"])


def test_a_shard_written_just_before_a_crash_is_adopted(tmp_path, rows_engine):
    fingerprint = pb.ModelFingerprint(digest=rows_engine.fingerprint.digest, weights_id="tiny")
    folder = ShardWriter(tmp_path, fingerprint)
    folder.write_shard([("x", rows_engine.encode(["x"])[0])])
    index_before = (tmp_path / "index.json").read_text()
    folder.write_shard([("y", rows_engine.encode(["y"])[0]), ("z", rows_engine.encode(["z"])[0])])
    (tmp_path / "index.json").write_text(index_before)  # crash between the shard rename and the index write
    (tmp_path / "shard-00009.safetensors.tmp").write_bytes(b"half a shard")
    reopened = ShardWriter(tmp_path, fingerprint)
    assert set(reopened.captions) == {"x", "y", "z"}
    assert reopened.next_number == 2
    assert not list(tmp_path.glob("*.tmp"))
    assert torch.equal(EmbeddingShards(tmp_path).prompt_embeds(["z"]), rows_engine.encode(["z"]))


def test_caption_readers(tmp_path):
    text = tmp_path / "captions.txt"
    text.write_text("a fox\n\n  \nan owl\na fox\n", encoding="utf-8")
    assert read_captions(text) == ["a fox", "an owl", "a fox"]

    jsonl = tmp_path / "meta.jsonl"
    jsonl.write_text('{"text": "one", "file": "1.png"}\n\n{"text": "two"}\n', encoding="utf-8")
    assert read_captions(jsonl, field="text") == ["one", "two"]
    with pytest.raises(ValueError, match=r"meta\.jsonl:1: no 'caption' field"):
        read_captions(jsonl)

    images = tmp_path / "instance"
    images.mkdir()
    for name, caption in [("b.png", "a photo of sks dog"), ("a.jpg", "sks dog on a sofa\n")]:
        (images / name).write_bytes(b"not decoded: only the sidecar caption is read")
        (images / name).with_suffix(".txt").write_text(caption, encoding="utf-8")
    assert read_captions(images) == ["sks dog on a sofa", "a photo of sks dog"]
    (images / "c.webp").write_bytes(b"")
    with pytest.raises(ValueError, match=r"1 image\(s\) without a .txt caption, e.g. c.webp"):
        read_captions(images)


class HeldEngine(CountingEngine):
    """Holds the first batch that reaches this server's model until `release`, so a test can kill the
    server with requests in flight."""

    def __init__(self, engine):
        super().__init__(engine, block_after=1)


def test_bulk_encode_survives_a_killed_server_when_another_is_in_the_pool(tmp_path, tiny, rows_engine):
    from flux2_client.endpoints import EncoderPool, RetryPolicy

    doomed_engine, survivor_engine = HeldEngine(rows_engine), CountingEngine(rows_engine)
    settings = local_settings(str(tiny.pipeline), cache_bytes=0)
    doomed = ServerThread(settings, lambda _s: doomed_engine).start()
    survivor = ServerThread(settings, lambda _s: survivor_engine).start()
    captions = make_captions(12, 4)
    retry = RetryPolicy(attempts=6, backoff=0.01, max_backoff=0.05, cooldown=60.0, deadline=120.0)
    outcome: dict = {}
    try:
        with EncoderPool([doomed.target, survivor.target], timeout=60, retry=retry) as pool:
            run = threading.Thread(
                target=lambda: outcome.update(
                    result=encode_captions(
                        captions, tmp_path, pool, concurrency=4, request_prompts=2, shard_rows=5, progress=False
                    )
                ),
                daemon=True,
            )
            run.start()
            assert doomed_engine.blocked.wait(60)  # a request is inside the doomed server's model
            killer = threading.Thread(target=doomed.stop, kwargs={"grace": 0.0}, daemon=True)
            killer.start()  # grace 0: what is in flight there is cut off, and the port closes
            deadline = time.monotonic() + 60
            while pool.stats.failovers == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            doomed_engine.unblock()  # let the stopped server's worker thread end
            run.join(120)
            killer.join(30)
            stats = pool.stats
    finally:
        doomed_engine.unblock()
        survivor.stop()
    result = outcome["result"]
    assert stats.failovers >= 1
    assert stats.served_by.get(survivor.target, 0) >= 1
    unique = list(dict.fromkeys(captions))
    assert (result.unique, result.encoded, result.interrupted) == (12, 12, False)
    shards = EmbeddingShards(tmp_path, expected_fingerprint=rows_engine.fingerprint.digest)
    assert sorted(shards.captions) == sorted(unique)
    # Every row is exactly what a model produced for its own caption, whichever server answered it...
    produced = {**doomed_engine.rows, **survivor_engine.rows}  # the survivor's answer where both ran it
    assert torch.equal(shards.prompt_embeds(unique), torch.stack([produced[c] for c in unique]))
    # ...and equals a direct encode outside any server (a sample keeps the test fast on 2 cores).
    sample = unique[::4]
    assert torch.equal(shards.prompt_embeds(sample), rows_engine.encode(sample))


def test_encode_command_builds_one_pool_from_every_server_flag(tmp_path):
    import argparse

    from flux2_client._pool_args import pool_from_args
    from flux2_client.bulk import add_encode_parser

    parser = argparse.ArgumentParser()
    add_encode_parser(parser.add_subparsers(dest="command"))
    argv = ["encode", "captions.txt", "--out", str(tmp_path), "--retries", "3", "--deadline", "9"]
    targets = ["127.0.0.1:1", "dns:///localhost:2", "http://127.0.0.1:3/predict"]
    args = parser.parse_args([*argv, *(x for t in targets for x in ("--server", t))])
    with pool_from_args(args) as pool:
        assert pool.targets == targets
        assert (pool.retry.attempts, pool.retry.deadline, pool.timeout) == (3, 9.0, 300.0)
    with pytest.raises(SystemExit, match="--server is required"):
        pool_from_args(parser.parse_args(argv))
    with pytest.raises(SystemExit, match="TLS options were given"):
        pool_from_args(parser.parse_args([*argv, "--tls", "--server", "http://127.0.0.1:3/predict"]))


def test_captions_split_on_newlines_only_and_a_bad_byte_is_named(tmp_path):
    """U+2028, NEL and form feeds are characters inside a caption (str.splitlines would break there); a line
    with an invalid UTF-8 byte refuses the file naming that line, or is skipped and counted."""
    captions = ["a fox\u2028in the snow", "two lines\x85one caption", "plain", "tab\tand\x0cform feed"]
    good = tmp_path / "good.txt"
    good.write_bytes(("\r\n".join(captions) + "\n").encode("utf-8"))
    assert read_captions(good) == captions
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"first\nsecond \xff here\nthird\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: byte 0xff at column 8 is not valid UTF-8"):
        read_captions(bad)
    skipped: list[int] = []
    assert read_captions(bad, bad_lines="skip", on_skip=lambda line, _why: skipped.append(line)) == ["first", "third"]
    assert skipped == [2]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_bytes(b'{"caption": "ok \\u2028 inside"}\n{"caption": "x\xfe"}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2: byte 0xfe"):
        read_captions(jsonl)


def test_encode_command_names_the_bad_line_in_one_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xc3\x28 broken\n")
    proc = run_encode_cli([str(bad), "--server", "127.0.0.1:1", "--out", str(tmp_path / "o")])
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in output and "bad.txt:2: byte 0xc3 at column 1 is not valid UTF-8" in output, output
