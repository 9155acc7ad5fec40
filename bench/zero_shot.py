"""`python -m bench.zero_shot [--models tiny clipb32] [--requests N] [--repeats R] [--concurrency C ...] [--json PATH]`:
zero-shot requests per second with and without the label cache.

Each CLIP is saved as a Hugging Face folder with random weights and imported with `python -m export.hf`
(once; kept under bench/.cache/zero_shot/): `tiny`, the test suite's CLIP (32 px, 2 layers a tower), and
`clipb32`, ViT-B/32-sized (224 px, 12 vision layers of 768, 12 text layers of 512, 512-wide projection)
with the tiny word-level tokenizer. Two real servers load it, the label cache on (64 MiB) and off
(VITSERVE_LABEL_CACHE_BYTES=0); in every repeat they take turns answering N requests, each one JPEG photo
and the same 10 labels, C in flight. Requests/s are medians over the repeats; client and servers share
this machine's cores. With the cache a repeated label set costs one image pass; without it, every
request also runs the text graph over its labels."""

from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import time
from pathlib import Path
from typing import Any

import httpx2

from bench.common import report
from bench.hf import photos, server
from service.settings import PROJECT_ROOT

CACHE = PROJECT_ROOT / "bench" / ".cache" / "zero_shot"
LABELS = ["cat", "dog", "a red car", "temple", "sea", "a photo of a flower", "city street at night", "bird", "tree",
          "person"]  # fmt: skip


def clip_b32(folder: Path) -> Path:
    """A ViT-B/32-sized CLIP, random weights, the tiny test tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from tests.hf.checkpoints import tokenizer

    torch.manual_seed(0)
    text = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
            "num_attention_heads": 8, "max_position_embeddings": 77, "pad_token_id": 0, "bos_token_id": 2,
            "eos_token_id": 3}  # fmt: skip
    vision = {"image_size": 224, "patch_size": 32, "hidden_size": 768, "intermediate_size": 3072,
              "num_hidden_layers": 12, "num_attention_heads": 12}  # fmt: skip
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    tokenizer(bos=True, max_length=77).save_pretrained(folder)  # type: ignore[attr-defined]
    return folder


def imported(name: str) -> Path:
    """The model's repository, importing it first where it is not there yet."""
    from export import hf
    from tests.hf.checkpoints import clip

    repository = CACHE / "repository"
    if not (repository / name / "1" / "manifest.json").exists():
        folder = CACHE / "folders" / name
        (clip if name == "tiny" else clip_b32)(folder)
        started = time.perf_counter()
        hf.main([str(folder), "--name", name, "--repository", str(repository)])
        print(f"{name}: imported in {time.perf_counter() - started:.0f} s")
    return repository


async def rate(url: str, model: str, requests: int, concurrency: int, image: bytes) -> float:
    """Requests per second over `requests` zero-shot requests, `concurrency` in flight."""
    body = {"images": [base64.b64encode(image).decode()], "labels": LABELS, "model": model}
    pending = iter(range(requests))

    async def worker(http: httpx2.AsyncClient) -> None:
        for _ in pending:
            response = await http.post("/v1/zero-shot", json=body)
            assert response.status_code == 200, response.text

    started = time.perf_counter()
    async with httpx2.AsyncClient(base_url=url, timeout=120) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return requests / (time.perf_counter() - started)


def measure(name: str, requests: int, repeats: int, concurrency: list[int]) -> list[dict[str, Any]]:
    repository, image = imported(name), photos()[0]
    rows = []
    with server(repository) as cached, server(repository, VITSERVE_LABEL_CACHE_BYTES="0") as uncached:
        urls = {"cache on": cached, "cache off": uncached}
        for c in concurrency:
            for url in urls.values():  # warm-up: first runs, the cache filled
                asyncio.run(rate(url, name, max(c, 4), c, image))
            samples: dict[str, list[float]] = {label: [] for label in urls}
            for _ in range(repeats):  # interleaved: the servers take turns in every repeat
                for label, url in urls.items():
                    samples[label].append(asyncio.run(rate(url, name, requests, c, image)))
            on, off = (statistics.median(samples[label]) for label in urls)
            rows.append({"model": name, "concurrency": c, "cache on req/s": round(on, 1),
                         "cache off req/s": round(off, 1), "speed-up": round(on / off, 2)})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "clipb32"], choices=["tiny", "clipb32"])
    parser.add_argument("--requests", type=int, default=40, help="requests per server per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [row for name in args.models for row in measure(name, args.requests, args.repeats, args.concurrency)]
    report("zero_shot", rows, args.json)


if __name__ == "__main__":
    main()
