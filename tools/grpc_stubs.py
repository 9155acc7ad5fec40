"""`python -m tools.grpc_stubs [--check]`: the gRPC stubs of service/grpc_proto/grpc_predict_v2.proto,
generated with grpcio-tools' protoc (`--python_out`, `--pyi_out`) and checked in beside it, so that
neither an install nor the Docker image needs protoc.

One change to protoc's output: the messages go into a descriptor pool of their own, not protobuf's
default one. `tritonclient.grpc` and `kserve` each put their own `inference.*` messages into the
default pool, and a pool refuses a second definition of a name; with a pool of its own, the service
imports beside either of them (in a test process, a Ray Serve replica, a user's script).
`--check` writes nothing and exits 1 where the checked-in stubs differ from what protoc gives now."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from service.settings import PROJECT_ROOT

FOLDER = PROJECT_ROOT / "service" / "grpc_proto"
PROTO = "grpc_predict_v2.proto"
DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
OWN_POOL = "_descriptor_pool.DescriptorPool().AddSerializedFile("


def generate() -> dict[str, str]:
    """File name -> the text protoc writes for it, with the pool made the stubs' own."""
    from grpc_tools import protoc  # a dev dependency: only regenerating needs it

    with tempfile.TemporaryDirectory() as out:
        code = protoc.main(["protoc", f"-I{FOLDER}", f"--python_out={out}", f"--pyi_out={out}", str(FOLDER / PROTO)])
        if code != 0:
            raise SystemExit(f"protoc failed ({code})")
        files = {path.name: path.read_text() for path in Path(out).iterdir()}
    stub = PROTO.replace(".proto", "_pb2.py")
    if files[stub].count(DEFAULT_POOL) != 1:
        raise SystemExit(f"protoc's output no longer adds its file with {DEFAULT_POOL!r}: look at tools/grpc_stubs.py")
    files[stub] = files[stub].replace(DEFAULT_POOL, OWN_POOL)
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.grpc_stubs", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 where the checked-in stubs are stale")
    args = parser.parse_args(argv)
    stale = []
    for name, text in generate().items():
        path = FOLDER / name
        if path.exists() and path.read_text() == text:
            continue
        stale.append(name)
        if not args.check:
            path.write_text(text)
    if args.check and stale:
        print(f"stale gRPC stubs: {', '.join(stale)}; run python -m tools.grpc_stubs", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
