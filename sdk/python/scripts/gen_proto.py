"""Regenerates the gRPC client code of saga_participant from the repository's proto file.

    pip install "./sdk/python[test]"      # brings grpcio-tools
    python sdk/python/scripts/gen_proto.py

writes ``src/saga_participant/_proto/saga_pb2.py``, ``saga_pb2.pyi`` and ``saga_pb2_grpc.py``
from ``proto/saga/v1/saga.proto``. The output is committed, so installing the SDK needs neither
protoc nor the proto file; ``tests/test_grpc.py`` fails when it no longer matches the proto.
``python gen_proto.py OUT_DIR`` writes elsewhere (the test's check).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

SDK = Path(__file__).resolve().parents[1]
PROTO_ROOT = SDK.parents[1] / "proto"
PROTO = "saga/v1/saga.proto"
TARGET = SDK / "src" / "saga_participant" / "_proto"
FILES = ("saga_pb2.py", "saga_pb2.pyi", "saga_pb2_grpc.py")


def generate(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        well_known = Path(protoc.__file__).parent / "_proto"
        code = protoc.main([
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO,
        ])
        if code != 0:
            raise SystemExit(f"protoc failed ({code})")
        out.mkdir(parents=True, exist_ok=True)
        generated = Path(tmp) / "saga" / "v1"
        for name in FILES:
            text = (generated / name).read_text(encoding="utf-8")
            # protoc writes an absolute import of the proto's package (`saga.v1`); the modules
            # live inside saga_participant instead.
            text = text.replace("from saga.v1 import saga_pb2", "from . import saga_pb2")
            (out / name).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else TARGET)
