"""`python -m bench.fast_path [--requests N] [--repeats N] [--json PATH]`: classify and detect cost
the same whether or not their model ships an attention graph (the plain routes never run it), and
what asking for attention costs. Two apps side by side in one process, through the real routes:
the shipped repository, and a copy with the attention graphs removed from the manifests, taking
turns request by request; the figure is the app's own time per request (the `total` of its
Server-Timing header, median), which leaves out the test client's own noise."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from fastapi.testclient import TestClient

from bench.common import report
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


def server_total(header: str) -> float:
    """The `total` stage of a Server-Timing header, in ms: the time the app spent on the request."""
    stages = dict(part.split(";dur=") for part in header.split(", "))
    return float(stages["total"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fast_path", description=__doc__)
    parser.add_argument("--requests", type=int, default=100, help="requests per repeat")
    parser.add_argument("--repeats", type=int, default=3)
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
                totals: dict[str, list[float]] = {"shipped": [], "plain": [], "attention": []}
                # the two apps take turns request by request; the attention route is timed on its own
                # afterwards, so its bigger graph does not evict the plain graph from the caches in between
                turns = [("shipped", shipped, route), ("plain", plain, route)] * (args.requests * args.repeats)
                alone = [("attention", shipped, f"{route}/attention")] * (args.requests * args.repeats)
                for key, client, path in turns + alone:
                    response = client.post(path, content=image, headers={"content-type": "image/png"})
                    assert response.status_code == 200
                    totals[key].append(server_total(response.headers["server-timing"]))
                ms = {key: statistics.median(values) for key, values in totals.items()}
                rows.append({
                    "route": route,
                    "server ms (shipped, with attention graph)": ms["shipped"],
                    "server ms (attention graph removed)": ms["plain"],
                    "ratio": ms["shipped"] / ms["plain"],
                    "server ms of its /attention route": ms["attention"],
                })  # fmt: skip
    report("fast_path", rows, args.json)


if __name__ == "__main__":
    main()
