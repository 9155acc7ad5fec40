"""Image embeddings: `POST /v1/embed` -> one vector per image, as JSON or as raw float32; the
`<model>_image` view on /v2. Served by a bare ViT or DINOv2 (task `embedding`), and by CLIP and
SigLIP besides their zero-shot task: their graphs give every pooling at once."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from service.errors import ServiceError
from service.manifest import EMBEDDING, check_embedding
from service.pipeline import ImagePipeline, Job, ModelOptions
from service.tasks.base import ImageView, Route, Task

NAME = EMBEDDING
SHAPE_HEADER = "X-Embedding-Shape"  # "n,D" of a binary answer

Pooling = Literal["pooled", "cls", "mean"]


class EmbedOptions(ModelOptions):
    pooling: Pooling = Field(
        "pooled",
        description="pooled: the vector transformers gives (CLIP's and SigLIP's image features, ViT's and DINOv2's "
        "pooler output); cls: the CLS token's last hidden state; mean: the patch tokens' last hidden states averaged",
    )
    normalize: bool = Field(False, description="scale each vector to unit length (L2)")


class EmbedResponse(BaseModel):
    model: str
    dimensions: int
    embeddings: list[list[float]] = Field(description="one vector per image, in request order")
    _vectors: np.ndarray = PrivateAttr()  # the same as float32 `[n, dimensions]`, for the binary answer

    model_config = ConfigDict(
        json_schema_extra={"example": {"model": "dinov2", "dimensions": 3, "embeddings": [[0.12, -0.5, 0.83]]}}
    )


def pooled(job: Job[EmbedOptions]) -> np.ndarray:
    """The pooling asked for, `[batch, dimensions]` float32 (422 where the model has no such output)."""
    names = [t.name for t in job.manifest.graphs[job.graph].outputs]
    if job.options.pooling not in names:
        raise ServiceError(422, "no_such_pooling", f"model {job.model.name!r} gives no {job.options.pooling!r} "
                           f"pooling (it has no CLS token); poolings: {', '.join(names)}")  # fmt: skip
    vectors = job.outputs[names.index(job.options.pooling)].astype(np.float32)
    if job.options.normalize:
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
    return vectors


def embed(job: Job[EmbedOptions]) -> EmbedResponse:
    vectors = pooled(job)
    answer = EmbedResponse(model=job.model.name, dimensions=vectors.shape[-1], embeddings=vectors.tolist())
    answer._vectors = vectors
    return answer


def as_bytes(answer: EmbedResponse) -> tuple[bytes, dict[str, str]]:
    """Little-endian float32, row-major `[n, dimensions]`; the shape in a header."""
    vectors = answer._vectors
    return vectors.astype("<f4").tobytes(), {SHAPE_HEADER: f"{vectors.shape[0]},{vectors.shape[1]}"}


EMBED = ImagePipeline(NAME, EmbedOptions, embed)

VIEW = ImageView(
    EMBED,
    outputs=[{"name": "embedding", "datatype": "FP32", "shape": [-1, -1]}],
    tensors=lambda answer: {"embedding": answer._vectors},
)

ROUTES = (
    Route("/v1/embed", EMBED, EmbedResponse,
          "One embedding per image. Options go in the query string, or as form fields / JSON keys. "
          "`Accept: application/octet-stream` answers with little-endian float32 `[n, dimensions]`, row-major, "
          f"the shape in the `{SHAPE_HEADER}` header (`n,dimensions`).", binary=as_bytes),
)  # fmt: skip
TASK = Task(NAME, check_embedding, ROUTES, VIEW)
