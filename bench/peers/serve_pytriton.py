"""Triton Inference Server through `nvidia-pytriton`: a Python model bound with Triton's dynamic
batcher (batches of up to PEER_MAX_BATCH, default 32, 1: no batching; PEER_QUEUE_DELAY_MS, default 5)
that takes each image as a BYTES tensor and runs the same decode, preprocessing and ONNX Runtime
session as the plain endpoint. A classifier (model `vit`) answers the top-5 labels (BYTES) and scores
(FP32); a detector (model `detr`) its detections as the plain endpoint's JSON (BYTES). The model is
the first of PEER_MODELS (default the shipped ViT; bench/peers/recipe.py).
`python -m bench.peers.serve_pytriton --port P` in bench/.venvs/pytriton; Triton's v2 HTTP API at
/v2/models/<vit|detr>/infer.

Triton's Python-backend stub links whichever libpython3.x the loader finds first, the system's
when there is one, while it runs this venv's standard library: `bench.peers` points
LD_LIBRARY_PATH at the interpreter's own libpython (sysconfig's LIBDIR) before starting this."""

from __future__ import annotations

import argparse
import json
import os
import socket

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from bench.peers.recipe import answer, load, pixels, run_each

DELAY_US = int(float(os.environ.get("PEER_QUEUE_DELAY_MS", "5")) * 1000)  # longest wait for company
MAX_BATCH = int(os.environ.get("PEER_MAX_BATCH", "32"))

MODEL = load(os.environ.get("PEER_MODELS", "vit").split(",")[0])
NAMES = {"classify": "vit", "detect": "detr"}  # Triton's model name, by task


def answers(image: np.ndarray) -> list[list[dict[str, object]]]:
    """image `[batch, 1]` of encoded images -> each one's answer, as the plain endpoint's."""
    decoded = [pixels(row[0], MODEL.prep) for row in image]
    found = run_each(MODEL, [x for x, _ in decoded])
    return [answer(MODEL, outputs, size) for outputs, (_, size) in zip(found, decoded, strict=True)]


@batch
def classify(image: np.ndarray) -> dict[str, np.ndarray]:
    """-> labels `[batch, 5]` and scores `[batch, 5]`, best first."""
    found = answers(image)
    labels = np.array([[item["label"].encode() for item in top] for top in found], dtype=object)
    return {"labels": labels, "scores": np.array([[item["score"] for item in top] for top in found], np.float32)}


@batch
def detect(image: np.ndarray) -> dict[str, np.ndarray]:
    """-> detections `[batch, 1]`, each image's as JSON."""
    return {"detections": np.array([[json.dumps(found).encode()] for found in answers(image)], dtype=object)}


OUTPUTS = {
    "classify": [Tensor(name="labels", dtype=bytes, shape=(5,)), Tensor(name="scores", dtype=np.float32, shape=(5,))],
    "detect": [Tensor(name="detections", dtype=bytes, shape=(1,))],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    config = TritonConfig(http_address=args.host, http_port=args.port, grpc_address=args.host,
                          grpc_port=free_port(), allow_metrics=False)  # fmt: skip
    batcher = DynamicBatcher(max_queue_delay_microseconds=DELAY_US if MAX_BATCH > 1 else 0)
    with Triton(config=config) as triton:
        triton.bind(
            model_name=NAMES[MODEL.task],
            infer_func=classify if MODEL.task == "classify" else detect,
            inputs=[Tensor(name="image", dtype=bytes, shape=(1,))],
            outputs=OUTPUTS[MODEL.task],
            config=ModelConfig(max_batch_size=MAX_BATCH, batcher=batcher),
            strict=False,
        )
        triton.serve()


if __name__ == "__main__":
    main()
