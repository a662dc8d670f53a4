"""PNG text chunks the image ecosystem reads.

- `parameters`: the "infotext" AUTOMATIC1111's web UI writes, which Forge, Civitai and most image browsers
  parse (A1111 `modules/processing.py` `create_infotext`)::

      <prompt>
      Negative prompt: <negative prompt>          (only when there is one)
      Steps: 50, Sampler: Euler, CFG scale: 1.0, Distilled CFG Scale: 4.0, Seed: 0, Size: 1024x1024, Model: FLUX.2-dev

  The last line is `key: value` pairs joined by ", "; a value holding ",", ":" or a newline is written as a
  JSON string (A1111 `modules/infotext_utils.py` `quote`).
- `flux2_split`: every generation parameter as one JSON object, for programs.

No chunk is named `prompt` or `workflow`: ComfyUI reads those as its own workflow JSON when an image is
dropped on it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL.PngImagePlugin import PngInfo

    from .families import PipelineFamily

PARAMETERS_KEY = "parameters"
JSON_KEY = "flux2_split"

#: diffusers' FLUX.2 pipelines step FlowMatchEulerDiscreteScheduler: Euler steps on the flow ODE.
SAMPLER = "Euler"


def quote(value: object) -> str:
    """A value as A1111 writes it in the parameter line."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def infotext(prompt: str, fields: Mapping[str, object], negative_prompt: str = "") -> str:
    """The A1111 `parameters` text: prompt, optional negative prompt line, then `fields` (None values are
    left out, as A1111 does)."""
    line = ", ".join(f"{key}: {quote(value)}" for key, value in fields.items() if value is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def guidance_fields(family: PipelineFamily, guidance_scale: float) -> dict[str, float]:
    """How the guidance is labelled. FLUX.2-dev embeds it in the DiT and runs no negative pass: Forge's
    convention for guidance-distilled FLUX models, `CFG scale: 1` and `Distilled CFG Scale: <g>`. FLUX.2
    [klein] base models run real classifier-free guidance (`CFG scale: <g>`); step-distilled ones ignore it."""
    if not family.is_klein:
        return {"CFG scale": 1.0, "Distilled CFG Scale": float(guidance_scale)}
    return {"CFG scale": float(guidance_scale) if family.uses_cfg(guidance_scale) else 1.0}


def png_info(metadata: Mapping[str, Any], parameters: str | None = None) -> PngInfo:
    """The text chunks of one image: `parameters` (when given) and the JSON record."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters is not None:
        info.add_text(PARAMETERS_KEY, parameters)  # iTXt when the text is not Latin-1, as A1111's save does
    info.add_text(JSON_KEY, json.dumps(dict(metadata), sort_keys=True))
    return info


__all__ = ["JSON_KEY", "PARAMETERS_KEY", "SAMPLER", "guidance_fields", "infotext", "png_info", "quote"]
