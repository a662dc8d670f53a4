"""The `--frontends` response ring on a CUDA device (skipped without one): the memfd ring registers with
CUDA (`cudaHostRegister`), and an answer still on the device is copied straight into it, byte for byte,
where a front-end process's mapping of the same fd reads it.

    python -m pytest -m gpu tests/gpu -q
"""

from __future__ import annotations

import os

import torch
from _gpu_report import needs_cuda
from flux2_encoder_server.ipc import ResponseRing, RingView

pytestmark = needs_cuda("cudaHostRegister of the memfd response ring (run on an H200)")


def test_ring_registers_with_cuda_and_device_rows_land_in_it():
    ring = ResponseRing(64 << 20)
    assert ring.register_with_cuda()
    rows = torch.randn(2, 512, 15360, device="cuda").to(torch.bfloat16)
    offset = ring.alloc(rows.numel() * rows.element_size())
    assert offset is not None
    ring.write(offset, rows)
    view = RingView(os.dup(ring.fd), ring.size)  # what a front-end maps
    assert torch.equal(view.tensor(offset, torch.bfloat16, tuple(rows.shape)), rows.cpu())
