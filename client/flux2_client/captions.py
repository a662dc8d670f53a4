"""Caption readers for bulk encoding: a text file, a JSONL file, or a DreamBooth-style image folder."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

__all__ = ["IMAGE_SUFFIXES", "read_captions"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def read_captions(path: str | Path, kind: str = "auto", field: str = "caption") -> list[str]:
    """Captions in input order (duplicates kept). `kind`: text (one caption per non-blank line), jsonl
    (the `field` of each JSON object per line), images (a folder of images with same-stem .txt files),
    or auto (a folder -> images, *.jsonl -> jsonl, anything else -> text)."""
    path = Path(path)
    if kind == "auto":
        kind = "images" if path.is_dir() else "jsonl" if path.suffix.lower() == ".jsonl" else "text"
    if kind == "text":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [line for line in lines if line.strip()]
    if kind == "jsonl":
        return list(_jsonl_captions(path, field))
    if kind == "images":
        return _sidecar_captions(path)
    raise ValueError(f"kind: expected auto, text, jsonl or images, got {kind!r}")


def _jsonl_captions(path: Path, field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc})") from None
            if not isinstance(record, dict) or field not in record:
                raise ValueError(f"{path}:{number}: no {field!r} field (choose it with --field)")
            if not isinstance(record[field], str):
                raise ValueError(f"{path}:{number}: {field!r} is {type(record[field]).__name__}, not a string")
            yield record[field]


def _sidecar_captions(folder: Path) -> list[str]:
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    missing = [p for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise ValueError(f"{folder}: {len(missing)} image(s) without a .txt caption, e.g. {missing[0].name}")
    return [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in images]
