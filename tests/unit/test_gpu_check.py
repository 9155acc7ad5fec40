"""bench.gpu_check, the GPU script's correctness step, run end to end on the CPU provider, with the
service taking every session for one with CUDA graphs on (as the tests of the CUDA-graph path do):
every check passes, and every check is there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench.gpu_check
import service.repository
import service.runtime
import service.sampling


def test_every_check_passes_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (service.runtime, service.repository, service.sampling, bench.gpu_check):
        monkeypatch.setattr(module, "cuda_graph", lambda session: True)
    with pytest.raises(SystemExit) as exited:
        bench.gpu_check.main(["--device", "cpu", "--results", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "check.jsonl").read_text().splitlines()]
    assert exited.value.code == 0 and all(row["ok"] for row in rows)
    checks = {row["check"] for row in rows}
    assert checks == {"probe", "placement", "replays", "pool"}
    placed = {(row["model"], row["graph"], row["cuda_graphs"]) for row in rows if row["check"] == "placement"}
    assert ("imagetransformer", "pooled_step", True) in placed and len(placed) == 2 * 8  # every graph, both ways
    replays = [row for row in rows if row["check"] == "replays"]
    assert {row["batch"] for row in replays} == {1, 2, 3, 5, 8, 11} and all(r["replayed"] == (r["batch"] <= 8)
                                                                            for r in replays)  # fmt: skip
    assert [row["cuda_graphs"] for row in rows if row["check"] == "pool"] == [False, True]
