"""What a user would write instead: FastAPI + PyTorch eager, one forward per request, same ViT
weights (runs/vit/checkpoint.pt, from `make models`). `uvicorn bench.naive:app`."""

from __future__ import annotations

import io

import torch
from fastapi import FastAPI, Request
from PIL import Image

from models.vit import ViT, ViTConfig
from service.settings import PROJECT_ROOT

checkpoint = torch.load(PROJECT_ROOT / "runs" / "vit" / "checkpoint.pt", map_location="cpu", weights_only=False)
model = ViT(ViTConfig(**checkpoint["config"])).eval()
model.load_state_dict(checkpoint["model"])
mean, std = checkpoint["preprocessing"]["mean"][0], checkpoint["preprocessing"]["std"][0]
labels = checkpoint["labels"]

app = FastAPI()


@app.post("/v1/classify")
async def classify(request: Request) -> dict[str, object]:
    image = Image.open(io.BytesIO(await request.body())).convert("L").resize((32, 32), Image.Resampling.BILINEAR)
    x = (torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float().view(1, 1, 32, 32) / 255 - mean) / std
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    top = probs.topk(5)
    return {
        "model": "naive",
        "results": [[{"label": labels[i], "score": float(p)} for p, i in zip(top.values, top.indices, strict=True)]],
    }
