"""`python -m bench.models [--repeats N] [--json PATH]`: ONNX Runtime against PyTorch eager, same
weights (each model is built with random weights and exported in this run), batch 1 and 32, for
each model at its shipped size and at a realistic size; and the realistic ViT's achieved FLOP/s
against this machine's matrix-multiply peak (an ONNX Runtime MatMul, same threads, same run)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from bench.common import interleaved, report
from export.detr import DETRForOnnx
from export.image_transformer import ScoreGraph
from export.onnx_export import to_onnx
from models.detr import DETR, DETRConfig
from models.image_transformer import ImageTransformer, ImageTransformerConfig
from models.vit import ViT, ViTConfig

VIT_B16 = ViTConfig(image_size=224, patch_size=16, in_channels=3, num_classes=1000, dim=768, depth=12, heads=12,
                    mlp_dim=3072, dropout=0.0)  # fmt: skip
# the largest DETR that runs in reason here: 384 px, stride 16, width 256, 6 + 6 layers, 100 queries
DETR_REALISTIC = DETRConfig(
    image_size=384, in_channels=3, num_classes=91, backbone_channels=[64, 128, 256, 512],
    dim=256, heads=8, encoder_layers=6, decoder_layers=6, ffn_dim=1024, num_queries=100,
)  # fmt: skip
IT_REALISTIC = ImageTransformerConfig(height=16, width=16, levels=256, dim=256, heads=8, layers=6, mlp_dim=1024,
                                      memory=64, dropout=0.0)  # fmt: skip


def vit_flops(cfg: ViTConfig) -> float:
    """Multiply-adds x 2 of one forward: patch embedding, attention projections and products, MLP, head."""
    n, d = cfg.grid**2 + 1, cfg.dim
    per_layer = 4 * n * d * d + 2 * n * n * d + 2 * n * d * cfg.mlp_dim
    patch = cfg.grid**2 * d * cfg.in_channels * cfg.patch_size**2
    return 2.0 * (cfg.depth * per_layer + patch + d * cfg.num_classes)


def matmul_peak(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of one big ONNX Runtime MatMul: this machine's practical peak."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [size, size])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm", [a, b], [c])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(
        model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"]
    )
    feeds = {"a": np.random.rand(size, size).astype(np.float32), "b": np.random.rand(size, size).astype(np.float32)}
    seconds = interleaved({"mm": lambda: session.run(None, feeds)}, repeats)["mm"]
    return 2.0 * size**3 / seconds


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return options


def compare(
    name: str,
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    inputs: list[str],
    outputs: list[str],
    folder: Path,
    repeats: int,
    threads: int,
) -> list[dict[str, object]]:
    module.eval()
    path = folder / f"{name}.onnx"
    to_onnx(module, tuple(t[:2] for t in example), path, inputs, outputs)
    session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    rows = []
    for batch in (1, 32):
        tensors = tuple(t[:batch] for t in example)
        feeds = {n: t.numpy() for n, t in zip(inputs, tensors, strict=True)}
        with torch.no_grad():
            seconds = interleaved(
                {"onnxruntime": lambda f=feeds: session.run(None, f), "pytorch": lambda t=tensors: module(*t)}, repeats
            )
        rows.append({
            "model": name, "batch": batch,
            "onnxruntime images/s": batch / seconds["onnxruntime"], "pytorch images/s": batch / seconds["pytorch"],
            "speed-up": seconds["pytorch"] / seconds["onnxruntime"],
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("bench/results/models.json"))
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    pixels = lambda cfg, n=32: torch.randint(0, cfg.levels, (n, cfg.length))  # noqa: E731
    labels = lambda cfg, n=32: torch.randint(0, cfg.num_classes, (n,))  # noqa: E731
    shipped_it, shipped_detr = ImageTransformerConfig(dropout=0.0), DETRConfig()
    image = ["pixel_values"]
    sequence = ["pixels", "labels"]
    cases = [
        ("vit (shipped, 32 px)", ViT(ViTConfig(dropout=0.0)), (torch.randn(32, 1, 32, 32),), image, ["logits"]),
        ("vit-b/16 (224 px)", ViT(VIT_B16), (torch.randn(32, 3, 224, 224),), image, ["logits"]),
        ("detr (shipped, 96 px)", DETRForOnnx(DETR(shipped_detr)), (torch.randn(32, 1, 96, 96),), image,
         ["logits", "boxes"]),
        ("detr (384 px, width 256, 6+6)", DETRForOnnx(DETR(DETR_REALISTIC)), (torch.randn(32, 3, 384, 384),), image,
         ["logits", "boxes"]),
        ("image transformer (shipped, 8x8 scoring)", ScoreGraph(ImageTransformer(shipped_it)),
         (pixels(shipped_it), labels(shipped_it)), sequence, ["logits", "log_likelihood"]),
        ("image transformer (16x16x256, width 256)", ScoreGraph(ImageTransformer(IT_REALISTIC)),
         (pixels(IT_REALISTIC), labels(IT_REALISTIC)), sequence, ["logits", "log_likelihood"]),
    ]  # fmt: skip
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, module, example, inputs, outputs) in enumerate(cases):
            rows += compare(f"m{i}", module, example, inputs, outputs, Path(tmp), args.repeats, threads)
            for row in rows[-2:]:
                row["model"] = name
    peak = matmul_peak(threads)
    vit_b = next(r for r in rows if r["model"] == "vit-b/16 (224 px)" and r["batch"] == 32)
    achieved = vit_flops(VIT_B16) * float(vit_b["onnxruntime images/s"])  # type: ignore[arg-type]
    report("models", rows, args.json)
    print(f"\nViT-B/16 at batch 32: {achieved / 1e9:.1f} GFLOP/s achieved against a {peak / 1e9:.1f} GFLOP/s "
          f"MatMul peak ({achieved / peak:.0%}), {threads} threads")  # fmt: skip
    if args.json:
        import json

        data = json.loads(args.json.read_text())
        data["vit_b16_flops"] = {"achieved": achieved, "matmul_peak": peak, "fraction": achieved / peak}
        args.json.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
