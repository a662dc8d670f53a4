"""Caption readers for bulk encoding: a text file, a JSONL file, or a DreamBooth-style image folder."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["BAD_LINE_CHOICES", "IMAGE_SUFFIXES", "read_captions"]

#: What to do with a line that is not valid UTF-8: refuse the file naming the line, or skip it (counted).
BAD_LINE_CHOICES = ("error", "skip")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def read_captions(
    path: str | Path,
    kind: str = "auto",
    field: str = "caption",
    *,
    bad_lines: str = "error",
    on_skip: Callable[[int, str], None] | None = None,
) -> list[str]:
    """Captions in input order (duplicates kept). `kind`: text (one caption per non-blank line), jsonl
    (the `field` of each JSON object per line), images (a folder of images with same-stem .txt files),
    or auto (a folder -> images, *.jsonl -> jsonl, anything else -> text).

    Lines end at a newline only ("\\n", or "\\r\\n"): U+2028, NEL and the other characters that
    `str.splitlines` also breaks on stay inside the caption, as people write them. A line that is not
    valid UTF-8 raises ValueError naming the line (`bad_lines="error"`), or is skipped and reported to
    `on_skip(line_number, reason)` (`bad_lines="skip"`)."""
    if bad_lines not in BAD_LINE_CHOICES:
        raise ValueError(f"bad_lines: expected one of {', '.join(BAD_LINE_CHOICES)}, got {bad_lines!r}")
    path = Path(path)
    if kind == "auto":
        kind = "images" if path.is_dir() else "jsonl" if path.suffix.lower() == ".jsonl" else "text"
    if kind == "text":
        return [line for _, line in _lines(path, bad_lines, on_skip) if line.strip()]
    if kind == "jsonl":
        return list(_jsonl_captions(path, field, bad_lines, on_skip))
    if kind == "images":
        return _sidecar_captions(path)
    raise ValueError(f"kind: expected auto, text, jsonl or images, got {kind!r}")


def _lines(path: Path, bad_lines: str, on_skip: Callable[[int, str], None] | None) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, split on newlines only and decoded one line at a time, so a bad
    byte is reported with its line."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as some editors write
        data = data[3:]
    for number, raw in enumerate(data.split(b"\n"), 1):
        raw = raw.removesuffix(b"\r")
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            reason = f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1} is not valid UTF-8"
            if bad_lines == "skip":
                if on_skip is not None:
                    on_skip(number, reason)
                continue
            raise ValueError(f"{path}:{number}: {reason} (fix the line, or pass --bad-lines skip)") from None


def _jsonl_captions(
    path: Path, field: str, bad_lines: str, on_skip: Callable[[int, str], None] | None
) -> Iterator[str]:
    for number, line in _lines(path, bad_lines, on_skip):
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
    captions = []
    for image in images:
        try:
            captions.append(image.with_suffix(".txt").read_text(encoding="utf-8").strip())
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{image.with_suffix('.txt')}: byte {exc.start + 1} is not valid UTF-8 (save it as UTF-8)"
            ) from None
    return captions
