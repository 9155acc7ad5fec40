"""The service's floor: the same HTTP, input parsing, decoding and preprocessing as `/v1/classify`,
then a fixed answer instead of a model. `uvicorn bench.floor:app`."""

from __future__ import annotations

from fastapi import FastAPI, Request, Response

from service.budget import ImageLimits, MemoryBudget
from service.imaging import decode_all, open_all, preprocess_batch
from service.inputs import read_images
from service.manifest import read_manifest
from service.settings import PROJECT_ROOT

SPEC = read_manifest(PROJECT_ROOT / "model_repository" / "vit" / "1").preprocessing
LIMITS = ImageLimits(40_000_000, 100_000_000, 10**9, MemoryBudget(800_000_000))
ANSWER = b'{"model":"floor","results":[[{"label":"0","score":1.0}]]}'

app = FastAPI()


@app.post("/v1/classify")
async def classify(request: Request) -> Response:
    images, _ = await read_images(request, 64)
    preprocess_batch(decode_all(open_all(images, LIMITS), SPEC), SPEC)
    return Response(ANSWER, media_type="application/json")
