"""Triton Inference Server through `nvidia-pytriton`: a Python model bound with Triton's dynamic
batcher (batches of up to 32, 5 ms queue delay) that takes each PNG as a BYTES tensor and runs the
same decode, preprocessing and ONNX Runtime session as the plain endpoint, answering the top-5
labels (BYTES) and scores (FP32). `python -m bench.peers.serve_pytriton --port P` in
bench/.venvs/pytriton; Triton's v2 HTTP API at /v2/models/vit/infer.

Triton's Python-backend stub links whichever libpython3.x the loader finds first, the system's
when there is one, while it runs this venv's standard library: `bench.peers` points
LD_LIBRARY_PATH at the interpreter's own libpython (sysconfig's LIBDIR) before starting this."""

from __future__ import annotations

import argparse
import os
import socket

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from bench.peers.recipe import load, pixels, softmax

DELAY_US = int(float(os.environ.get("PEER_QUEUE_DELAY_MS", "5")) * 1000)  # longest wait for company

VIT = load("vit")
LABELS = np.array([label.encode() for label in VIT.labels], dtype=object)


@batch
def infer(image: np.ndarray) -> dict[str, np.ndarray]:
    """image `[batch, 1]` of PNG bytes -> labels `[batch, 5]` and scores `[batch, 5]`, best first."""
    x = np.stack([pixels(row[0], VIT.prep)[0] for row in image])
    probs = softmax(VIT.run(x)[0].astype(np.float64))
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :5]
    return {"labels": LABELS[order], "scores": np.take_along_axis(probs, order, -1).astype(np.float32)}


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
    with Triton(config=config) as triton:
        triton.bind(
            model_name="vit",
            infer_func=infer,
            inputs=[Tensor(name="image", dtype=bytes, shape=(1,))],
            outputs=[
                Tensor(name="labels", dtype=bytes, shape=(5,)),
                Tensor(name="scores", dtype=np.float32, shape=(5,)),
            ],
            config=ModelConfig(max_batch_size=32, batcher=DynamicBatcher(max_queue_delay_microseconds=DELAY_US)),
            strict=False,
        )
        triton.serve()


if __name__ == "__main__":
    main()
