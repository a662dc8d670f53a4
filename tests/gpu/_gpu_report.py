"""What the GPU tests share: the skip without CUDA, and where they leave their measured figures (one JSON
file per test in $FLUX2_GPU_REPORT_DIR when set, written before the test's assertions so a failing run is
recorded too)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest


def write_gpu_report(request: pytest.FixtureRequest, figures: dict[str, Any]) -> Path | None:
    directory = os.environ.get("FLUX2_GPU_REPORT_DIR")
    if not directory:
        return None
    import torch

    path = Path(directory) / (re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name).strip("_") + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "test": request.node.nodeid,
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "figures": figures,
    }
    try:
        import bitsandbytes
        import diffusers

        record.update(diffusers=diffusers.__version__, bitsandbytes=bitsandbytes.__version__)
    except ImportError:
        pass
    path.write_text(json.dumps(record, indent=1, sort_keys=True))
    return path


def needs_cuda(why: str) -> list[pytest.MarkDecorator]:
    """The `pytestmark` of a GPU test module: marked `gpu`, skipped without CUDA with `why` as the reason,
    and the whole card given back after each test (tests/conftest.py)."""
    import torch

    return [
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason=f"needs a CUDA GPU: {why}"),
        pytest.mark.usefixtures("uncapped_cuda_allocator"),
    ]
