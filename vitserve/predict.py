"""`vitserve predict MODEL DIR --out results.jsonl`: a classification or detection model over every
image under DIR, offline (no HTTP), with the service's own stages: the model loaded by the
repository code, each image decoded and preprocessed by its task's pipeline (in a thread pool), the
images run in batches (ONNX Runtime on every core), each image's outputs postprocessed as the route
would. Each line of the output is `{"path": <relative to DIR>, "results": [...]}`, `results` being
what /v1/classify or /v1/detect answers for that one image (or `{"path", "error": {"code",
"message"}}` for a file the service would refuse). Run again with the same output, it goes on where
it stopped: paths already there are skipped, and a last line cut short by an interrupt is dropped (an
output file with a whole line that is no result is refused, untouched)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import ValidationError
from tqdm import tqdm

from service.budget import ImageLimits
from service.errors import ServiceError
from service.manifest import CLASSIFICATION, DETECTION, read_manifest
from service.pipeline import ImagePipeline, Job, ModelOptions
from service.repository import ServedModel, latest_version, load_version
from service.runtime import DeviceUnavailable, check_device, every_core
from service.settings import Settings
from service.tasks import TASKS, manifest_checks
from service.tasks.classify import CLASSIFY
from service.tasks.detect import DETECT

# what service.imaging.FORMATS opens, by the names such files carry; other files are skipped
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
# the manifest's task -> the pipeline of its /v1 route
PIPELINES: dict[str, ImagePipeline[Any, Any]] = {CLASSIFICATION: CLASSIFY, DETECTION: DETECT}
T = TypeVar("T")


class PredictError(Exception):
    """Why predict cannot run (printed as is)."""


@dataclass
class Prepared:
    """One image decoded and preprocessed, waiting for its batch's run; or why it cannot be."""

    path: str
    job: Job[Any] | None = None
    feeds: dict[str, np.ndarray] | None = None
    error: ServiceError | None = None


@dataclass
class Predictor:
    model: ServedModel
    pipeline: ImagePipeline[Any, Any]
    options: ModelOptions
    limits: ImageLimits

    def prepare(self, root: Path, path: str) -> Prepared:
        """Decode and preprocess (in a pool thread), as the route's pipeline does for one image."""
        assert self.model.manifest is not None
        job: Job[Any] = Job(self.model, self.model.manifest, self.options, self.pipeline.graph)
        try:
            feeds = self.pipeline.prepare(job, [(root / path).read_bytes()], self.limits)
        except ServiceError as exc:
            return Prepared(path, error=exc)
        except OSError as exc:  # unreadable (permissions, gone since the listing)
            return Prepared(path, error=ServiceError(0, "unreadable", f"{type(exc).__name__}: {exc.strerror}"))
        return Prepared(path, job, feeds[0] if isinstance(feeds, list) else feeds)

    def run(self, batch: list[Prepared]) -> list[dict[str, Any]]:
        """One run per input shape in the batch (images of one size share it), each image's outputs
        postprocessed: one output line per image, in batch order."""
        lines: dict[str, dict[str, Any]] = {}
        for group in by_shape(p for p in batch if p.error is None).values():
            for prepared, outputs in zip(group, self._outputs(group), strict=True):
                assert prepared.job is not None
                answer = self.pipeline.finish(prepared.job, outputs)
                lines[prepared.path] = {"path": prepared.path, "results": answer.model_dump(mode="json")["results"][0]}
        for p in batch:
            if p.error is not None:
                lines[p.path] = {"path": p.path, "error": {"code": p.error.code, "message": p.error.message}}
        return [lines[p.path] for p in batch]

    def _outputs(self, group: list[Prepared]) -> list[list[np.ndarray]]:
        """The group's images run together, the outputs split back per image (as the batcher does)."""
        feeds = {name: np.concatenate([p.feeds[name] for p in group if p.feeds]) for name in group[0].feeds or {}}
        outputs = self.model.run_now(feeds, self.pipeline.graph)
        offsets = np.cumsum([len(next(iter(p.feeds.values()))) for p in group if p.feeds])[:-1]
        parts = [np.split(output, offsets) for output in outputs]
        return [[part[i] for part in parts] for i in range(len(group))]


def by_shape(prepared: Iterable[Prepared]) -> dict[tuple[Any, ...], list[Prepared]]:
    groups: dict[tuple[Any, ...], list[Prepared]] = {}
    for p in prepared:
        assert p.feeds is not None
        groups.setdefault(tuple((name, a.shape) for name, a in p.feeds.items()), []).append(p)
    return groups


def offline_settings(repository: Path) -> Settings:
    """The service's settings ($VITSERVE_... included) for one process that owns the machine: ONNX
    Runtime on every core, no batcher (predict forms its own batches), attention graphs left unloaded."""
    settings = Settings().model_copy(
        update={"model_repository": repository, "intra_op_threads": every_core(), "batching": False,
                "lazy_attention": True}
    )  # fmt: skip
    try:
        return check_device(settings)
    except DeviceUnavailable as exc:
        raise PredictError(str(exc)) from exc


def model_names(repository: Path) -> list[str]:
    if not repository.is_dir():
        return []
    return [p.name for p in sorted(repository.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def load(name: str, repository: Path | None, options: dict[str, Any]) -> Predictor:
    """The model's highest version, loaded by the repository code as the service loads it (from the
    service's repository where `repository` is None)."""
    repository = repository or Settings().model_repository
    model_dir = repository / name
    if not model_dir.is_dir() or name.startswith("."):
        raise PredictError(
            f"no model {name!r} in {repository} (models: {', '.join(model_names(repository)) or 'none'})"
        )
    try:
        version_dir = latest_version(model_dir)
        pipeline = PIPELINES.get(read_manifest(version_dir).task)
        if pipeline is None:
            raise PredictError(f"model {name!r} is a {read_manifest(version_dir).task} model; predict runs "
                               f"{', '.join(PIPELINES)}")  # fmt: skip
        chosen = pipeline.options(model=name, **options)
    except ValidationError as exc:  # options the task refuses
        raise PredictError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from exc
    except (OSError, ValueError) as exc:  # no version folder, an invalid manifest
        raise PredictError(str(exc)) from exc
    settings = offline_settings(repository)
    model = load_version(version_dir, settings, manifest_checks(TASKS))
    if model.state != "ready":
        raise PredictError(f"model {name!r} did not load: {model.reason}")
    return Predictor(model, pipeline, chosen, ImageLimits.of(settings))


def image_paths(root: Path) -> tuple[list[str], int]:
    """Every image under `root` (recursively) as a sorted path relative to it, and how many other
    files were skipped."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    images = [p.relative_to(root).as_posix() for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    return images, len(files) - len(images)


def done_paths(out: Path) -> list[str]:
    """The paths an earlier run wrote to `out`, in order. A last line cut short (a run interrupted as
    it wrote) is cut off the file; a whole line that is no result (the file is another's, or damaged)
    is a PredictError, the file left as it is."""
    if not out.exists():
        return []
    done, good = [], 0
    with out.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.endswith(b"\n"):
                break  # the last line: where an interrupted run stopped writing
            try:
                done.append(str(json.loads(line)["path"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise PredictError(f"{out}: line {number} is not a result of vitserve predict ({type(exc).__name__}); "
                                   "name another --out, or mend the file") from None  # fmt: skip
            good += len(line)
    if good < out.stat().st_size:
        print(f"{out}: dropped {out.stat().st_size - good} bytes of an interrupted line", file=sys.stderr)
        os.truncate(out, good)
    return done


def chunked(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def ahead(pool: ThreadPoolExecutor, predictor: Predictor, root: Path, paths: list[str], size: int) -> Iterator[
    list[Prepared]]:  # fmt: skip
    """The paths prepared in the pool in batches of `size`, the next batch under way while this one runs."""
    pending: list[Future[Prepared]] = []
    for chunk in chunked(paths, size):
        submitted = [pool.submit(predictor.prepare, root, path) for path in chunk]
        if pending:
            yield [f.result() for f in pending]
        pending = submitted
    if pending:
        yield [f.result() for f in pending]


def predict(predictor: Predictor, root: Path, out: Path, batch_size: int) -> dict[str, int]:
    """Every image under `root` not yet in `out`, appended to it batch by batch (one write and flush
    per batch). Returns the counts: images, done before, done now, errors, skipped files."""
    if not root.is_dir():
        raise PredictError(f"{root} is not a folder")
    paths, skipped = image_paths(root)
    try:
        done = set(done_paths(out))
        sink = out.open("a")
    except OSError as exc:  # a folder, a missing folder, no permission
        raise PredictError(f"cannot write the results to {out}: {exc.strerror or exc}") from exc
    todo = [p for p in paths if p not in done]
    counts = {"images": len(paths), "before": len(paths) - len(todo), "now": 0, "errors": 0, "skipped": skipped}
    bar = tqdm(total=len(paths), initial=counts["before"], unit="img", desc=predictor.model.name, file=sys.stderr)
    with ThreadPoolExecutor(every_core(), thread_name_prefix="decode") as pool, sink, bar:
        for batch in ahead(pool, predictor, root, todo, batch_size):
            lines = predictor.run(batch)
            sink.write("".join(json.dumps(line) + "\n" for line in lines))
            sink.flush()
            counts["now"] += len(lines)
            counts["errors"] += sum("error" in line for line in lines)
            bar.update(len(lines))
    return counts


# COCO results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CocoIds:
    """COCO's numbering of images and categories."""

    images: dict[str, int]  # path relative to DIR -> image id
    categories: dict[str, int]  # label -> category id


def coco_ids(annotations: Path | None, paths: list[str], labels: list[str]) -> CocoIds:
    """From a COCO data set (`images`: `file_name`, relative to DIR, -> `id`; `categories`: `name` ->
    `id`) where given; else each path's 1-based position among the sorted paths, and each label's
    1-based position among the manifest's labels (as export/scenes.py numbers the digit scenes)."""
    if annotations is None:
        return CocoIds({p: i for i, p in enumerate(sorted(paths), 1)}, {name: i for i, name in enumerate(labels, 1)})
    data = json.loads(annotations.read_text())
    return CocoIds({image["file_name"]: int(image["id"]) for image in data["images"]},
                   {c["name"]: int(c["id"]) for c in data["categories"]})  # fmt: skip


def coco_result(image_id: int, category_id: int, detection: dict[str, Any]) -> dict[str, Any]:
    box = detection["box"]
    xywh = [box["xmin"], box["ymin"], box["xmax"] - box["xmin"], box["ymax"] - box["ymin"]]
    return {"image_id": image_id, "category_id": category_id, "bbox": xywh, "score": detection["score"]}


def write_coco(out: Path, coco: Path, labels: list[str], annotations: Path | None = None) -> int:
    """The detections in `out` as a COCO results file (pycocotools' loadRes reads it); returns how many."""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ids = coco_ids(annotations, [row["path"] for row in rows], labels)
    missing = [row["path"] for row in rows if row["path"] not in ids.images]
    missing += [label for label in labels if label not in ids.categories]
    if missing:
        raise PredictError(f"{annotations} names no image or category {missing[0]!r} ({len(missing)} missing)")
    results = [
        coco_result(ids.images[row["path"]], ids.categories[d["label"]], d)
        for row in rows for d in row.get("results", [])
    ]  # fmt: skip
    coco.write_text(json.dumps(results))
    return len(results)
