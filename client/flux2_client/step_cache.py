"""Step caches on the FLUX.2 DiT: diffusers' own, and what the block streamer must know about them.

`--cache first-block|mag|taylorseer` turns on one of diffusers' caches for a generation (`GenerationParams.
step_cache`; `generate` enables it for the call and removes it afterwards):

- `first-block`: `FirstBlockCacheConfig` (diffusers' default threshold). Every step runs the first block;
  when its output changed little since the last full step, the other blocks are skipped and their cached
  residual is added instead. diffusers 0.42.1 cannot run it on FLUX.2: the first block (double-stream)
  returns two streams, the last (single-stream) one concatenated tensor, and the residual between them
  fails in the first forward (`TypeError: unsupported operand type(s) for -: 'Tensor' and 'list'`;
  huggingface/diffusers#14280). `enable_step_cache` refuses it up front while that holds.
- `mag`: `MagCacheConfig` with diffusers' `FLUX_MAG_RATIOS`. They were calibrated on FLUX.1 (diffusers ships
  none for FLUX.2), so the skip schedule is the FLUX.1 one; calibrate FLUX.2's with
  `MagCacheConfig(calibrate=True)` for a better one. A skipped step runs no block at all.
- `taylorseer`: `TaylorSeerCacheConfig(use_lite_mode=True)`: on predicted steps every block is skipped and the
  DiT's output projection is extrapolated. The default (non-lite) mode predicts every attention output
  instead, which keeps Taylor factors of all of them on the card (several GiB at 1024 px for FLUX.2-dev,
  more than a low-VRAM budget holds) and still runs every block's feed-forward.

Flux2Pipeline (FLUX.2-dev) calls its transformer without a `cache_context`, which the first-block and
TaylorSeer hooks need; `generate` runs the call inside `transformer.cache_context("cond")`, as diffusers'
pipelines that support caches do (Flux2KleinPipeline sets its own contexts inside).

A skipped block must not be streamed. The three caches share one shape, which `skip_schedule` reports to the
streamer: a few blocks always run (first-block's head, none for the others) and, within one forward, the
other blocks all run or are all skipped, decided before the first of them starts. So the streamer prefetches
a unit only once its forward is known to run it (`_streamer.BlockStreamer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CACHE_CHOICES = ("first-block", "mag", "taylorseer")

__all__ = [
    "CACHE_CHOICES",
    "SkipSchedule",
    "StepCacheUnsupported",
    "disable_step_cache",
    "enable_step_cache",
    "skip_schedule",
]


@dataclass(frozen=True)
class SkipSchedule:
    """How a step cache skips the DiT's blocks: `always_run` names the blocks it never skips; in one forward the
    others all run or are all skipped, decided before the first of them starts."""

    always_run: frozenset[str]


def step_cache_config(name: str, num_inference_steps: int) -> Any:
    """diffusers' config for the cache `name` (one of `CACHE_CHOICES`) on a generation of that many steps."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if name == "first-block":
        return FirstBlockCacheConfig()
    if name == "mag":
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        # MagCacheConfig interpolates the ratios to the step count, which must be the generation's.
        return MagCacheConfig(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=num_inference_steps)
    if name == "taylorseer":
        return TaylorSeerCacheConfig(use_lite_mode=True)
    raise ValueError(f"step_cache: expected one of {', '.join(CACHE_CHOICES)}, got {name!r}")


class StepCacheUnsupported(ValueError):
    """The installed diffusers cannot run this step cache on this DiT."""


def enable_step_cache(transformer: Any, name: str, num_inference_steps: int) -> None:
    """Turn on the cache `name` on `transformer` (`enable_cache`) for generations of `num_inference_steps`."""
    if name == "first-block":
        _check_first_block_cache(transformer)
    transformer.enable_cache(step_cache_config(name, num_inference_steps))


def _check_first_block_cache(transformer: Any) -> None:
    """FirstBlockCache adds the residual between the last block's output and the first's to skip the rest, so
    both must return the same streams (diffusers' block metadata says which they return)."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    blocks = _blocks(transformer)
    if len(blocks) < 2:
        return
    head, tail = (TransformerBlockRegistry.get(type(b)) for b in (blocks[0][1], blocks[-1][1]))
    if (head.return_encoder_hidden_states_index is None) != (tail.return_encoder_hidden_states_index is None):
        raise StepCacheUnsupported(
            f"first-block: this diffusers' FirstBlockCache cannot run on {type(transformer).__name__}: its first block "
            f"({type(blocks[0][1]).__name__}) and last block ({type(blocks[-1][1]).__name__}) return different "
            "streams (huggingface/diffusers#14280); use mag or taylorseer"
        )


def disable_step_cache(transformer: Any) -> None:
    if getattr(transformer, "is_cache_enabled", False):
        transformer.disable_cache()


def _blocks(transformer: Any) -> list[tuple[str, Any]]:
    from ._introspection import BLOCK_LISTS

    return [(f"{name}.{i}", block) for name in BLOCK_LISTS for i, block in enumerate(getattr(transformer, name, ()))]


def skip_schedule(transformer: Any) -> SkipSchedule | None:
    """The `SkipSchedule` of the step cache enabled on `transformer`; None without a cache, or for a cache whose
    skipping does not have that shape (the streamer then prefetches as without a cache: correct, but a unit
    whose forward is skipped may have been copied)."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    config = getattr(transformer, "_cache_config", None)
    if isinstance(config, MagCacheConfig) or (isinstance(config, TaylorSeerCacheConfig) and config.use_lite_mode):
        return SkipSchedule(frozenset())
    if isinstance(config, FirstBlockCacheConfig):
        from diffusers.hooks.first_block_cache import FBCHeadBlockHook

        blocks = _blocks(transformer)
        return SkipSchedule(frozenset(n for n, b in blocks if any(isinstance(h, FBCHeadBlockHook) for h in _hooks(b))))
    return None


def _hooks(module: Any) -> list[Any]:
    registry = getattr(module, "_diffusers_hook", None)
    return list(registry.hooks.values()) if registry is not None else []
