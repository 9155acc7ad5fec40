"""bench.peers' pieces that a wrong figure would hide in: the peers' own preprocessing and DETR boxes
against the service's for an imported (shortest-edge) recipe, batching by input size, the process
tree's CPU time, and each peer's candidate configurations."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bench.peers import procs, recipe
from bench.peers.real import CORES, Results, best_ceiling, configs
from bench.peers.servers import SERVERS
from bench.peers.workloads import WORKLOADS
from service.imaging import Decoded, preprocess_batch, resized_size
from service.manifest import Preprocessing
from service.outputs import detections

DETR = Preprocessing(color_mode="RGB", size=(800, 1333), resize="shortest_edge", shortest_edge=800, longest_edge=1333,
                     mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], reduced_decode=False)  # fmt: skip


def as_dict(spec: Preprocessing) -> dict[str, Any]:
    """The recipe as the manifest's JSON holds it, which is what the peers read."""
    return dict(json.loads(spec.model_dump_json()))


@pytest.mark.parametrize("longest", [1333, None])
def test_the_shortest_edge_resize_is_the_services(longest: int | None) -> None:
    spec = DETR.model_copy(update={"longest_edge": longest})
    for size in [(640, 480), (480, 640), (1280, 960), (427, 640), (3000, 400), (400, 3000), (800, 800), (801, 533)]:
        assert recipe.shortest_edge(*size, as_dict(spec)) == resized_size(*size, spec), size


def test_a_photo_preprocessed_by_a_peer_is_the_services_input() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (360, 480, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    ours, size = recipe.pixels(buffer.getvalue(), as_dict(DETR))
    theirs = preprocess_batch([Decoded(image, image.size)], DETR)[0]
    assert size == (480, 360) and ours.shape == theirs.shape == (3, 800, 1066)
    assert np.abs(ours - theirs).max() < 1e-6


def test_a_peers_detr_boxes_are_the_services() -> None:
    rng = np.random.default_rng(1)
    logits, boxes = rng.normal(0, 4, (20, 6)).astype(np.float32), rng.uniform(0.1, 0.6, (20, 4)).astype(np.float32)
    model = recipe.Model(None, as_dict(DETR), [f"class {i}" for i in range(5)], "detect")  # type: ignore[arg-type]
    ours = recipe.detections(logits, boxes, (640, 480), model)
    theirs = detections(logits, boxes, (640, 480), DETR, 0.5, 100)
    assert [d["label"] for d in ours] == [f"class {i}" for i in theirs.labels] and len(ours) > 3
    assert np.allclose([d["score"] for d in ours], theirs.scores)
    assert np.allclose([list(d["box"].values()) for d in ours], theirs.boxes)


def test_inputs_run_as_one_batch_per_size_and_answer_in_order() -> None:
    batches = []

    class Session:
        def get_inputs(self) -> list[Any]:
            return [type("Input", (), {"name": "x"})()]

        def run(self, outputs: None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            batches.append(feeds["x"].shape)
            return [feeds["x"].sum(axis=(1, 2, 3))]

    model = recipe.Model(Session(), {}, [], "classify")  # type: ignore[arg-type]
    inputs = [np.full((3, h, 4), i, np.float32) for i, h in enumerate([2, 5, 2, 5, 2])]
    found = recipe.run_each(model, inputs)
    assert sorted(batches) == [(2, 3, 5, 4), (3, 3, 2, 4)]
    assert [float(out[0]) for out in found] == [float(x.sum()) for x in inputs]


def test_a_process_trees_cpu_time_counts_its_children() -> None:
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {spin!r}])"
    parent = subprocess.Popen([sys.executable, "-c", child])  # a parent waiting on a child that works, then sleeps
    try:
        for _ in range(100):
            if len(procs.tree(parent.pid)) == 2 and procs.cpu_seconds(parent.pid) >= 0.3:
                break
            subprocess.run(["sleep", "0.05"])
        assert len(procs.tree(parent.pid)) == 2 and procs.cpu_seconds(parent.pid) >= 0.3
        assert procs.resident_bytes(parent.pid) > procs.resident_bytes(procs.tree(parent.pid)[1])
    finally:
        for pid in reversed(procs.tree(parent.pid)):
            subprocess.run(["kill", str(pid)])
        parent.wait()


def test_every_peer_has_its_documented_start_first_and_the_service_runs_as_started() -> None:
    workload = WORKLOADS["vit-b16"]
    assert [c.label for c in configs("service", workload)] == ["defaults"]
    plain = configs("plain", workload)
    assert plain[0].env == {"PEER_THREADS": str(CORES), "PEER_SPINNING": "1"} and len(plain) == 2
    for name in ("litserve", "pytriton"):
        found = configs(name, workload)
        assert len(found) == 2 * len(workload.batchers) and len({c.label for c in found}) == len(found)
        assert {c.env["PEER_MAX_BATCH"] for c in found} == {str(size) for size, _ in workload.batchers}
    assert [c.env["PEER_MAX_BATCH"] for c in configs("transformers", workload)] == ["1", "8"]


def test_each_server_is_asked_in_its_own_protocol() -> None:
    assert SERVERS["service"].route("detect", "detr50")(b"x", "image/jpeg").path == "/v1/detect?model=detr50"
    assert SERVERS["service"].encode(b"x", "image/png").path == "/v1/classify"  # digits: the default model
    assert SERVERS["pytriton"].route("detect", "detr50")(b"x", "image/jpeg").path == "/v2/models/detr/infer"
    found = [{"label": "a", "score": 0.9, "box": {}}]
    answer = {"outputs": [{"name": "detections", "data": [json.dumps(found)]}]}
    assert SERVERS["pytriton"].items(answer) == found
    answer = {"outputs": [{"name": "labels", "data": ["a", "b"]}, {"name": "scores", "data": [0.7, 0.2]}]}
    assert SERVERS["pytriton"].top1(answer) == ("a", 0.7)


def test_the_workloads_cache_under_bench() -> None:
    for workload in WORKLOADS.values():
        assert workload.repository.is_relative_to(Path(__file__).resolve().parents[2] / "bench" / ".cache")


def test_the_ceiling_at_a_concurrency_is_only_what_that_many_requests_can_batch() -> None:
    ceiling = {"batch 1": [5.0, 5.2], "batch 4": [5.4, 5.5]}
    results = Results(ceiling=ceiling, ceiling_batch={"batch 1": 1, "batch 4": 4})
    assert best_ceiling(results, 1) == ("batch 1", 5.1)  # one request in flight forms no batch of 4
    assert best_ceiling(results, 4) == ("batch 4", 5.45)
