"""`vitserve`: serve, import a checkpoint, call a running server, or run a model over a folder offline.

    vitserve serve [flags of python -m service]       the server (vitserve serve --help)
    vitserve import DIR --name N [...]                 a Hugging Face checkpoint (python -m export.hf; the hf extra)
    vitserve classify|detect|embed IMAGE...            against --url ($VITSERVE_URL), key from $VITSERVE_API_KEY
    vitserve generate [--label L] [--stream] --out DIR PNGs into DIR
    vitserve models                                    what the server serves
    vitserve predict MODEL DIR --out results.jsonl     offline, every image under DIR, resumable

argparse, not Typer or Click: the CLI's dependencies stay those of the client (httpx2), and `serve`
and `import` hand their arguments to the argparse parsers that already define them."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeAlias

from vitserve.client import DEFAULT_URL, Client, EndpointMissing, Generated, GenerateOptions, Row, VitserveError

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
HF_MODULES = ("torch", "onnx", "transformers", "safetensors", "onnxruntime")


# serve and import: handed to the modules that own their flags ------------------------------------


def serve(argv: list[str]) -> int:
    from service.__main__ import main  # the server's flags are its own: python -m service --help

    main(argv, prog="vitserve serve")
    return 0


def import_checkpoint(argv: list[str]) -> int:
    missing = [name for name in HF_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        print(f"vitserve import needs {', '.join(missing)}, which are not installed: they come with the extras "
              "cpu, train and hf (pip install 'vitserve[cpu,train,hf]'; in a checkout: pip install -e "
              "'.[cpu,train,hf]')", file=sys.stderr)  # fmt: skip
        return 2
    importer = importlib.import_module("export.hf")  # torch's world: imported, not type-checked, from here
    importer.main(argv, prog="vitserve import")
    return 0


DELEGATED: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "serve": (serve, "serve the model repository (the flags of python -m service; vitserve serve --help)"),
    "import": (import_checkpoint, "import a Hugging Face checkpoint folder: DIR --name N (vitserve import --help)"),
}


# printing -----------------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = [headers, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def show(args: argparse.Namespace, result: Any, rows: list[list[str]], headers: list[str]) -> None:
    print(json.dumps(asdict(result) if hasattr(result, "__dataclass_fields__") else result) if args.json
          else table(headers, rows))  # fmt: skip


def box(d: Any) -> str:
    return f"{d.box.xmin:.1f},{d.box.ymin:.1f},{d.box.xmax:.1f},{d.box.ymax:.1f}"


# the remote commands ------------------------------------------------------------------------------


def classify(client: Client, args: argparse.Namespace) -> None:
    answer = client.classify(args.images, model=args.model, top_k=args.top_k)
    rows = [[image, p.label, f"{p.score:.4f}"] for image, ranked in zip(args.images, answer.results, strict=True)
            for p in ranked]  # fmt: skip
    show(args, answer, rows, ["image", "label", "score"])


def detect(client: Client, args: argparse.Namespace) -> None:
    answer = client.detect(args.images, model=args.model, threshold=args.threshold, max_detections=args.max_detections)
    rows = [[image, d.label, f"{d.score:.4f}", box(d)] for image, found in zip(args.images, answer.results, strict=True)
            for d in found]  # fmt: skip
    show(args, answer, rows, ["image", "label", "score", "box (xmin,ymin,xmax,ymax)"])


def embed(client: Client, args: argparse.Namespace) -> None:
    answer = client.embed(args.images, model=args.model)
    rows = [[image, str(answer.dimensions), " ".join(f"{v:.4f}" for v in vector[:4]) + " ..."]
            for image, vector in zip(args.images, answer.embeddings, strict=True)]  # fmt: skip
    show(args, answer, rows, ["image", "dimensions", "embedding"])


def generate_options(args: argparse.Namespace) -> GenerateOptions:
    chosen = {
        "model": args.model,
        "label": args.label,
        "num_images": args.num_images,
        "seed": args.seed,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "prime_rows": args.prime_rows,
        "scale": args.scale,
    }
    options: GenerateOptions = {k: v for k, v in chosen.items() if v is not None}  # type: ignore[assignment]
    return options


def rows_of(client: Client, model: str | None) -> int | None:
    """How many rows the generation model (that one, or the server's first) decodes: its height."""
    found = [m for m in client.models() if m.task == "generation" and m.state == "ready" and model in (None, m.name)]
    return found[0].input_size[0] if found and found[0].input_size else None


def streamed(client: Client, args: argparse.Namespace) -> Generated:
    """The generation's rows under a progress bar, then its answer."""
    from tqdm import tqdm

    with tqdm(total=rows_of(client, args.model), unit="row", desc="generating", file=sys.stderr) as bar:
        for event in client.generate_stream(prime=args.prime, **generate_options(args)):
            if isinstance(event, Row):
                bar.update(1)
            else:
                return event
    raise VitserveError(200, "stream_error", "the stream ended without its answer")


def generate(client: Client, args: argparse.Namespace) -> None:
    answer = streamed(client, args) if args.stream else client.generate(prime=args.prime, **generate_options(args))
    args.out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, png in enumerate(answer.images):
        path = args.out / f"{answer.model}-{answer.label or 'any'}-seed{answer.seed}-{i}.png"
        path.write_bytes(png)
        files.append(str(path))
    summary = {"model": answer.model, "label": answer.label, "seed": answer.seed, "size": answer.size, "files": files}
    show(args, summary, [[f, answer.label or "", str(answer.seed)] for f in files], ["file", "label", "seed"])


def models(client: Client, args: argparse.Namespace) -> None:
    found = client.models()
    rows = [[m.name, str(m.version or ""), m.task or "", m.state, ",".join(m.providers), m.reason or ""] for m in found]
    show(args, [m.raw for m in found], rows, ["name", "version", "task", "state", "providers", "reason"])


REMOTE: dict[str, Callable[[Client, argparse.Namespace], None]] = {
    "classify": classify, "detect": detect, "embed": embed, "generate": generate, "models": models,
}  # fmt: skip


# predict ------------------------------------------------------------------------------------------


def predict(args: argparse.Namespace) -> int:
    try:
        from vitserve import predict as offline
    except ImportError as exc:
        print(f"vitserve predict needs ONNX Runtime and tqdm ({exc}): pip install 'vitserve[cpu]'", file=sys.stderr)
        return 2
    options = {k: v for k, v in {"top_k": args.top_k, "threshold": args.threshold,
                                 "max_detections": args.max_detections}.items() if v is not None}  # fmt: skip
    try:
        predictor = offline.load(args.model, args.model_repository, options)
        counts = offline.predict(predictor, args.dir, args.out, args.batch_size)
        if args.coco:
            assert predictor.model.manifest is not None
            count = offline.write_coco(args.out, args.coco, predictor.model.manifest.labels, args.coco_annotations)
            print(f"{args.coco}: {count} detections in COCO's results format", file=sys.stderr)
    except offline.PredictError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {args.out} holds what was done; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"{args.out}: {counts['now']} images now, {counts['before']} before, {counts['errors']} not decodable; "
          f"{counts['skipped']} files under {args.dir} skipped (not images)", file=sys.stderr)  # fmt: skip
    return 0


# the parser ---------------------------------------------------------------------------------------


def remote_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--url", default=os.environ.get("VITSERVE_URL", DEFAULT_URL),
                        help=f"default $VITSERVE_URL or {DEFAULT_URL}; its key: $VITSERVE_API_KEY")  # fmt: skip
    parent.add_argument("--json", action="store_true", help="print the answer as JSON, not a table")
    parent.add_argument("--model", help="model name (default: the server's first of the task)")
    return parent


def add_remote(commands: Subparsers, parent: argparse.ArgumentParser) -> None:
    def image_command(name: str, text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, parents=[parent], help=text, description=text)
        command.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
        return command

    image_command("classify", "top-k labels of each image").add_argument("--top-k", type=int)
    found = image_command("detect", "labelled boxes in each image")
    found.add_argument("--threshold", type=float)
    found.add_argument("--max-detections", type=int)
    image_command("embed", "one vector per image (/v1/embed)")
    gen = commands.add_parser("generate", parents=[parent], help="sample images into a folder of PNGs")
    gen.add_argument("--out", type=Path, default=Path("generated"), help="folder for the PNGs (default: generated)")
    gen.add_argument("--stream", action="store_true", help="show each row as it is decoded (Server-Sent Events)")
    gen.add_argument("--prime", type=Path, help="an image whose top rows to complete")
    for flag, kind in (("--label", str), ("--num-images", int), ("--seed", int), ("--temperature", float),
                       ("--top-k", int), ("--prime-rows", int), ("--scale", int)):  # fmt: skip
        gen.add_argument(flag, type=kind)
    commands.add_parser("models", parents=[parent], help="the models the server serves")


def add_predict(commands: Subparsers) -> None:
    text = ("a classification or detection model over every image under DIR, offline (no server), as the service "
            "answers /v1/classify or /v1/detect; run again with the same --out to resume")  # fmt: skip
    command = commands.add_parser("predict", help=text, description=text)
    command.add_argument("model", metavar="MODEL", help="a classification or detection model of the repository")
    command.add_argument("dir", type=Path, metavar="DIR", help="the images (recursively)")
    command.add_argument("--out", type=Path, required=True, help="JSON lines; run again with it to resume")
    command.add_argument("--model-repository", type=Path, default=None, help="default: the service's setting")
    command.add_argument("--batch-size", type=int, default=32)
    command.add_argument("--top-k", type=int, help="classification: labels per image (default 5)")
    command.add_argument("--threshold", type=float, help="detection: lowest score (default 0.5)")
    command.add_argument("--max-detections", type=int, help="detection: most boxes per image (default 100)")
    command.add_argument("--coco", type=Path, help="detection: also write the detections as COCO results JSON")
    command.add_argument("--coco-annotations", type=Path,
                         help="a COCO data set whose images (file_name relative to DIR) and categories give the ids "
                         "(default: 1-based positions among the sorted paths and the model's labels)")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="vitserve", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, text) in DELEGATED.items():
        commands.add_parser(name, help=text, add_help=False)
    add_remote(commands, remote_parent())
    add_predict(commands)
    return top


def run_remote(args: argparse.Namespace) -> int:
    try:
        with Client(args.url) as client:
            REMOTE[args.command](client, args)
    except EndpointMissing as exc:
        print(f"error: the server at {args.url} does not offer {args.command}: {exc.message}", file=sys.stderr)
        return 1
    except VitserveError as exc:
        print(f"error: {exc.message} ({exc.code}{f', HTTP {exc.status}' if exc.status else ''})", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:  # every argument after it is the delegate's
        return DELEGATED[argv[0]][0](argv[1:])
    args = parser().parse_args(argv)
    if args.command == "predict":
        if args.batch_size < 1:
            parser().error("--batch-size must be at least 1")
        return predict(args)
    return run_remote(args)
