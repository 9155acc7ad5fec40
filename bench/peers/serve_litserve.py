"""LitServe with its batching: a LitAPI doing the same decode, preprocessing and ONNX Runtime session
as the plain endpoint, batches of up to PEER_MAX_BATCH (default 32; 1: no batching) gathered within
PEER_QUEUE_DELAY_MS (default 5). Images come as a multipart form field `file` (LitServe reads forms or
JSON, not raw bodies; forms need python-multipart). The model is the first of PEER_MODELS (default the
shipped ViT; bench/peers/recipe.py). `python -m bench.peers.serve_litserve --port P` in
bench/.venvs/litserve; POST /predict."""

import argparse
import os
from typing import Any

import litserve as ls
import numpy as np

from bench.peers.recipe import answer, load, pixels, run_each

Item = tuple[np.ndarray, tuple[int, int]]  # a model input and its image's original size


class Model(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = load(os.environ.get("PEER_MODELS", "vit").split(",")[0])

    def decode_request(self, request) -> Item:  # unannotated: LitServe then parses the form (or JSON) for us
        return pixels(request["file"].file.read(), self.model.prep)

    def batch(self, inputs: list[Item]) -> list[Item]:  # stacked by run_each, per input size
        return inputs

    def predict(self, items: Item | list[Item]) -> Any:
        batch = items if isinstance(items, list) else [items]
        outputs = run_each(self.model, [x for x, _ in batch])
        found = [answer(self.model, out, size) for out, (_, size) in zip(outputs, batch, strict=True)]
        return found if isinstance(items, list) else found[0]

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    batch, delay = int(os.environ.get("PEER_MAX_BATCH", "32")), float(os.environ.get("PEER_QUEUE_DELAY_MS", "5"))
    api = Model(max_batch_size=batch, batch_timeout=delay / 1000 if batch > 1 else 0.0)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1)
    server.run(host=args.host, port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
