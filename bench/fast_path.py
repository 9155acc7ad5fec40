"""`python -m bench.fast_path [--requests N] [--repeats N] [--json PATH]`: classify and detect cost
the same whether or not their model ships an attention graph (the plain routes never run it), and
what asking for attention costs. Two apps side by side in one process, through the real routes:
the shipped repository, and a copy with the attention graphs removed from the manifests."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from fastapi.testclient import TestClient

from bench.common import interleaved, report
from service.app import create_app
from service.manifest import MANIFEST_FILE
from service.settings import PROJECT_ROOT, Settings

SHIPPED = PROJECT_ROOT / "model_repository"


def without_attention(target: Path) -> Path:
    shutil.copytree(SHIPPED, target)
    for manifest_path in target.glob(f"*/*/{MANIFEST_FILE}"):
        manifest = json.loads(manifest_path.read_text())
        if manifest["graphs"].pop("attention", None):
            manifest_path.write_text(json.dumps(manifest))
            (manifest_path.parent / "attention.onnx").unlink()
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fast_path", description=__doc__)
    parser.add_argument("--requests", type=int, default=20, help="requests per timed run")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", type=Path, default=Path("bench/results/fast_path.json"))
    args = parser.parse_args(argv)
    digit = (PROJECT_ROOT / "examples" / "digit-7.png").read_bytes()
    scene = (PROJECT_ROOT / "examples" / "scene.png").read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        plain_repo = without_attention(Path(tmp) / "repo")
        with (
            TestClient(create_app(Settings(model_repository=SHIPPED))) as shipped,
            TestClient(create_app(Settings(model_repository=plain_repo))) as plain,
        ):
            rows = []
            for route, image in (("/v1/classify", digit), ("/v1/detect", scene)):

                def burst(client: TestClient, path: str, image: bytes = image) -> None:
                    for _ in range(args.requests):
                        assert (
                            client.post(path, content=image, headers={"content-type": "image/png"}).status_code == 200
                        )

                seconds = interleaved(
                    {
                        "shipped": lambda route=route: burst(shipped, route),
                        "no attention graph": lambda route=route: burst(plain, route),
                        "attention route": lambda route=route: burst(shipped, f"{route}/attention"),
                    },
                    args.repeats,
                )
                rows.append({
                    "route": route,
                    "requests/s (shipped, with attention graph)": args.requests / seconds["shipped"],
                    "requests/s (attention graph removed)": args.requests / seconds["no attention graph"],
                    "ratio": seconds["no attention graph"] / seconds["shipped"],
                    "requests/s of its /attention route": args.requests / seconds["attention route"],
                })  # fmt: skip
    report("fast_path", rows, args.json)


if __name__ == "__main__":
    main()
