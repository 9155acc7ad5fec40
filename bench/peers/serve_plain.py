"""The plain endpoint: the FastAPI + onnxruntime app a user would write in twenty lines. A raw image
body, a full Pillow decode and the manifest's preprocessing, one `session.run` per request (no
batching), top-5 as JSON; all of it inline in the async handler, as most such apps do it.
`uvicorn bench.peers.serve_plain:app` in bench/.venvs/plain."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from bench.peers.recipe import detections, load, pixels, top_k

VIT, DETR = load("vit"), load("detr")
app = FastAPI()


@app.post("/v1/classify")
async def classify(request: Request) -> list[dict[str, Any]]:
    x, _ = pixels(await request.body(), VIT.prep)
    (logits,) = VIT.run(x[None])
    return top_k(logits[0], VIT.labels)


@app.post("/v1/detect")
async def detect(request: Request) -> list[dict[str, Any]]:
    x, size = pixels(await request.body(), DETR.prep)
    logits, boxes = DETR.run(x[None])
    return detections(logits[0], boxes[0], size, DETR)
