"""`python3 bench/gpu_requirements.py [--cuda-libs 0|1] [--tensorrt 0|1]`: the requirements the offline
GPU check installs, one per line, read from pyproject.toml (so nothing is pinned twice): the service's
dependencies, the `gpu` extra's onnxruntime-gpu (with or without its [cuda,cudnn] wheels), the
`tensorrt` extra if asked, and pytest with the tests' HTTP client. Standard library only: it runs
before anything is installed (tools/gpu-wheels fetches them, bench/gpu.sh installs them)."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
TEST_TOOLS = ("pytest==", "httpx2==")


def requirements(cuda_libs: bool, tensorrt: bool) -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras = project["optional-dependencies"]
    (gpu,) = extras["gpu"]
    if not cuda_libs:
        gpu = re.sub(r"\[.*\]", "", gpu)
    tools = [r for r in extras["dev"] if r.startswith(TEST_TOOLS)]
    return [*project["dependencies"], gpu, *(extras["tensorrt"] if tensorrt else []), *tools]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cuda-libs", type=int, choices=[0, 1], default=1)
    parser.add_argument("--tensorrt", type=int, choices=[0, 1], default=0)
    args = parser.parse_args()
    print("\n".join(requirements(bool(args.cuda_libs), bool(args.tensorrt))))
