"""LitServe with its batching: a LitAPI doing the same decode, preprocessing and ONNX Runtime session
as the plain endpoint, batches of up to 32 gathered within 5 ms. Images come as a multipart form
field `file` (LitServe reads forms or JSON, not raw bodies; forms need python-multipart).
`python -m bench.peers.serve_litserve --port P` in bench/.venvs/litserve; POST /predict."""

import argparse
import os
from typing import Any

import litserve as ls
import numpy as np

from bench.peers.recipe import load, pixels, top_k


class ViT(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = load("vit")

    def decode_request(self, request):  # unannotated: LitServe then parses the form (or JSON) for us
        return pixels(request["file"].file.read(), self.model.prep)[0]

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.run(x)[0]

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> list[dict[str, Any]]:
        return top_k(output, self.model.labels)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    api = ViT(max_batch_size=32, batch_timeout=float(os.environ.get("PEER_QUEUE_DELAY_MS", "5")) / 1000)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1)
    server.run(host=args.host, port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
