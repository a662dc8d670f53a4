"""CUDA graphs of the decoder's forward, one per batch-size bucket, and the host-side attention mask.

Why graphs: a served batch is ~600 kernel launches, each needing the GIL, which the threads streaming
responses hold much of the time; a replayed graph is one call. Why the mask is built on the host:
transformers' mask function inspects the 2D mask (`.all()`), which on a device tensor waits for every
kernel queued before it (the previous batch) and cannot be captured at all; built from the tokenizer's
CPU tensors it costs no sync, and the decoder takes a prepared 4D mask as it is. Same mask values, same
kernels: the bytes are those of the decoder building the mask itself.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch


def graph_batch_sizes(max_batch: int, min_batch: int) -> tuple[int, ...]:
    """Buckets: min_batch, 2, 4, 8, then every 8 up to max_batch, and max_batch itself.

    Padding to the next bucket costs at most 7 rows on large batches; under load batches are full.
    """
    sizes = {min_batch, max_batch}
    sizes.update(b for b in (2, 4, 8) if min_batch <= b <= max_batch)
    sizes.update(range(16, max_batch + 1, 8))
    return tuple(sorted(sizes))


class HostMaskBuilder:
    """The 4D attention mask the decoder's forward would build from a 2D padding mask, built on the host."""

    def __init__(self, decoder: Any, dtype: torch.dtype):
        module = sys.modules[type(decoder).__module__]
        sliding = getattr(decoder.config, "sliding_window", None) is not None
        self._function = module.create_sliding_window_causal_mask if sliding else module.create_causal_mask
        self._params = set(inspect.signature(self._function).parameters)
        self._config = decoder.config
        self._dtype = dtype

    def __call__(self, attention_mask: torch.Tensor, always: bool = False) -> torch.Tensor | None:
        """None where the decoder would use no mask (nothing padded): pass the 2D mask on then.

        `always`: a mask even where nothing is padded. Without one, a batch in which every prompt fills
        all max_length tokens runs another attention kernel (is_causal) than a batch holding any shorter
        prompt, so a full-length prompt's bytes would depend on what it was batched with (measured on an
        H100: 2.7% relative difference from token 1 on). With one, every batch runs the masked kernel.
        """
        batch, seq_len = attention_mask.shape
        positions = torch.arange(seq_len).unsqueeze(0)
        kwargs: dict[str, Any] = {
            "config": self._config,
            "inputs_embeds": torch.empty((batch, seq_len, 1), dtype=self._dtype),
            "attention_mask": attention_mask,
            "position_ids": positions,
        }
        for name in ("cache", "past_key_values"):  # renamed between transformers releases
            if name in self._params:
                kwargs[name] = None
        if "cache_position" in self._params:
            kwargs["cache_position"] = positions[0]
        if always and "allow_is_causal_skip" in self._params:
            kwargs["allow_is_causal_skip"] = False
        mask = self._function(**kwargs)
        if isinstance(mask, torch.Tensor):
            return mask
        if not always:
            return None
        # Older transformers without allow_is_causal_skip: the boolean mask its sdpa path builds when
        # something is padded (True = attend): causal, and only to unpadded keys.
        causal = torch.ones((seq_len, seq_len), dtype=torch.bool).tril()
        return causal[None, None] & attention_mask.bool()[:, None, None, :]


class DecoderGraphs:
    """Captures `run(ids, mask4d, out)` once per batch size and replays it on copies of new inputs.

    `run` must write the embeddings into `out` and keep nothing it allocates, so all sizes share one
    memory pool (only one graph replays at a time, on one stream).
    """

    def __init__(
        self,
        run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None],
        example_ids: torch.Tensor,
        example_mask4d: torch.Tensor,
        batch_sizes: Sequence[int],
        embedding_dim: int,
        dtype: torch.dtype,
    ):
        device = example_ids.device
        largest = max(batch_sizes)
        seq_len = example_ids.shape[1]
        self._ids = torch.zeros((largest, seq_len), dtype=example_ids.dtype, device=device)
        self._mask = torch.zeros((largest, *example_mask4d.shape[1:]), dtype=example_mask4d.dtype, device=device)
        self._out = torch.empty((largest, seq_len, embedding_dim), dtype=dtype, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = torch.cuda.graph_pool_handle()
        for size in sorted(batch_sizes, reverse=True):  # largest first: the pool grows once
            args = (self._ids[:size], self._mask[:size], self._out[:size])
            args[0].copy_(example_ids[:1].expand(size, -1))
            args[1].copy_(example_mask4d[:1].expand(size, *example_mask4d.shape[1:]))
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up off the capture stream (compiles, cuBLAS workspaces)
                for _ in range(2):
                    run(*args)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                run(*args)
            self._graphs[size] = graph
        torch.cuda.synchronize(device)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(sorted(self._graphs))

    def bucket(self, rows: int) -> int | None:
        """The smallest captured size that holds `rows`, or None."""
        return next((size for size in self.batch_sizes if size >= rows), None)

    def replay(self, input_ids: torch.Tensor, mask4d: torch.Tensor) -> torch.Tensor:
        """Embeddings for exactly a captured batch size; a view of the static output, valid until the next
        replay (copies queued on the same stream before it are safe)."""
        size = input_ids.shape[0]
        graph = self._graphs[size]
        self._ids[:size].copy_(input_ids, non_blocking=True)
        self._mask[:size].copy_(mask4d, non_blocking=True)
        graph.replay()
        return self._out[:size]
