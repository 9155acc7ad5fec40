"""The plain endpoint: the FastAPI + onnxruntime app a user would write in twenty lines. A raw image
body, a full Pillow decode and the manifest's preprocessing, one `session.run` per request (no
batching), top-5 or the detections as JSON; all of it inline in the async handler, as most such apps
do it. `uvicorn bench.peers.serve_plain:app` in bench/.venvs/plain; the models and session settings
from the environment (bench/peers/recipe.py)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from bench.peers.recipe import answer, pixels, served

MODELS = served()
app = FastAPI()


@app.post("/v1/{task}")
async def infer(task: str, request: Request) -> list[dict[str, Any]]:
    model = MODELS[task]
    x, size = pixels(await request.body(), model.prep)
    return answer(model, [output[0] for output in model.run(x[None])], size)
