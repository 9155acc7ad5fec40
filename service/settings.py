"""Every setting, from the environment (prefix `VITSERVE_`) or a `.env` file."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


CudaOptions = dict[str, str | int | float | bool]


def _cuda_defaults() -> CudaOptions:
    return {"device_id": 0, "cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested",
            "do_copy_in_default_stream": True}  # fmt: skip


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VITSERVE_", env_file=".env", extra="ignore")

    host: str = Field("0.0.0.0", description="address `python -m service` binds")
    port: int = Field(8000, description="port `python -m service` listens on")
    grpc_port: int = Field(
        8001, ge=0, le=65535,
        description="port of the Open Inference Protocol over gRPC (Triton's default, 8001); 0: no gRPC. A port "
        "that cannot be had is logged, and REST serves on",
    )  # fmt: skip
    workers: int = Field(1, ge=1, description="worker processes `python -m service` runs (each loads every model)")
    model_repository: Path = Field(PROJECT_ROOT / "model_repository", description="folder of <name>/<version>/")
    model_control_mode: Literal["none", "poll", "explicit"] = Field(
        "none",
        description="Triton's model control modes. none: the models present at start load then, and only a restart "
        "changes them; poll: the repository is read again every repository_poll_secs, and new or changed versions "
        "load (beside those serving, which they replace once ready) while removed ones unload; explicit: the models "
        "present at start load then, and after that only POST /v2/repository/models/<name>/load and .../unload "
        "change them (one worker only: a call reaches one process)",
    )
    repository_poll_secs: float = Field(15.0, gt=0, description="how often poll mode reads the repository")
    control_api_key: SecretStr | None = Field(
        None, description="if set, the repository's load and unload routes need this key (else api_key, if set)"
    )
    lazy_attention: bool = Field(
        True,
        description="load a model's attention graph on its first attention request, not at start: it holds a "
        "second copy of the model's weights (a ViT-B/16's 0.35 GB), paid only where attention maps are asked for",
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto",
        description="auto: CUDA where a probe graph runs on it at start, else the CPU (with a warning saying why); "
        "cuda: CUDA or refuse to start with the reason (see cuda_fallback)",
    )
    cuda_fallback: bool = Field(
        False,
        description="serve without a GPU provider that cannot run (CUDA: on the CPU; TensorRT: on CUDA), with a "
        "warning saying why, rather than refuse to start or fail the model",
    )
    cuda_options: CudaOptions = Field(
        default_factory=_cuda_defaults,
        description='CUDA execution provider options, JSON with any value type (e.g. {"device_id": 1, '
        '"gpu_mem_limit": 8589934592}), used when the session runs on CUDA',
    )
    tensorrt: bool = Field(
        False,
        description="TensorRT execution provider first (then CUDA, then CPU), its libraries from the `tensorrt` "
        "extra; refuse to start where it cannot run (unless cuda_fallback)",
    )
    trt_cache_dir: Path | None = Field(
        None, description="TensorRT engine and timing caches, so a restart does not rebuild (default: "
        "<model_repository>/.trt_cache)",
    )  # fmt: skip
    trt_fp16: bool = Field(False, description="TensorRT may run layers in float16 (always on for fp16 models)")
    cuda_graphs: bool = Field(
        False,
        description="CUDA graphs (enable_cuda_graph): one captured per warmed batch size, each run padded to the "
        "smallest that holds it, one run at a time per session; warm-up always runs; graphs with other varying axes "
        "(an imported DETR's image size) run without",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime threads per operator (0: one per core but one, which the event loop "
        "keeps; every core for a graph whose one-image run, timed at warm-up, takes over 20 ms)",
    )
    inter_op_threads: int = Field(
        0, ge=0, description="ONNX Runtime threads across operators (parallel mode; 0: default)"
    )
    execution_mode: Literal["sequential", "parallel"] = Field("sequential", description="ONNX Runtime execution mode")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimisation level"
    )
    cpu_mem_arena: bool = Field(True, description="ONNX Runtime's CPU memory arena (off: less memory held, slower)")
    spin_wait: bool = Field(
        False,
        description="on: idle ONNX Runtime threads spin as long as ONNX Runtime likes (tens of ms, after every run "
        "too), for the lowest latency on an idle host; off: they sleep at once and the cores go to HTTP and "
        "decoding, but a heavy graph's spin heavy_spin_us first",
    )
    heavy_spin_us: int = Field(
        200,
        ge=0,
        description="microseconds an idle ONNX Runtime thread of a heavy graph (one given every core) spins before "
        "it sleeps, so the next operator need not wait for a sleeping core to wake; 0: it sleeps at once, which "
        "pays where other processes keep the cores busy",
    )
    batching: bool = Field(True, description="dynamic batching; off: each request runs alone")
    batch_policy: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description='per-model overrides of the manifest\'s batching, JSON: {"vit": {"max_batch_size": 64, '
        '"max_queue_delay_ms": 5, "max_queue_size": 512}}',
    )
    device_cache: Literal["auto", "on", "off"] = Field(
        "auto",
        description="generation's key/value caches in a pool on the session's device (the pooled step graph, "
        "updated in place: only tokens and logits cross the bus, steps still shared across requests); auto: on "
        "a GPU (on the CPU the host's cache is as fast); off: the cache goes through the host every step",
    )
    warmup: bool = Field(True, description="run each model once at every start before readiness turns green")
    max_body_bytes: int = Field(20 * 2**20, gt=0, description="largest request body; larger gets 413")
    max_image_pixels: int = Field(40_000_000, gt=0, description="largest image (width x height); larger gets 413")
    max_request_pixels: int = Field(
        100_000_000, gt=0,
        description="most pixels in one request's images together, and 4 bytes each the most their decoding may "
        "hold (a pixel takes 1 to 16 bytes by what it becomes: greyscale 1, RGB 4, a palette 5, an alpha channel 8, "
        "WebP up to 16); more gets 413",
    )  # fmt: skip
    max_request_decode_work: int = Field(
        1_000_000_000, gt=0,
        description="most pixel passes one request may decode (a progressive JPEG's pixels count once per scan: "
        "about 2.5 s of CPU here); more gets 413",
    )  # fmt: skip
    max_decoding_pixels: int = Field(
        200_000_000, gt=0,
        description="4 bytes each: the most that decoding may hold at once for all requests together, each "
        "image priced from its header as above; more waits for room",
    )  # fmt: skip
    shutdown_drain_s: float = Field(
        2.0, ge=0, description="on SIGTERM, seconds readiness reports 503 while requests are still served"
    )
    shutdown_grace_s: int = Field(30, gt=0, description="then, longest wait for accepted requests to finish")
    request_timeout_s: float = Field(60.0, gt=0, description="longest wait for an answer to start; then 504")
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="longest time for a request's headers, from the connection's start or its last "
        "answer; then 408 and the connection is closed",
    )
    keep_alive_s: float = Field(
        5.0, gt=0, description="longest silence on a connection before its first request or between two; then closed"
    )
    body_timeout_s: float = Field(
        10.0,
        gt=0,
        description="longest time to receive a request's whole body, from its headers (10 s: a 20 MiB body needs "
        "2 MB/s; raise it for slower clients); then 408 and the connection is closed",
    )
    send_timeout_s: float = Field(
        30.0, gt=0, description="longest a client may leave an answer unread (its buffers full); then it is dropped"
    )
    max_connections: int = Field(
        0,
        ge=0,
        description="most connections open at once (0: derived from the open-file limit); at the cap, a "
        "newcomer replaces the connection waiting longest without a request, else gets 503",
    )
    api_key: SecretStr | None = Field(None, description="if set, every route but health, metrics and docs needs it")
    auth_health: bool = Field(False, description="with an API key, health and metrics need it too")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="web origins (scheme://host[:port]) whose pages may call the API from a browser, comma-separated "
        "or a JSON list; `*`: any; unset: no CORS headers at all (browsers allow same-origin calls only)",
    )
    rate_limit: float = Field(
        0.0, ge=0,
        description="requests a second each client may make, on average (a token bucket; REST and gRPC together, "
        "health and metrics exempt); a client is its API key where it sends one the service knows, else its IP "
        "address (an IPv6 address's /64); per worker process; 0: no limit. Over it: 429 `rate_limited` with "
        "Retry-After",
    )  # fmt: skip
    rate_burst: int = Field(
        0, ge=0, description="requests a client may make at once before rate_limit applies (its bucket's size); "
        "0: one second's worth (rate_limit rounded up)",
    )  # fmt: skip
    rate_limit_clients: int = Field(
        10_000, ge=1,
        description="most clients whose buckets are kept (about 300 bytes each); past it the longest idle is "
        "forgotten, and starts again with a full burst",
    )  # fmt: skip
    max_images_per_request: int = Field(64, gt=0, description="most images in one request; more gets 413")
    zero_shot_max_labels: int = Field(256, ge=1, description="most labels in one zero-shot request; more gets 422")
    label_cache_bytes: int = Field(
        64 * 2**20, ge=0, description="zero-shot: memory for the text embeddings of recent label sets (LRU); 0: none"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log verbosity")
    log_json: bool = Field(False, description="log lines as JSON objects (one per request, with its request id)")

    @model_validator(mode="after")
    def _pixel_limits_nest(self) -> Settings:
        if not self.max_image_pixels <= self.max_request_pixels <= self.max_decoding_pixels:
            raise ValueError("need max_image_pixels <= max_request_pixels <= max_decoding_pixels")
        return self

    @model_validator(mode="after")
    def _explicit_control_in_one_process(self) -> Settings:
        if self.model_control_mode == "explicit" and self.workers > 1:
            raise ValueError("model_control_mode explicit needs one worker (a load call reaches one process); "
                             "use poll with several workers")  # fmt: skip
        return self

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins_as_list(cls, origins: object) -> object:
        """A comma-separated string, or a JSON list (as every list setting is read)."""
        if isinstance(origins, str):
            text = origins.strip()
            return json.loads(text) if text.startswith("[") else [o.strip() for o in text.split(",") if o.strip()]
        return origins

    @field_validator("api_key", "control_api_key")
    @classmethod
    def _key_not_blank(cls, key: SecretStr | None) -> SecretStr | None:
        """A set but empty key (an unset variable passed through, say) would guard nothing: refuse it."""
        if key is not None and not key.get_secret_value().strip():
            raise ValueError("the key is set but empty: unset it, or give a key")
        return key


@lru_cache
def get_settings() -> Settings:
    return Settings()
