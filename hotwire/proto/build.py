"""Regenerate the Python code for hotwire.proto: ``python -m hotwire.proto.build [OUT_DIR]``.

Needs grpcio-tools (the ``dev`` extra). Imports in the generated gRPC module are
rewritten to be package-relative so the package works wherever it is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "hotwire.proto"


def build(out_dir: Path = HERE) -> list[Path]:
    from grpc_tools import protoc  # dev-only dependency

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{HERE}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(HERE / PROTO),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {HERE / PROTO}")
    grpc_file = out_dir / "hotwire_pb2_grpc.py"
    text = grpc_file.read_text()
    grpc_file.write_text(
        re.sub(r"^import hotwire_pb2", "from . import hotwire_pb2", text, flags=re.M)
    )
    return [out_dir / "hotwire_pb2.py", grpc_file]


if __name__ == "__main__":
    for path in build(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(path)
