"""Batches cut to what they hold: a graph whose tensors are big per image (ImageGPT-small's attention
weights, 805 MB an image; its key/value cache, 100 MB in and 100 MB out) runs in smaller batches, and
a generation's step queues fewer images (each holds its cache until its generation ends)."""

from __future__ import annotations

from service.manifest import BatchPolicy, GraphSpec, TensorSpec
from service.repository import MAX_BATCH_BYTES, MAX_GENERATING_BYTES, image_bytes, within_memory
from tests.conftest import SHIPPED_REPOSITORY

POLICY = BatchPolicy(max_batch_size=32, max_queue_size=256)


def f32(name: str, *shape: int | str) -> TensorSpec:
    return TensorSpec(name=name, dtype="float32", shape=["batch", *shape])


PIXELS = TensorSpec(name="pixels", dtype="int64", shape=["batch", 1024])
ATTENTION = GraphSpec(file="attention.onnx", inputs=[PIXELS],
                      outputs=[f32("logits", 1024, 512), f32("attention", 24, 8, 1024, 1024)])  # fmt: skip
CACHE = [f32(f"{kind}.{i}", 8, 1024, 64) for kind in ("past_key_values", "present") for i in range(48)]
STEP = GraphSpec(
    file="step.onnx",
    inputs=[TensorSpec(name="previous", dtype="int64", shape=["batch"]), *CACHE[:48]],
    outputs=[f32("logits", 512), *CACHE[48:]],
)


def test_imagegpt_small_attention_runs_an_image_at_a_time() -> None:
    assert image_bytes(ATTENTION) == 8 * 1024 + 4 * 1024 * 512 + 4 * 24 * 8 * 1024**2  # 807 MB
    policy = within_memory(POLICY, ATTENTION, "attention")
    assert (policy.max_batch_size, policy.max_queue_size) == (1, 256)  # queued, a request holds its tokens only


def test_a_generation_step_queues_what_its_caches_fit() -> None:
    per_image = image_bytes(STEP)
    policy = within_memory(POLICY, STEP, "step")
    assert policy.max_batch_size == MAX_BATCH_BYTES // per_image == 5
    assert policy.max_queue_size == MAX_GENERATING_BYTES // per_image == 21


def test_small_graphs_keep_their_policy() -> None:
    from service.manifest import read_manifest

    for name in ("vit", "imagetransformer"):
        for graph, spec in read_manifest(SHIPPED_REPOSITORY / name / "1").graphs.items():
            assert within_memory(POLICY, spec, graph) == POLICY, (name, graph)


def test_a_cache_pool_has_no_more_slots_than_that() -> None:
    from service.repository import generating_images

    assert generating_images(STEP) == 21 and generating_images(ATTENTION) == 5
