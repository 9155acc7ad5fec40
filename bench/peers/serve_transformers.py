"""transformers' own `pipeline` on PyTorch behind a minimal FastAPI app, built as transformers' guide
"Web server inference" builds one: the web server only receives and answers, one loop runs the
pipeline, on a thread of its own (PyTorch is not async-aware, and the guide hands it to an executor),
taking whatever requests are queued (up to PEER_MAX_BATCH, default 1: one at a time; the guide's
dynamic batching waits 1 ms for each further one) into one call. PyTorch's threads as its CPU
performance-tuning guide advises: intra-op threads = physical cores (PEER_THREADS), one inter-op.

The checkpoint folder is PEER_CHECKPOINT, its route PEER_TASK (classify or detect). Runs in the project
venv: `uvicorn bench.peers.serve_transformers:app`; POST /v1/classify or /v1/detect, a raw image body."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import torch
from fastapi import FastAPI, Request
from PIL import Image
from transformers import pipeline

torch.set_num_threads(int(os.environ.get("PEER_THREADS", str(torch.get_num_threads()))))
torch.set_num_interop_threads(1)
TASK = os.environ["PEER_TASK"]
PIPE = pipeline({"classify": "image-classification", "detect": "object-detection"}[TASK],
                model=os.environ["PEER_CHECKPOINT"], device="cpu")  # fmt: skip
MAX_BATCH = int(os.environ.get("PEER_MAX_BATCH", "1"))
Pending = tuple[Image.Image, asyncio.Future[Any]]


async def server_loop(queue: asyncio.Queue[Pending]) -> None:
    loop, executor = asyncio.get_running_loop(), ThreadPoolExecutor(1)
    while True:
        pending = [await queue.get()]
        while len(pending) < MAX_BATCH:
            try:
                pending.append(await asyncio.wait_for(queue.get(), timeout=0.001))
            except TimeoutError:
                break
        images = [image for image, _ in pending]
        try:
            found = await loop.run_in_executor(executor, partial(PIPE, images, batch_size=len(images)))
        except Exception as exc:  # answered as a 500 to each of them
            found = [exc] * len(pending)
        for (_, future), answer in zip(pending, found, strict=True):
            future.set_exception(answer) if isinstance(answer, Exception) else future.set_result(answer)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.queue = asyncio.Queue()
    worker = asyncio.create_task(server_loop(app.state.queue))
    yield
    worker.cancel()


app = FastAPI(lifespan=lifespan)


@app.post(f"/v1/{TASK}")
async def infer(request: Request) -> Any:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    await request.app.state.queue.put((Image.open(io.BytesIO(await request.body())), future))
    return await future
