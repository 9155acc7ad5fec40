"""Zero-shot image classification: `POST /v1/zero-shot` -> per image, the labels a request names, scored
as transformers' `pipeline("zero-shot-image-classification")` scores them (CLIP: a softmax over
logit_scale times the cosine; SigLIP: a sigmoid of it plus logit_bias), best first. The labels' text
embeddings come from the model's text graph, through its own tokenizer, and are cached by label set
(service/text_tower.py): a repeated label set costs one image pass."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import anyio.to_thread
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from service.errors import ServiceError
from service.manifest import ZERO_SHOT, TextTower, check_zero_shot
from service.pipeline import ImagePipeline, Job, ModelOptions
from service.settings import Settings
from service.tasks.base import Route, Task
from service.text import encodable
from service.text_tower import LABEL_CACHE, TextEncoder, label_scores

NAME = ZERO_SHOT
MAX_LABEL_CHARS = 200
MAX_TEMPLATE_CHARS = 200
TEMPLATE = "This is a photo of {}."  # transformers' pipeline's default


class ZeroShotOptions(ModelOptions):
    labels: list[str] = Field(
        description="the candidate labels: a JSON list, repeated form fields, or comma-separated in the query "
        f"string; each 1 to {MAX_LABEL_CHARS} characters, at most `zero_shot_max_labels` (256) of them"
    )
    hypothesis_template: str = Field(
        TEMPLATE, min_length=2, max_length=MAX_TEMPLATE_CHARS, description="each label's text: `{}` is the label"
    )

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value: object) -> list[str]:
        """One error for the whole list, however many labels are wrong (never one per label)."""
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, list) or not all(isinstance(label, str) for label in value):
            raise ValueError("labels are a list of strings")
        labels = [label.strip() for label in value]
        if not labels or not all(labels):
            raise ValueError("labels must be non-empty strings, at least one")
        longest = max(len(label) for label in labels)
        if longest > MAX_LABEL_CHARS:
            raise ValueError(f"a label of {longest} characters; at most {MAX_LABEL_CHARS}")
        if not all(map(encodable, labels)):
            raise ValueError("a label holds a lone surrogate (an escape such as \\ud800): not text")
        return labels

    @field_validator("hypothesis_template")
    @classmethod
    def _template(cls, template: str) -> str:
        if "{}" not in template:
            raise ValueError("the template needs `{}`, where each label goes")
        return template


class LabelScore(BaseModel):
    label: str
    score: float = Field(description="softmax over the labels (CLIP), or a sigmoid for each (SigLIP)")


class ZeroShotResponse(BaseModel):
    model: str
    results: list[list[LabelScore]] = Field(description="one list per image, in request order, best first")

    model_config = ConfigDict(
        json_schema_extra={"example": {"model": "clip", "results": [[{"label": "cat", "score": 0.91},
                                                                      {"label": "dog", "score": 0.09}]]}}
    )  # fmt: skip


@lru_cache(maxsize=32)
def encoder(path: Path, fingerprint: str, tower: TextTower) -> TextEncoder:
    """A model version's tokenizer, read once (its fingerprint: a version replaced in place reads anew)."""
    return TextEncoder(path / tower.tokenizer, tower)


async def label_embeddings(job: Job[ZeroShotOptions], settings: Settings) -> None:
    """The text embeddings of the request's labels `[labels, d]` into `job.extra`: from the cache, or
    from one run of the text graph."""
    labels, template, model = job.options.labels, job.options.hypothesis_template, job.model
    if len(labels) > (limit := settings.zero_shot_max_labels):
        raise ServiceError(422, "too_many_labels", f"{len(labels)} labels; the limit is {limit}")
    key = (model.name, model.version, model.fingerprint, template, tuple(labels))
    found = LABEL_CACHE.get(key)
    if found is None:
        tower = job.manifest.text
        assert tower is not None  # check_zero_shot
        names = [t.name for t in job.manifest.graphs["text"].inputs]
        texts = [template.replace("{}", label) for label in labels]
        # up to 256 texts of 20,000 characters: tokenized off the event loop, which would stall meanwhile
        tokenize = encoder(model.path, model.fingerprint, tower).tokenize
        feeds = await anyio.to_thread.run_sync(tokenize, texts, names)
        (found,) = await model.run(feeds, graph="text")
        LABEL_CACHE.put(key, found)
    job.extra = found


def zero_shot(job: Job[ZeroShotOptions]) -> ZeroShotResponse:
    assert job.manifest.text is not None
    scores = label_scores(job.outputs[0], job.extra, job.manifest.text, job.manifest.score_activation)
    order = np.argsort(-scores, axis=-1, kind="stable")  # ties keep the request's order, as the pipeline's sort
    labels, best = job.options.labels, np.take_along_axis(scores, order, -1).tolist()
    ranked = [[{"label": labels[i], "score": s} for i, s in zip(row, top, strict=True)]
              for row, top in zip(order.tolist(), best, strict=True)]  # fmt: skip
    return ZeroShotResponse(model=job.model.name, results=_RANKED.validate_python(ranked))


_RANKED = TypeAdapter(list[list[LabelScore]])

ZERO_SHOT_PIPELINE = ImagePipeline(NAME, ZeroShotOptions, zero_shot, before=label_embeddings)

ROUTES = (
    Route("/v1/zero-shot", ZERO_SHOT_PIPELINE, ZeroShotResponse,
          "Score each image against the labels the request names (CLIP, SigLIP). Options go in the query string "
          "(labels comma-separated), as form fields (`labels` repeated) or JSON keys (a list)."),
)  # fmt: skip
TASK = Task(NAME, check_zero_shot, ROUTES)
