"""Generate src/vmcache/_proto from protos/cache.proto (protobuf + purerpc code).

Run by `nox -s proto`; tests/test_proto.py runs it into a scratch directory and
checks that the committed files are identical.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "protos" / "cache.proto"
DEFAULT_OUT = ROOT / "src" / "vmcache" / "_proto"


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plugin = shutil.which("protoc-gen-purerpc", path=str(Path(sys.executable).parent))
    if plugin is None:
        raise SystemExit("protoc-gen-purerpc not found next to this Python: install purerpc")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO.parent}",
         f"--python_out={out}", f"--purerpc_out={out}",
         f"--plugin=protoc-gen-purerpc={plugin}", str(PROTO)],
        check=True,
    )
    grpc_file = out / "cache_grpc.py"
    # protoc writes a top-level import; inside our package it must be relative.
    text = grpc_file.read_text()
    text = text.replace("import cache_pb2 as", "from . import cache_pb2 as")
    grpc_file.write_text(text)
    docstring = '"""Code generated from protos/cache.proto by scripts/gen_proto.py."""\n'
    (out / "__init__.py").write_text(docstring)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
