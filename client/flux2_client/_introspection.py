"""What a FLUX.2 DiT holds, as the planner and the block streamer see it.

A transfer *atom* is one child of a transformer block (`transformer_blocks.3.ff`), listed in execution
order. The tensors an atom computes with are its parameters, its buffers and, for bitsandbytes NF4
layers, the tensors of each weight's `quant_state` (absmax, code, nested state). A slab lays them out
one after another, each at a multiple of `TENSOR_ALIGN`; `spec_from_module` reports those slab sizes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .planner import VAE_TILED_BYTES, VAE_UNTILED_BYTES_PER_MPIXEL, Atom, ModelSpec, align_bytes

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


@dataclass
class TensorRef:
    """Where a tensor lives on its module, so it can be pointed at a slab view."""

    owner: Any
    kind: str  # "param", "buffer" or "attr" (a QuantState field)
    name: str
    tensor: torch.Tensor
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def point_to(self, view: torch.Tensor) -> None:
        if self.kind == "param":
            self.owner._parameters[self.name].data = view
        elif self.kind == "buffer":
            self.owner._buffers[self.name] = view
        else:
            setattr(self.owner, self.name, view)

    def release(self) -> None:
        """Stop holding the tensor (after `point_to`), keeping its dtype and shape for `slab_view`: a
        buffer or quant_state field replaced on its module would otherwise live on here until the ref
        is dropped."""
        self.tensor = torch.empty(self.tensor.shape, dtype=self.tensor.dtype, device="meta")


def _quant_state_refs(state: Any) -> Iterator[tuple[Any, str, torch.Tensor]]:
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor):
            yield state, name, value
    nested = getattr(state, "state2", None)
    if nested is not None:
        yield from _quant_state_refs(nested)


def tensor_refs(
    modules: list[torch.nn.Module], recurse: bool = True, skip: frozenset[int] = frozenset()
) -> list[TensorRef]:
    """Every tensor the modules (with their children if `recurse`) compute with: parameters, buffers and
    bitsandbytes quant_state tensors, each once; modules whose `id` is in `skip` are left out."""
    refs: list[TensorRef] = []
    seen: set[int] = set()

    def add(owner: Any, kind: str, name: str, tensor: torch.Tensor) -> None:
        if id(tensor) in seen:
            return
        seen.add(id(tensor))
        refs.append(TensorRef(owner, kind, name, tensor))

    for root in modules:
        for module in root.modules() if recurse else [root]:
            if id(module) in skip:
                continue
            for name, param in module._parameters.items():
                if param is None:
                    continue
                add(module, "param", name, param)
                state = getattr(param, "quant_state", None)
                if state is not None:
                    for owner, attr, t in _quant_state_refs(state):
                        add(owner, "attr", attr, t)
            for name, buf in module._buffers.items():
                if buf is not None:
                    add(module, "buffer", name, buf)
    return refs


def slab_layout(refs: list[TensorRef]) -> int:
    """Give each tensor its offset in a slab; returns the slab's size in bytes."""
    offset = 0
    for ref in refs:
        ref.offset = offset
        offset += align_bytes(ref.nbytes)
    return offset


def slab_view(buffer: torch.Tensor, ref: TensorRef) -> torch.Tensor:
    """The tensor's place in a uint8 slab, with the tensor's dtype and shape."""
    t = ref.tensor
    return buffer[ref.offset : ref.offset + ref.nbytes].view(t.dtype).view(t.shape)


def atoms_of(transformer: torch.nn.Module) -> list[tuple[str, str, torch.nn.Module]]:
    """(atom name, block name, module) in execution order: each block's children that hold tensors. The
    FLUX.2 blocks register their children in the order they run them (norm1, attn, norm2, ff, ...)."""
    atoms = []
    for list_name in BLOCK_LISTS:
        for i, block in enumerate(getattr(transformer, list_name)):
            block_name = f"{list_name}.{i}"
            for child_name, child in block.named_children():
                if tensor_refs([child]):
                    atoms.append((f"{block_name}.{child_name}", block_name, child))
    return atoms


def modules_outside_atoms(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The DiT's modules that belong to no atom (embedders, modulation, norm_out, proj_out): always
    resident. Their tensors are gathered with `tensor_refs(..., recurse=False)`."""
    atom_ids = {id(sub) for _, _, m in atoms_of(transformer) for sub in m.modules()}
    return [m for m in transformer.modules() if id(m) not in atom_ids]


def adapter_modules(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that hold LoRA weights: every child of a peft tuner layer but the wrapped `base_layer`,
    with its children. They are small; the streamer keeps them resident, wherever they sit, so switching
    adapters never touches a streamed slab. Gather their tensors with `tensor_refs(..., recurse=False)`."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    found: dict[int, torch.nn.Module] = {}
    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            for name, child in module.named_children():
                if name != "base_layer":
                    found.update((id(m), m) for m in child.modules())
    return list(found.values())


def _adapter_out_features(transformer: torch.nn.Module) -> int:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return 0
    layers = [m.get_base_layer() for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
    return max((getattr(layer, "out_features", 0) for layer in layers), default=0)


def spec_from_module(transformer: Any, vae: Any = None) -> ModelSpec:
    """Byte counts of a loaded DiT (as the slabs will hold them) for the planner; LoRA adapters are counted
    apart (`adapter_bytes`), as the streamer keeps them resident."""
    adapters = adapter_modules(transformer)
    skip = frozenset(id(m) for m in adapters)
    atoms = tuple(
        Atom(name, block, slab_layout(tensor_refs([m], skip=skip))) for name, block, m in atoms_of(transformer)
    )
    other_refs = tensor_refs(modules_outside_atoms(transformer), recurse=False, skip=skip)
    largest_tensor = max((ref.nbytes for ref in tensor_refs([transformer])), default=0)
    largest = 0
    for m in transformer.modules():
        if isinstance(m, torch.nn.Linear) and getattr(m.weight, "quant_state", None) is not None:
            largest = max(largest, m.in_features * m.out_features * 2)
    cfg = transformer.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    vae_bytes = 0
    vae_scale = 1.0
    if vae is not None:
        vae_bytes = sum(align_bytes(t.numel() * t.element_size()) for t in [*vae.parameters(), *vae.buffers()])
        vae_scale = vae.config.block_out_channels[0] / 128
    return ModelSpec(
        atoms=atoms,
        other_bytes=slab_layout(other_refs),
        adapter_bytes=slab_layout(tensor_refs(adapters, recurse=False)),
        adapter_out_features=_adapter_out_features(transformer),
        hidden=d,
        mlp_hidden=int(d * cfg.mlp_ratio),
        largest_dequantized_bytes=largest,
        vae_bytes=vae_bytes,
        largest_tensor_bytes=largest_tensor,
        vae_untiled_bytes_per_mpixel=int(VAE_UNTILED_BYTES_PER_MPIXEL * vae_scale),
        vae_tiled_bytes=int(VAE_TILED_BYTES * vae_scale),
    )
