"""Regenerate (or check) the Python code for the v1 contract.

    python -m flux2split_proto.generate          # rewrite the committed stubs
    python -m flux2split_proto.generate --check  # exit 1 if the committed stubs are stale

The output depends on the grpcio-tools version, which the `dev` extra pins for that reason.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent
PROTO_FILES = ["flux2split_proto/v1/encoder.proto"]
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_files(root: Path) -> list[Path]:
    return sorted(root / (proto[: -len(".proto")] + suffix) for proto in PROTO_FILES for suffix in GENERATED_SUFFIXES)


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc on the contract found below `proto_root`, writing the Python modules below `out_dir`."""
    from grpc_tools import protoc  # dev-only dependency

    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in PROTO_FILES:
        (out_dir / proto).parent.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return generated_files(out_dir)


def stale_files(proto_root: Path = PROTO_ROOT) -> list[str]:
    """Generated files below `proto_root` that are missing or differ from a fresh protoc run."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp), proto_root)
        stale = []
        for fresh_file, committed in zip(fresh, generated_files(proto_root), strict=True):
            if not committed.exists() or not filecmp.cmp(fresh_file, committed, shallow=False):
                stale.append(str(committed.relative_to(proto_root)))
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the committed stubs are fresh")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated stubs: " + ", ".join(stale), file=sys.stderr)
            print("run: python -m flux2split_proto.generate", file=sys.stderr)
            return 1
        print("generated stubs are fresh")
        return 0
    for path in generate(PROTO_ROOT):
        print(f"wrote {path.relative_to(PROTO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
