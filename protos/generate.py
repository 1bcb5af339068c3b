"""Regenerate the Python code for every .proto under protos/ (run from anywhere: `python protos/generate.py`).

Protos are compiled with `-I protos`, so descriptors keep clean names ("disagg/v1/inference.proto");
the generated imports are then rewritten to be package-relative to `protos.` (e.g. `from
protos.disagg.v1 import inference_pb2`). tests/protos/test_generated_fresh.py runs `generate()`
into a temporary directory and fails when the checked-in code differs. Protos under protos/kserve/ put
their descriptors in protos/kserve/pool.py's pool (PRIVATE_POOLS).
"""
from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
_IMPORT = re.compile(r"^(\s*)(from|import) ((?:disagg|kserve)\.)", re.MULTILINE)
# protos under these folders put their descriptors in that package's own pool (protos/kserve/pool.py), not
# protobuf's default one: tritonclient's generated code defines the same `inference.*` names there
PRIVATE_POOLS = {"kserve": "protos.kserve.pool"}
_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*.proto"))


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc  # dev dependency: grpcio-tools
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")  # well-known types
    code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", *args])
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}: {args}")


def _fix_imports(path: Path, rel: Path) -> None:
    text = path.read_text()
    fixed = _IMPORT.sub(r"\1\2 protos.\3", text)
    pool = PRIVATE_POOLS.get(rel.parts[0])
    if pool is not None and _DEFAULT_POOL in fixed:
        fixed = fixed.replace("# @@protoc_insertion_point(imports)", f"# @@protoc_insertion_point(imports)\nfrom {pool} import POOL as _POOL", 1)
        fixed = fixed.replace(_DEFAULT_POOL, "_POOL.AddSerializedFile(")
    if fixed != text:
        path.write_text(fixed)


def generate(out_root: Path) -> list[Path]:
    """Compile every proto into out_root (mirroring protos/); return the generated files' relative paths."""
    out_root.mkdir(parents=True, exist_ok=True)
    protos = proto_files()
    names = [str(p) for p in protos]
    _protoc([f"--python_out={out_root}", f"--pyi_out={out_root}", *names])
    with_services = [str(p) for p in protos if re.search(r"^service ", (PROTO_ROOT / p).read_text(), re.M)]
    if with_services:
        _protoc([f"--grpc_python_out={out_root}", *with_services])
    generated = sorted(p.relative_to(out_root) for p in out_root.rglob("*")
                       if p.is_file() and p.name.endswith(GENERATED_SUFFIXES))
    for rel in generated:
        _fix_imports(out_root / rel, rel)
    return generated


def main() -> int:
    stale = [p for p in PROTO_ROOT.rglob("*") if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)]
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        for p in stale:
            p.unlink()
        for rel in files:
            dest = PROTO_ROOT / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / rel, dest)
            print(f"wrote protos/{rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
