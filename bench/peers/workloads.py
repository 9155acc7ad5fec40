"""The real-size workloads of `python -m bench.peers --workload ...`: a model built with transformers'
own classes (random weights, never downloaded), saved as a Hugging Face folder and imported with
`python -m export.hf` as a user would, once (kept under bench/.cache/peers/<workload>/)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.hf import checkpoint as vit_b16

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "bench" / ".cache" / "peers"


def detr_r50(folder: Path) -> Path:
    """A DETR-ResNet-50-shaped detector (transformers' own ResNet-50, not timm's; 41.5 M parameters, 91
    labels, 100 queries) and its image processor at the native 800-pixel shortest edge (longest 1,333).
    Random queries all look alike (every query gives one label at about 0.02); the class head, the
    query embeddings and the cross-attention are scaled up, as tests/hf/checkpoints.py does for its tiny
    DETR, so that queries differ and about 90 of 100 pass the usual 0.5 threshold with several labels."""
    import torch
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessorPil, ResNetConfig

    if (folder / "model.safetensors").exists():
        return folder
    torch.manual_seed(0)
    labels = {i: f"class {i}" for i in range(91)}
    config = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False,
                        backbone_config=ResNetConfig(out_features=["stage4"]), id2label=labels,
                        label2id={v: k for k, v in labels.items()})  # fmt: skip
    model = DetrForObjectDetection(config)
    with torch.no_grad():
        model.class_labels_classifier.weight.mul_(30)
        model.model.query_position_embeddings.weight.mul_(30)
        for layer in model.model.decoder.layers:
            layer.encoder_attn.q_proj.weight.mul_(10)
            layer.encoder_attn.k_proj.weight.mul_(10)
    model.save_pretrained(folder)
    DetrImageProcessorPil().save_pretrained(folder)  # shortest edge 800, longest 1333, bilinear
    return folder


@dataclass(frozen=True)
class Workload:
    name: str
    task: str  # the route: classify or detect
    model: str  # its name in the repository
    build: Callable[[Path], Path]  # writes the checkpoint folder
    batch_sizes: tuple[int, ...]  # the ceiling's sweep
    concurrency: tuple[int, ...]  # defaults of the main rounds
    seconds: float  # default length of a timed run
    batchers: tuple[tuple[int, float], ...]  # LitServe's and Triton's candidates: (max batch, queue delay ms)

    @property
    def folder(self) -> Path:
        return CACHE / self.name

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint"

    @property
    def repository(self) -> Path:
        return self.folder / "repository"


WORKLOADS = {
    "vit-b16": Workload("vit-b16", "classify", "vitb16", vit_b16, (1, 2, 4, 8), (1, 4, 16), 10.0,
                        ((1, 0), (8, 5), (16, 20))),
    "detr-r50": Workload("detr-r50", "detect", "detr50", detr_r50, (1, 2), (1, 4), 15.0, ((1, 0), (4, 20))),
}  # fmt: skip


def prepare(workload: Workload) -> None:
    """The checkpoint folder, then its import into the workload's own repository (each once)."""
    workload.build(workload.checkpoint)
    if (workload.repository / workload.model / "1" / "manifest.json").exists():
        return
    print(f"importing {workload.checkpoint} with python -m export.hf (once)", flush=True)
    command = [sys.executable, "-m", "export.hf", str(workload.checkpoint), "--name", workload.model,
               "--repository", str(workload.repository)]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True)
