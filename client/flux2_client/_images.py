"""Reading reference images (PIL only, no torch), with errors that name the file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


class ReferenceImageError(ValueError):
    """A reference image cannot be read or decoded; the message names the file and why."""


def load_reference_images(paths: Sequence[str | Path]) -> list[Any]:
    """Reference images as RGB PIL images, in order. Each is decoded whole here, so a corrupt, truncated
    or empty file fails now, naming it, rather than in the middle of a pipeline call."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except UnidentifiedImageError:
            size = Path(path).stat().st_size if Path(path).is_file() else None
            why = "an empty file" if size == 0 else "not an image format PIL can read"
            raise ReferenceImageError(f"{path}: {why}") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            # OSError: missing, unreadable or truncated; SyntaxError/ValueError: PIL's corrupt-header errors.
            raise ReferenceImageError(f"{path}: cannot be read as an image ({exc})") from None
    return images
