"""A small client of the service's /v1 API, sync (`Client`) and async (`AsyncClient`), on httpx2.

```python
from vitserve import Client

with Client("http://127.0.0.1:8000", api_key=None) as client:
    print(client.classify("examples/digit-7.png", top_k=3).results[0][0].label)
```

Every failure raises `VitserveError` carrying the server's error code and message (`EndpointMissing`
where the server has no such route, `Unreachable` where it cannot be reached). It imports nothing of
the server: `pip install vitserve` without ONNX Runtime is enough to use it."""

from __future__ import annotations

import base64
import json
import mimetypes
import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypedDict, TypeVar, Unpack

import httpx2

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 120.0

# An image: a path to read, or the encoded bytes themselves (PNG, JPEG, ...)
ImageInput = str | os.PathLike[str] | bytes
Images = ImageInput | Sequence[ImageInput]
T = TypeVar("T")


# errors ---------------------------------------------------------------------------------------------


class VitserveError(Exception):
    """The server refused or failed a request: its HTTP status (None where no answer came), its
    stable error `code` and its message."""

    def __init__(self, status: int | None, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}" if status is None else f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id


class EndpointMissing(VitserveError):
    """The server has no such route (an older server, or another service at that address)."""


class Unreachable(VitserveError):
    """No answer: the server is not there, or the connection failed."""


# results --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float


@dataclass(frozen=True)
class Box:
    xmin: float
    ymin: float
    xmax: float
    ymax: float


@dataclass(frozen=True)
class Detection:
    label: str
    score: float
    box: Box


@dataclass(frozen=True)
class Classified:
    model: str
    results: list[list[Prediction]]  # one list per image, best first


@dataclass(frozen=True)
class Detected:
    model: str
    results: list[list[Detection]]  # one list per image, best first; boxes in the image's pixels


@dataclass(frozen=True)
class Embedded:
    model: str
    dimensions: int
    embeddings: list[list[float]]  # one vector per image


@dataclass(frozen=True)
class Generated:
    model: str
    label: str | None
    seed: int
    size: tuple[int, int]  # (height, width) of each PNG
    images: list[bytes]  # PNG files


@dataclass(frozen=True)
class Row:
    """One decoded row of a streamed generation: per image, the row's values (grey 0-255, or
    [r, g, b] for a palette model)."""

    row: int
    pixels: list[list[Any]]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    state: str  # "ready" or "failed"
    task: str | None
    version: int | None
    labels: list[str]
    input_size: tuple[int, int] | None
    providers: list[str]
    reason: str | None
    raw: dict[str, Any] = field(repr=False)  # every field /v1/models gives


@dataclass(frozen=True)
class Health:
    ready: bool
    models: dict[str, str]  # name -> "ready" or "failed"
    reason: str | None


class GenerateOptions(TypedDict, total=False):
    """/v1/generate's options (docs/api/v1.md); unset ones take the server's defaults."""

    model: str
    version: int
    label: str
    num_images: int
    temperature: float
    top_k: int
    seed: int
    prime_rows: int
    scale: int


# requests and their answers, the same for both clients ---------------------------------------------


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request to make, and how its answer (JSON) becomes a result."""

    method: str
    path: str
    parse: Callable[[Any], T]
    params: dict[str, Any] = field(default_factory=dict)
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    json: dict[str, Any] | None = None
    ok: tuple[int, ...] = (200,)


def _read(image: ImageInput, index: int) -> tuple[str, bytes, str]:
    if isinstance(image, bytes):
        return f"image-{index}", image, "application/octet-stream"
    path = Path(image)
    return path.name, path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def uploads(images: Images) -> list[tuple[str, tuple[str, bytes, str]]]:
    """One multipart `file` field per image."""
    many = [images] if isinstance(images, str | bytes | os.PathLike) else list(images)
    return [("file", _read(image, i)) for i, image in enumerate(many)]


def _set(**options: Any) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def _classified(body: Any) -> Classified:
    results = [[Prediction(p["label"], p["score"]) for p in image] for image in body["results"]]
    return Classified(body["model"], results)


def _detection(d: dict[str, Any]) -> Detection:
    return Detection(d["label"], d["score"], Box(**d["box"]))


def _detected(body: Any) -> Detected:
    return Detected(body["model"], [[_detection(d) for d in image] for image in body["results"]])


def _embedded(body: Any) -> Embedded:
    return Embedded(body["model"], body["dimensions"], body["embeddings"])


def generated(body: Any) -> Generated:
    images = [base64.b64decode(png) for png in body["images"]]
    return Generated(body["model"], body.get("label"), body["seed"], tuple(body["size"]), images)


def _model(m: dict[str, Any]) -> ModelInfo:
    size = m.get("input_size")
    return ModelInfo(m["name"], m["state"], m.get("task"), m.get("version"), m.get("labels", []),
                     tuple(size) if size else None, m.get("providers", []), m.get("reason"), m)  # fmt: skip


def _health(body: Any) -> Health:
    models = {name: status["state"] for name, status in body.get("models", {}).items()}
    return Health(bool(body["ready"]), models, body.get("reason"))


def classify_call(images: Images, model: str | None, top_k: int | None, version: int | None) -> Call[Classified]:
    params = _set(model=model, top_k=top_k, version=version)
    return Call("POST", "/v1/classify", _classified, params, uploads(images))


def detect_call(
    images: Images, model: str | None, threshold: float | None, max_detections: int | None, version: int | None
) -> Call[Detected]:
    params = _set(model=model, threshold=threshold, max_detections=max_detections, version=version)
    return Call("POST", "/v1/detect", _detected, params, uploads(images))


def embed_call(images: Images, model: str | None) -> Call[Embedded]:
    return Call("POST", "/v1/embed", _embedded, _set(model=model), uploads(images))


def generate_body(prime: ImageInput | None, options: GenerateOptions) -> dict[str, Any]:
    """/v1/generate's JSON: the options set, and the prime image as base64."""
    body: dict[str, Any] = _set(**options)
    if prime is not None:
        body["prime"] = base64.b64encode(_read(prime, 0)[1]).decode()
    return body


MODELS = Call("GET", "/v1/models", lambda body: [_model(m) for m in body["models"]])
HEALTH = Call("GET", "/health/ready", _health, ok=(200, 503))


def error_of(response: httpx2.Response) -> VitserveError:
    """The server's `{"error": {"code", "message"}}` as an exception (whatever else came, said plainly)."""
    try:
        error = response.json()["error"]
        code, message, request_id = str(error["code"]), str(error["message"]), error.get("request_id")
    except (ValueError, KeyError, TypeError):
        code, message, request_id = "http_error", response.text[:200] or response.reason_phrase, None
    kind = EndpointMissing if response.status_code == 404 and code == "not_found" else VitserveError
    if kind is EndpointMissing:
        message = f"{response.request.url.path} does not exist on this server ({message})"
    return kind(response.status_code, code, message, request_id)


def unreachable(exc: httpx2.TransportError, url: str) -> Unreachable:
    return Unreachable(None, "unreachable", f"no answer from {url}: {exc or type(exc).__name__}")


def stream_event(kind: str, data: str) -> Row | Generated:
    """One event of /v1/generate's stream: a row, the answer (`done`), or an error raised."""
    body = json.loads(data)
    if kind == "row":
        return Row(body["row"], body["pixels"])
    if kind == "done":
        return generated(body)
    raise VitserveError(200, body.get("code", "stream_error"), body.get("message", data))


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _api_key(api_key: str | None) -> str | None:
    return api_key if api_key is not None else os.environ.get("VITSERVE_API_KEY") or None


# the clients ----------------------------------------------------------------------------------------


class Client:
    """The /v1 API, one blocking call per method. `api_key` defaults to $VITSERVE_API_KEY."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self.http = httpx2.Client(base_url=self.url, headers=_headers(_api_key(api_key)), timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def send(self, call: Call[T]) -> T:
        try:
            response = self.http.request(call.method, call.path, params=call.params, files=call.files, json=call.json)
        except httpx2.TransportError as exc:
            raise unreachable(exc, self.url) from exc
        if response.status_code not in call.ok:
            raise error_of(response)
        return call.parse(response.json())

    def classify(
        self, images: Images, *, model: str | None = None, top_k: int | None = None, version: int | None = None
    ) -> Classified:
        return self.send(classify_call(images, model, top_k, version))

    def detect(
        self, images: Images, *, model: str | None = None, threshold: float | None = None,
        max_detections: int | None = None, version: int | None = None,
    ) -> Detected:  # fmt: skip
        return self.send(detect_call(images, model, threshold, max_detections, version))

    def embed(self, images: Images, *, model: str | None = None) -> Embedded:
        """/v1/embed: one vector per image (`EndpointMissing` from a server without the route)."""
        return self.send(embed_call(images, model))

    def generate(self, *, prime: ImageInput | None = None, **options: Unpack[GenerateOptions]) -> Generated:
        """/v1/generate with its options (GenerateOptions); `prime`: an image whose top rows to complete."""
        return self.send(Call("POST", "/v1/generate", generated, json=generate_body(prime, options)))

    def generate_stream(
        self, *, prime: ImageInput | None = None, **options: Unpack[GenerateOptions]
    ) -> Iterator[Row | Generated]:
        """generate(), each `Row` as it is decoded, then the `Generated` answer."""
        body = generate_body(prime, options) | {"stream": True}
        try:
            with self.http.stream("POST", "/v1/generate", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    raise error_of(response)
                for event in httpx2.EventSource(response):
                    yield stream_event(event.event, event.data)
        except httpx2.TransportError as exc:
            raise unreachable(exc, self.url) from exc

    def models(self) -> list[ModelInfo]:
        return self.send(MODELS)

    def health(self) -> Health:
        """Readiness (/health/ready): whether every model serves, and each model's state."""
        return self.send(HEALTH)


class AsyncClient:
    """The /v1 API for asyncio, one awaitable per method. `api_key` defaults to $VITSERVE_API_KEY."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self.http = httpx2.AsyncClient(base_url=self.url, headers=_headers(_api_key(api_key)), timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def send(self, call: Call[T]) -> T:
        try:
            response = await self.http.request(
                call.method, call.path, params=call.params, files=call.files, json=call.json
            )
        except httpx2.TransportError as exc:
            raise unreachable(exc, self.url) from exc
        if response.status_code not in call.ok:
            raise error_of(response)
        return call.parse(response.json())

    async def classify(
        self, images: Images, *, model: str | None = None, top_k: int | None = None, version: int | None = None
    ) -> Classified:
        return await self.send(classify_call(images, model, top_k, version))

    async def detect(
        self, images: Images, *, model: str | None = None, threshold: float | None = None,
        max_detections: int | None = None, version: int | None = None,
    ) -> Detected:  # fmt: skip
        return await self.send(detect_call(images, model, threshold, max_detections, version))

    async def embed(self, images: Images, *, model: str | None = None) -> Embedded:
        return await self.send(embed_call(images, model))

    async def generate(self, *, prime: ImageInput | None = None, **options: Unpack[GenerateOptions]) -> Generated:
        return await self.send(Call("POST", "/v1/generate", generated, json=generate_body(prime, options)))

    async def generate_stream(
        self, *, prime: ImageInput | None = None, **options: Unpack[GenerateOptions]
    ) -> AsyncIterator[Row | Generated]:
        body = generate_body(prime, options) | {"stream": True}
        try:
            async with self.http.stream("POST", "/v1/generate", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise error_of(response)
                async for event in httpx2.EventSource(response):
                    yield stream_event(event.event, event.data)
        except httpx2.TransportError as exc:
            raise unreachable(exc, self.url) from exc

    async def models(self) -> list[ModelInfo]:
        return await self.send(MODELS)

    async def health(self) -> Health:
        return await self.send(HEALTH)
