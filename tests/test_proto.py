"""The committed generated code matches protos/cache.proto, and the wire contract is Kata's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vmcache._proto import cache_pb2

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), str(tmp_path)],
                   check=True, timeout=120)
    committed = ROOT / "src" / "vmcache" / "_proto"
    for name in ("cache_pb2.py", "cache_grpc.py", "__init__.py"):
        assert (tmp_path / name).read_text() == (committed / name).read_text(), (
            f"{name} is stale: run `nox -s proto` and commit the result")


def test_field_numbers_are_katas() -> None:
    expected = {
        "GrpcVMConfig": {"Data": 1, "AgentConfig": 2},
        "GrpcVM": {"id": 1, "hypervisor": 2, "proxyPid": 3, "proxyURL": 4, "cpu": 5,
                   "memory": 6, "cpuDelta": 7},
        "GrpcStatus": {"pid": 1, "vmstatus": 2},
        "GrpcVMStatus": {"pid": 1, "cpu": 2, "memory": 3},
    }
    for message, fields in expected.items():
        descriptor = cache_pb2.DESCRIPTOR.message_types_by_name[message]
        actual = {field.name: field.number for field in descriptor.fields}
        assert {name: actual[name] for name in fields} == fields
    service = cache_pb2.DESCRIPTOR.services_by_name["CacheService"]
    assert {m.name for m in service.methods} >= {"Config", "GetBaseVM", "Status", "Quit"}
