"""Loading the text encoder's weights: only the checkpoint files and tensors the engine reads.

FLUX.2 reads hidden states up to decoder layer 30 of 40 (FLUX.2-dev) or 27 of 36 (Klein); never the
vision tower, the later layers, the final norm or the output head. The safetensors index
(`model.safetensors.index.json`, its `weight_map`) says which shard file holds each tensor, so the
"pruned" loader downloads (from the hub) or opens (in a local folder) only the shards holding the
embedding and those layers, and reads only their tensors.

The decoder is built with its parameters on the meta device (buffers such as the rotary tables are
computed as usual) and its tensors are read group by group (the embedding, then one decoder layer at a
time), a few groups ahead on a small thread pool; a shard file is closed once its last tensor has been
read. In bf16 each tensor goes straight to the device. With a quantized tier the layers are read ahead
into host memory and each one is moved to the device and quantized there just before the next, so the
device never holds more than one bf16 layer (as with the transformers loader) and the host never more
than a few (instead of the whole bf16 model). The tensors, their dtype conversion and the quantization
calls are those of the "transformers" loader, so both give the same bytes (tests/test_weights.py).

The "transformers" loader is transformers' `from_pretrained` of the whole text encoder (every shard the
index lists), pruned afterwards; it also reads checkpoints that are not safetensors.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .families import EncoderFamily
from .precision import quantize_linears_

log = logging.getLogger(__name__)

#: "pruned": read only what the engine uses (default). "transformers": load the whole checkpoint first.
LOADERS = ("pruned", "transformers")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Reading threads: like transformers' loader (4); more tend to slow down reads from one disk.
_READ_WORKERS = 4
# Groups (the embedding, one decoder layer) read ahead of the one being placed: keeps the readers busy
# while bounding what waits in bf16 (in host memory) before its quantization to this many layers.
_READ_AHEAD = 2


@dataclass(frozen=True)
class LoadReport:
    """What loading the weights cost: time, bytes, files."""

    loader: str
    #: Seconds from the start of the weights load to the decoder on its device (download included).
    seconds: float
    #: Bytes of the tensors read from the checkpoint (None where the loader does not count them).
    bytes_read: int | None
    #: Bytes fetched from the hub (0 for a local folder or files already in the hub cache).
    bytes_downloaded: int
    #: Checkpoint files the weights were read from, and those never downloaded nor opened.
    files: tuple[str, ...]
    files_skipped: tuple[str, ...] = ()

    def describe(self) -> str:
        read = "?" if self.bytes_read is None else _gb(self.bytes_read)
        used = f"{len(self.files)} of {len(self.files) + len(self.files_skipped)} checkpoint files"
        return f"{self.seconds:.1f}s, {read} read from {used}, {_gb(self.bytes_downloaded)} downloaded"


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB"


class CheckpointFiles:
    """The safetensors files of one text encoder, in a local folder or a hub repo (fetched on demand).

    For a hub repo `revision` should be the commit the config was read at, so every file comes from the
    same repository state; `token` is passed to huggingface_hub as is (None: its own default, HF_TOKEN).
    """

    def __init__(self, model: str, subfolder: str, *, revision: str | None = None, token: str | bool | None = None):
        self.model = model
        self.subfolder = subfolder
        self.revision = revision
        self.token = token
        root = Path(model)
        self.local: Path | None = root / subfolder if root.is_dir() else None
        #: Bytes fetched from the hub so far (files that were not in the hub cache yet).
        self.bytes_downloaded = 0

    def weight_map(self) -> dict[str, str] | None:
        """Tensor name -> file name, from the index or the single file's header; None without safetensors."""
        index = self._fetch_optional(INDEX_FILE)
        if index is not None:
            return dict(json.loads(index.read_text())["weight_map"])
        single = self._fetch_optional(SINGLE_FILE)
        if single is None:
            return None
        from safetensors import safe_open

        with safe_open(single, framework="pt") as fh:
            return dict.fromkeys(fh.keys(), SINGLE_FILE)

    def fetch(self, filenames: list[str]) -> dict[str, Path]:
        """Local paths of these files, downloading the ones a hub repo's cache lacks."""
        if self.local is not None:
            missing = [name for name in filenames if not (self.local / name).is_file()]
            if missing:
                raise FileNotFoundError(f"{self.local} lacks {', '.join(missing)} (named by its {INDEX_FILE})")
            return {name: self.local / name for name in filenames}
        import huggingface_hub

        cached = {name for name in filenames if isinstance(self._cached(name), str)}
        root = huggingface_hub.snapshot_download(
            self.model,
            revision=self.revision,
            token=self.token,
            allow_patterns=[self._repo_path(name) for name in filenames],
        )
        paths = {name: Path(root) / self._repo_path(name) for name in filenames}
        self.bytes_downloaded += sum(paths[name].stat().st_size for name in filenames if name not in cached)
        return paths

    def _repo_path(self, name: str) -> str:
        return f"{self.subfolder}/{name}" if self.subfolder else name

    def _cached(self, name: str) -> Any:
        import huggingface_hub

        return huggingface_hub.try_to_load_from_cache(self.model, self._repo_path(name), revision=self.revision)

    def _fetch_optional(self, name: str) -> Path | None:
        if self.local is not None:
            path = self.local / name
            return path if path.is_file() else None
        import huggingface_hub
        from huggingface_hub.errors import EntryNotFoundError

        cached = self._cached(name)
        try:
            path = Path(
                huggingface_hub.hf_hub_download(
                    self.model, name, subfolder=self.subfolder or None, revision=self.revision, token=self.token
                )
            )
        except EntryNotFoundError:
            return None
        if not isinstance(cached, str):
            self.bytes_downloaded += path.stat().st_size
        return path


def load_decoder(
    model: str,
    family: EncoderFamily,
    config: Any,
    *,
    subfolder: str,
    revision: str | None,
    token: str | bool | None,
    device: torch.device,
    dtype: torch.dtype,
    precision: str,
    loader: str = "pruned",
) -> tuple[Any, LoadReport]:
    """The decoder stack of `family.text_config(config)` (its `num_hidden_layers` already cut to the
    deepest layer read), final norm replaced by identity, weights on `device` in `precision`."""
    if loader not in LOADERS:
        raise ValueError(f"loader {loader!r} is not one of {LOADERS}")
    started = time.monotonic()
    if loader == "pruned":
        # The commit the config came from, so config and weights are one repository state.
        files = CheckpointFiles(
            model, subfolder, revision=getattr(config, "_commit_hash", None) or revision, token=token
        )
        weight_map = files.weight_map()
        if weight_map is not None:
            decoder, read, used, skipped = _load_pruned(
                files, weight_map, family, family.text_config(config), device, dtype, precision
            )
            report = LoadReport(
                "pruned", time.monotonic() - started, read, files.bytes_downloaded, tuple(used), tuple(skipped)
            )
            return decoder, report
        log.info("%s/%s holds no safetensors checkpoint: loading it with transformers", model, subfolder)
    decoder = _load_with_transformers(model, family, config, subfolder, revision, token, device, dtype, precision)
    return decoder, LoadReport("transformers", time.monotonic() - started, None, 0, ())


def _transformers_model(
    model: str,
    family: EncoderFamily,
    config: Any,
    *,
    subfolder: str,
    revision: str | None,
    token: str | bool | None,
    dtype: torch.dtype,
    device_map: str,
) -> Any:
    """The family's whole transformers model class (`family.model_class`) from the checkpoint."""
    import transformers

    model_cls = getattr(transformers, family.model_class)
    return model_cls.from_pretrained(
        model, subfolder=subfolder, revision=revision, token=token, config=config, dtype=dtype, device_map=device_map
    )


def _load_with_transformers(
    model: str,
    family: EncoderFamily,
    config: Any,
    subfolder: str,
    revision: str | None,
    token: str | bool | None,
    device: torch.device,
    dtype: torch.dtype,
    precision: str,
) -> Any:
    """The whole text encoder through transformers (vision tower and head included), then pruned; other
    precisions load it on the CPU and quantize one layer at a time on its way to `device`."""
    full = _transformers_model(
        model,
        family,
        config,
        subfolder=subfolder,
        revision=revision,
        token=token,
        dtype=dtype,
        device_map=str(device) if precision == "bf16" else "cpu",
    )
    decoder = family.decoder(full)
    decoder.norm = nn.Identity()
    del full  # drops the vision tower and the output head
    gc.collect()
    if precision != "bf16":
        for layer in decoder.layers:
            quantize_linears_(layer.to(device), precision)
        decoder.to(device)  # embeddings, rotary tables; quantized layers stay as they are
    # After quantizing: the new layers are made in training mode, in which bitsandbytes runs other CPU
    # kernels (int8: dequantize + matmul; nf4: no repacked weights) than in eval mode.
    decoder.eval().requires_grad_(False)
    return decoder


def load_full_model(
    model: str,
    family: EncoderFamily,
    config: Any,
    *,
    subfolder: str,
    revision: str | None,
    token: str | bool | None,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Any, LoadReport]:
    """The whole text encoder through transformers, every tensor of the checkpoint on `device`: what prompt
    upsampling generates with (all decoder layers, the final norm, the output head and the vision tower).
    The engine reads its hidden states from the same layers (`engine.pruned_decoder_view`)."""
    started = time.monotonic()
    full = _transformers_model(
        model, family, config, subfolder=subfolder, revision=revision, token=token, dtype=dtype, device_map=str(device)
    )
    full.eval().requires_grad_(False)
    return full, LoadReport("transformers", time.monotonic() - started, None, 0, ())


def _checkpoint_prefix(family: EncoderFamily, weight_map: dict[str, str]) -> str:
    for prefix in family.checkpoint_prefixes:
        if prefix + "embed_tokens.weight" in weight_map:
            return prefix
    tried = ", ".join(p + "embed_tokens.weight" for p in family.checkpoint_prefixes)
    raise ValueError(f"the checkpoint has none of {tried}: not a {family.model_class} layout this loader knows")


def _empty_decoder(text_config: Any, dtype: torch.dtype) -> Any:
    """The decoder stack with parameters on the meta device and real buffers (rotary tables)."""
    from accelerate import init_empty_weights
    from transformers import AutoModel

    with init_empty_weights(include_buffers=False):
        decoder = AutoModel.from_config(copy.deepcopy(text_config), dtype=dtype)
    decoder.norm = nn.Identity()  # FLUX.2 reads pre-norm hidden states; the norm's weight is never read
    return decoder


def _groups(decoder: Any) -> list[tuple[str, nn.Module, bool]]:
    """What is loaded as a unit, (name prefix, module, is a decoder layer): each child holding
    parameters (the embedding), then each decoder layer (the unit a quantized tier converts)."""
    groups: list[tuple[str, nn.Module, bool]] = []
    for name, child in decoder.named_children():
        if name == "layers":
            groups.extend((f"layers.{i}.", layer, True) for i, layer in enumerate(child))
        elif any(True for _ in child.parameters()):
            groups.append((name + ".", child, False))
    return groups


def _load_pruned(
    files: CheckpointFiles,
    weight_map: dict[str, str],
    family: EncoderFamily,
    text_config: Any,
    device: torch.device,
    dtype: torch.dtype,
    precision: str,
) -> tuple[Any, int, list[str], list[str]]:
    prefix = _checkpoint_prefix(family, weight_map)
    decoder = _empty_decoder(text_config, dtype)
    groups = _groups(decoder)
    # Per group: (parameter name in the group, checkpoint name, dtype the module declares).
    wanted = [
        [(name, prefix + group_prefix + name, tensor.dtype) for name, tensor in module.state_dict().items()]
        for group_prefix, module, _ in groups
    ]
    keys = [key for group in wanted for _, key, _ in group]
    absent = [key for key in keys if key not in weight_map]
    if absent:
        raise ValueError(f"the checkpoint lacks {len(absent)} tensors the encoder reads, e.g. {absent[0]}")
    used = sorted({weight_map[key] for key in keys})
    skipped = sorted(set(weight_map.values()) - set(used))
    shards = _ShardReader(files.fetch(used), [weight_map[key] for key in keys])

    # Quantized tiers: read to the host; each layer goes to the device only when its turn comes.
    read_to = device if precision == "bf16" else torch.device("cpu")

    def read(key: str, target: torch.dtype) -> torch.Tensor:
        return shards.read(weight_map[key], key, read_to, target)

    with ThreadPoolExecutor(_READ_WORKERS, thread_name_prefix="weights") as pool:
        futures: dict[int, list[tuple[str, Future[torch.Tensor]]]] = {}
        try:
            for index, (_, module, is_layer) in enumerate(groups):
                for ahead in range(index, min(index + _READ_AHEAD + 1, len(groups))):
                    if ahead not in futures:
                        futures[ahead] = [(name, pool.submit(read, key, t)) for name, key, t in wanted[ahead]]
                state = {name: future.result() for name, future in futures.pop(index)}
                module.load_state_dict(state, assign=True, strict=True)
                del state
                if is_layer and precision != "bf16":
                    # As the transformers loader does it: the bf16 layer on the device, then quantized there.
                    quantize_linears_(module.to(device), precision)  # the embedding stays in bf16, every tier
        finally:
            for pending in futures.values():
                for _, future in pending:
                    future.cancel()
            shards.close()
    decoder.to(device)  # the buffers (rotary tables), a quantized tier's embedding; quantized layers stay
    still_empty = [name for name, p in decoder.named_parameters() if p.is_meta]
    if still_empty:
        raise RuntimeError(f"parameters left unloaded: {still_empty[:3]}")
    decoder.eval().requires_grad_(False)
    return decoder, shards.bytes_read, used, skipped


class _ShardReader:
    """Open safetensors files, each closed once its last wanted tensor has been read.

    Tensors come from a memory map (as in transformers' loader) and are copied out to the target device
    and dtype, so closing a file as soon as it is done unmaps it: the process never has more than the
    files being read mapped, instead of every byte read so far.
    """

    def __init__(self, paths: dict[str, Path], reads: list[str]):
        from safetensors import safe_open

        self._open = {name: safe_open(path, framework="pt") for name, path in paths.items()}
        self._left = {name: reads.count(name) for name in paths}
        self._lock = threading.Lock()
        self.bytes_read = 0

    def read(self, filename: str, key: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        raw = self._open[filename].get_tensor(key)  # a view of the file's memory map
        # Always a copy: a tensor left in the map would keep the whole file mapped (and counted in RSS).
        tensor = raw.to(device=device, dtype=dtype, copy=True)
        with self._lock:
            self.bytes_read += raw.nbytes
            self._left[filename] -= 1
            done = self._left[filename] == 0
        del raw
        if done:
            self._close(filename)
        return tensor

    def _close(self, filename: str) -> None:
        handle = self._open.pop(filename, None)
        if handle is not None:
            handle.__exit__(None, None, None)

    def close(self) -> None:
        for filename in list(self._open):
            self._close(filename)
