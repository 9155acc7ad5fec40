"""Adding a task is one task module and one registry entry. This test module holds a whole task of
its own, image embedding (a fixed linear map of the preprocessed pixels, computable by numpy), with
an ONNX graph and manifest written here; registered beside the shipped tasks, it serves on /v1 in
every input form, on /v2 as a raw and an image view, through the batcher, with validated options."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from pydantic import BaseModel, Field

from service.app import create_app
from service.imaging import decode_image, preprocess
from service.manifest import BatchPolicy, GraphSpec, Manifest, Parity, Preprocessing, TensorSpec, write_manifest
from service.pipeline import ImagePipeline, Job, ModelOptions
from service.settings import Settings
from service.tasks import TASKS
from service.tasks.base import ImageView, Route, Task
from tests.conftest import SHIPPED_REPOSITORY
from tests.helpers import png_bytes, triton_images

# the task: this is all a new task needs ------------------------------------------------------------

NAME = "image-embedding"


class EmbedOptions(ModelOptions):
    normalize: bool = Field(False, description="scale each embedding to unit length")


class EmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]] = Field(description="one vector per image, in request order")


def embed(job: Job[EmbedOptions]) -> EmbedResponse:
    (vectors,) = job.outputs
    if job.options.normalize:
        vectors = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
    return EmbedResponse(model=job.model.name, embeddings=vectors.tolist())


def check_manifest(manifest: Manifest) -> None:
    if len(manifest.main.outputs) != 1 or len(manifest.main.outputs[0].shape) != 2:
        raise ValueError("an embedding graph gives one output [batch, dimensions]")


EMBED = ImagePipeline(NAME, EmbedOptions, embed)
VIEW = ImageView(
    EMBED,
    outputs=[{"name": "embedding", "datatype": "FP32", "shape": [-1, -1]}],
    tensors=lambda answer: {"embedding": np.array(answer.embeddings, dtype=np.float32)},
)
TASK = Task(NAME, check_manifest, (Route("/v1/linear-embed", EMBED, EmbedResponse, "One embedding per image."),), VIEW)
# ...and one registry entry: `NAME: TASK` in service/tasks/__init__.py's TASKS (here, the app's `tasks`)

# a model for it: an ONNX graph and its manifest --------------------------------------------------------

MODEL = "embedder"
SPEC = Preprocessing(color_mode="L", size=(8, 8), mean=[0.5], std=[0.25])
WEIGHTS = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
MAX_BATCH = 8


def write_model(repository: Path) -> None:
    """`<repository>/embedder/1/`: pixel_values [batch, 1, 8, 8] -> Flatten -> MatMul(WEIGHTS) -> embedding."""
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["pixel_values"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "weights"], ["embedding"])],
        "embedder",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(WEIGHTS, "weights")],
    )  # fmt: skip
    folder = repository / MODEL / "1"
    folder.mkdir(parents=True)
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), folder / "model.onnx"
    )
    main = GraphSpec(
        file="model.onnx",
        inputs=[TensorSpec(name="pixel_values", dtype="float32", shape=["batch", 1, 8, 8])],
        outputs=[TensorSpec(name="embedding", dtype="float32", shape=["batch", 4])],
    )
    parity = Parity(max_abs_diff=0.0, tolerance=1e-4, batch_size=1, traced_batch_size=1, argmax_equal=True)
    manifest = Manifest(
        name=MODEL, version=1, task=NAME, architecture="linear", graphs={"main": main}, preprocessing=SPEC,
        labels=[], data={"name": "none: fixed random weights"}, quality={}, parity=parity, opset=18,
        versions={"onnx": onnx.__version__},
        serving=BatchPolicy(max_batch_size=MAX_BATCH, max_queue_delay_ms=100),  # long enough for company
    )  # fmt: skip
    write_manifest(manifest, folder)


# the tests ---------------------------------------------------------------------------------------------


def picture(seed: int) -> Image.Image:
    """A 24x16 RGB image: converted to grey and resized on the way in."""
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


PNGS = [png_bytes(picture(seed)) for seed in range(4)]
PNG = PNGS[0]


def expected(png: bytes, normalize: bool = False) -> np.ndarray:
    """The same computation in numpy, over the service's own decoding and preprocessing."""
    vector: np.ndarray = preprocess(decode_image(png, 10**8), SPEC).reshape(-1) @ WEIGHTS
    return vector / np.linalg.norm(vector) if normalize else vector


def embeddings(response: Any) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.json()["model"] == MODEL
    return np.array(response.json()["embeddings"])


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The new model beside the shipped ViT (a link: nothing copied)."""
    root = tmp_path_factory.mktemp("custom_task")
    write_model(root)
    (root / "vit").symlink_to(SHIPPED_REPOSITORY / "vit", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def app_client(repository: Path) -> Iterator[TestClient]:
    app = create_app(Settings(model_repository=repository, device="cpu"), tasks={**TASKS, NAME: TASK})
    with TestClient(app) as client:
        yield client


def test_v1_answers_the_numpy_computation_in_every_input_form(app_client: TestClient) -> None:
    multipart = app_client.post("/v1/linear-embed", files=[("file", ("a.png", png, "image/png")) for png in PNGS[:2]])
    raw = app_client.post("/v1/linear-embed", content=PNG, headers={"content-type": "image/png"})
    as_json = app_client.post("/v1/linear-embed", json={"images": [base64.b64encode(PNG).decode()]})
    np.testing.assert_allclose(embeddings(multipart), [expected(PNGS[0]), expected(PNGS[1])], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(embeddings(raw), [expected(PNG)], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(embeddings(as_json), [expected(PNG)], rtol=1e-5, atol=1e-5)
    assert np.abs(embeddings(raw)).max() > 1  # not a degenerate answer


def test_options_from_query_form_and_json_are_validated_by_its_model(app_client: TestClient) -> None:
    headers = {"content-type": "image/png"}
    normalized = [
        app_client.post("/v1/linear-embed?normalize=true", content=PNG, headers=headers),
        app_client.post("/v1/linear-embed", files={"file": ("a.png", PNG, "image/png")}, data={"normalize": "true"}),
        app_client.post("/v1/linear-embed", json={"images": [base64.b64encode(PNG).decode()], "normalize": True}),
        app_client.post(f"/v1/linear-embed?normalize=true&model={MODEL}", content=PNG, headers=headers),
    ]
    for response in normalized:
        np.testing.assert_allclose(embeddings(response), [expected(PNG, normalize=True)], rtol=1e-5, atol=1e-6)
    for query in ("normalize=maybe", "colour=red", "model=vit"):
        response = app_client.post(f"/v1/linear-embed?{query}", content=PNG, headers=headers)
        error = response.json()["error"]
        if query == "model=vit":  # a model of another task
            assert (response.status_code, error["code"]) == (422, "wrong_task"), response.text
        else:
            assert (response.status_code, error["code"]) == (422, "invalid_request"), response.text
            assert query.split("=")[0] in error["message"]
    openapi = app_client.get("/openapi.json").json()["paths"]["/v1/linear-embed"]["post"]
    assert {p["name"] for p in openapi["parameters"]} == {"model", "version", "normalize"}


def test_listed_ready_and_beside_the_shipped_task(app_client: TestClient) -> None:
    models = {m["name"]: m for m in app_client.get("/v1/models").json()["models"]}
    assert models[MODEL]["state"] == "ready" and models[MODEL]["task"] == NAME
    assert models[MODEL]["input_size"] == [8, 8]
    ready = app_client.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["models"][MODEL]["state"] == "ready"
    assert app_client.get(f"/v2/models/{MODEL}_image/ready").json() == {"name": f"{MODEL}_image", "ready": True}
    assert set(app_client.get("/v2").json()["models"]) == {MODEL, f"{MODEL}_image", "vit", "vit_image"}
    # the shipped classification task serves beside it, and knows nothing of it
    classified = app_client.post("/v1/classify", content=PNG, headers={"content-type": "image/png"})
    assert classified.status_code == 200 and classified.json()["model"] == "vit"
    assert (
        app_client.post(f"/v1/classify?model={MODEL}", content=PNG, headers={"content-type": "image/png"}).json()[
            "error"
        ]["code"]
        == "wrong_task"
    )


def test_v2_image_view_gives_the_v1_numbers_and_validates_parameters(app_client: TestClient) -> None:
    metadata = app_client.get(f"/v2/models/{MODEL}_image").json()
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == VIEW.outputs
    v1 = embeddings(app_client.post("/v1/linear-embed", files=[("file", ("a.png", p, "image/png")) for p in PNGS]))
    for parameters, want in (({}, v1), ({"normalize": True}, v1 / np.linalg.norm(v1, axis=-1, keepdims=True))):
        response = app_client.post(f"/v2/models/{MODEL}_image/infer", **triton_images(PNGS, parameters))
        assert response.status_code == 200, response.text
        (output,) = response.json()["outputs"]
        assert (output["name"], output["datatype"], output["shape"]) == ("embedding", "FP32", [4, 4])
        np.testing.assert_allclose(np.reshape(output["data"], (4, 4)), want, rtol=1e-6, atol=1e-6)
    for bad in ({"normalize": "maybe"}, {"colour": "red"}):
        response = app_client.post(f"/v2/models/{MODEL}_image/infer", **triton_images([PNG], bad))
        assert response.status_code == 400 and set(response.json()) == {"error"}, response.text
        assert next(iter(bad)) in response.json()["error"]
    # the raw view is the graph itself
    pixels = preprocess(decode_image(PNG, 10**8), SPEC)[None]
    raw = {
        "inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": pixels.ravel().tolist()}]
    }
    response = app_client.post(f"/v2/models/{MODEL}/infer", json=raw)
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["outputs"][0]["data"], expected(PNG), rtol=1e-5, atol=1e-5)


def test_concurrent_requests_share_a_batch_and_get_their_own_answers(app_client: TestClient) -> None:
    def sizes() -> dict[int, int]:
        batches = app_client.get("/v1/models").json()["models"]
        return {int(k): v for k, v in next(m for m in batches if m["name"] == MODEL)["batch_sizes"]["main"].items()}

    before = sizes()
    # a lone request on an idle model runs inline when its model is fast: these four must queue
    app_client.app.state.registry.models[MODEL].batchers["main"].lone_run_s = float("inf")  # type: ignore[attr-defined]
    with ThreadPoolExecutor(len(PNGS)) as pool:
        responses = list(pool.map(
            lambda png: app_client.post("/v1/linear-embed", content=png, headers={"content-type": "image/png"}), PNGS
        ))  # fmt: skip
    for png, response in zip(PNGS, responses, strict=True):
        np.testing.assert_allclose(embeddings(response), [expected(png)], rtol=1e-5, atol=1e-5)
    new = {size: count - before.get(size, 0) for size, count in sizes().items() if count > before.get(size, 0)}
    assert sum(size * count for size, count in new.items()) == len(PNGS)
    assert max(new) > 1, f"every request ran alone: {new}"


def test_the_registry_entry_is_what_serves_it(repository: Path, tmp_path: Path) -> None:
    """Without the entry the model is refused with its reason; with it alone, nothing shipped is needed."""
    alone = tmp_path / "alone"
    write_model(alone)
    with TestClient(create_app(Settings(model_repository=alone, device="cpu"))) as shipped_only:
        ready = shipped_only.get("/health/ready")
        assert ready.status_code == 503
        assert "'image-embedding' is not one this service serves" in ready.json()["models"][MODEL]["reason"]
        headers = {"content-type": "image/png"}
        assert shipped_only.post("/v1/linear-embed", content=PNG, headers=headers).status_code == 404
    with TestClient(create_app(Settings(model_repository=alone, device="cpu"), tasks={NAME: TASK})) as only_new:
        assert only_new.get("/health/ready").status_code == 200
        response = only_new.post("/v1/linear-embed", content=PNG, headers={"content-type": "image/png"})
        np.testing.assert_allclose(embeddings(response), [expected(PNG)], rtol=1e-5, atol=1e-5)
        assert only_new.post("/v1/classify", content=PNG, headers={"content-type": "image/png"}).status_code == 404
        assert set(only_new.get("/v2").json()["models"]) == {MODEL, f"{MODEL}_image"}
