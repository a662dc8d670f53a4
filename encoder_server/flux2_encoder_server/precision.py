"""Weight precision tiers for the encoder's decoder layers.

- ``bf16``: the checkpoint as is; the only tier that is bit-identical to diffusers.
- ``fp8``: float8 e4m3 weights with one scale per output channel, activations quantized per token at
  run time, products through ``torch._scaled_mm`` (row-wise scaling; H100-class GPUs, and CPU for tests).
- ``int8``: bitsandbytes LLM.int8 (``Linear8bitLt``, outlier threshold 6.0, as transformers' 8-bit loading).
- ``nf4``: bitsandbytes NF4 (``Linear4bit``, bf16 compute), as transformers' 4-bit loading.

Only the Linear layers inside the decoder layers are quantized; the token embedding and the norms stay in
bf16. The hidden states the engine reads come out in bf16 in every tier.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

PRECISIONS = ("bf16", "fp8", "int8", "nf4")

# Largest finite float8 e4m3fn value; casting anything larger gives NaN, so inputs are clamped to it.
_FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row float8 quantization: (x / scale) in e4m3 and the float32 scales, shape (rows, 1)."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / _FP8_MAX
    return (x32 / scale).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn), scale


# Swapped for a torch.compile'd version on CUDA (one fused pass instead of five over the activations).
_quantize_rows_impl: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = _quantize_rows


def enable_compiled_fp8_quantization() -> None:
    global _quantize_rows_impl
    _quantize_rows_impl = torch.compile(_quantize_rows, dynamic=True)


def fp8_unsupported_reason(device: torch.device) -> str | None:
    """Why row-wise fp8 matmuls cannot run on `device` (None when they can)."""
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 9):
            return "fp8 needs a GPU of compute capability 8.9+ (Ada, Hopper or newer)"
        return None
    # CPU: older torch releases only accept per-tensor scales here (an internal assert); probe once.
    try:
        a = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as exc:
        return f"torch {torch.__version__} cannot run row-wise fp8 matmuls on {device.type} ({str(exc)[:80]}…)"
    return None


class Fp8Linear(nn.Module):
    """y = x @ W.T with W in float8 e4m3 (per-output-channel scale) and x quantized per row at run time."""

    weight: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if weight.shape[0] % 16 or weight.shape[1] % 16:
            raise ValueError(f"fp8 needs both weight dims divisible by 16, got {tuple(weight.shape)}")
        w_fp8, w_scale = _quantize_rows(weight.detach())
        self.in_features = int(weight.shape[1])
        self.out_features = int(weight.shape[0])
        self.out_dtype = out_dtype
        self.register_buffer("weight", w_fp8)  # (out, in), row-major: .t() is the column-major operand
        self.register_buffer("weight_scale", w_scale.t().contiguous())  # (1, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x_fp8, x_scale = _quantize_rows_impl(x.reshape(-1, self.in_features))
        out = torch._scaled_mm(
            x_fp8,
            self.weight.t(),
            scale_a=x_scale,
            scale_b=self.weight_scale,
            out_dtype=self.out_dtype,
        )
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3 row-wise"


class _DropCastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


_CAST_NOTICE_FILTER = _DropCastNotice()


def _bnb_int8(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    # bitsandbytes logs on every bf16 forward that it casts to fp16 for LLM.int8; that is the method.
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_CAST_NOTICE_FILTER)

    device = linear.weight.device
    q = bnb.nn.Linear8bitLt(
        linear.in_features, linear.out_features, bias=False, has_fp16_weights=False, threshold=6.0, device="meta"
    )
    # Int8Params quantizes only on a move from the CPU, so the weight makes that round trip.
    q.weight = bnb.nn.Int8Params(linear.weight.data.to("cpu"), requires_grad=False, has_fp16_weights=False)
    return q.to(device)


def _bnb_nf4(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    device = linear.weight.device
    q = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=False,
        compute_dtype=torch.bfloat16,
        quant_type="nf4",
        device="meta",
    )
    q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
    return q.to(device)  # quantizes where the weight already is


def _fp8(linear: nn.Linear) -> nn.Module:
    return Fp8Linear(linear.weight.data, out_dtype=linear.weight.dtype)


_CONVERTERS: dict[str, Callable[[nn.Linear], nn.Module]] = {"fp8": _fp8, "int8": _bnb_int8, "nf4": _bnb_nf4}


def quantize_linears_(module: nn.Module, precision: str) -> nn.Module:
    """Replace every bias-free nn.Linear under `module` by its `precision` version, in place."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if precision == "bf16":
        return module
    if precision == "fp8":
        first = next((m.weight for m in module.modules() if type(m) is nn.Linear), None)
        reason = None if first is None else fp8_unsupported_reason(first.device)
        if reason:
            raise ValueError(f"precision fp8: {reason}")
    convert = _CONVERTERS[precision]
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                if child.bias is not None:
                    raise ValueError(f"{name}: quantizing Linear layers with a bias is not supported")
                setattr(parent, name, convert(child))
                del child
    return module


def module_bytes(module: nn.Module) -> int:
    """Bytes held by the parameters, buffers and bitsandbytes quantization states under `module`."""
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for t in list(module.parameters()) + list(module.buffers()):
        add(t)
        state = getattr(t, "quant_state", None)
        if state is not None:
            for value in vars(state).values():
                add(value)
                for inner in vars(value).values() if hasattr(value, "__dict__") else ():
                    add(inner)
        scb = getattr(t, "SCB", None)
        add(scb)
    return total
