"""The one settings object, read from ``LORAMUX_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LORAMUX_", env_file=None, extra="ignore", frozen=True
    )

    home: Path = Field(default_factory=lambda: Path.home() / ".loramux")
    database_url: str | None = None
    storage_url: str | None = None
    s3_endpoint_url: str | None = None
    # The S3 endpoint as clients reach it, for the presigned URLs handed to them (None:
    # s3_endpoint_url). The server itself always talks to s3_endpoint_url.
    s3_public_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    redis_url: str | None = None
    broker_url: str | None = None
    model: str = "smollm2-135m-instruct"
    admin_key: SecretStr | None = None

    # Dependencies fail: every call is bounded, so an interactive request gets its 503
    # within seconds. The registry: connecting (and waiting for a pooled connection), and
    # one statement (the server cancels it; we stop waiting a second later). S3: one
    # connect, one socket read, attempts per call, and no retry starts after the deadline.
    # /readyz: each check. Shutdown: how long in-flight requests may finish.
    db_connect_timeout_s: float = 3.0
    db_statement_timeout_s: float = 5.0
    s3_connect_timeout_s: float = 2.0
    s3_read_timeout_s: float = 3.0
    s3_max_attempts: int = 3
    s3_deadline_s: float = 5.0
    readyz_timeout_s: float = 3.0
    # Redis (the shared rate limiter): connecting, and one command's answer. A Redis that is
    # down or hung costs a limited tenant a 503 within about that; unlimited tenants never
    # reach Redis. ``rate_limit_fail_open`` admits without limits instead (logged), for
    # operators who prefer serving unlimited to refusing while Redis is out.
    redis_connect_timeout_s: float = 1.0
    redis_timeout_s: float = 1.0
    rate_limit_fail_open: bool = False
    # Usage records the registry could not take are journalled under home and replayed at
    # start, before an admission while any wait, and every this many seconds.
    usage_spool_replay_interval_s: float = 5.0
    shutdown_grace_s: float = 30.0

    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    max_body_bytes: int = 4 * 1024 * 1024
    max_upload_bytes: int = 1024 * 1024 * 1024
    max_adapter_bytes: int = 512 * 1024 * 1024
    max_lora_rank: int = 64
    rate_limit_window_s: float = 60.0

    engine_max_num_seqs: int = 64
    engine_max_model_len: int | None = None  # None: the model's context, capped by the KV cache
    engine_kv_cache_bytes: int = 1 << 30
    # The paged KV cache: tokens per block (a power of two), and whether full blocks of a
    # tenant's earlier prompts are reused (keyed by tenant and adapter version).
    engine_kv_block_size: int = Field(default=16, ge=1, le=1024)
    engine_prefix_caching: bool = True
    engine_max_batched_tokens: int = 2048
    # Speculative decoding by prompt lookup: off, on, or auto (a sequence drafts while its
    # drafts are accepted often enough, in small steps); a request's `speculative` field
    # overrides it. Drafts per sequence and step at most.
    engine_speculative: Literal["off", "on", "auto"] = "auto"
    engine_num_speculative_tokens: int = Field(default=8, ge=1, le=64)
    # Weight-only quantization of the base model's projections and LM head: none, int8 (per
    # output channel, symmetric) or int4 (groups of quantization_group_size input weights,
    # an fp16 scale and minimum each, as GGUF's Q4_1); adapters stay in the activation dtype.
    quantization: Literal["none", "int8", "int4"] = "none"
    quantization_group_size: int = 32
    # False: the LM head stays fp32 (SmolLM2 ships it as Q8_0, finer than int4 or int8 per
    # channel; README "Quantization" measures both)
    quantize_lm_head: bool = True
    # The engine's CPU threads; None: one per CPU it may use (affinity, cgroup quota), fewer
    # while other processes keep some of those CPUs busy.
    engine_num_threads: int | None = Field(default=None, ge=1)
    # Decode steps replayed from CUDA graphs, one per batch-size bucket (on CUDA with the
    # Triton kernels only; ignored elsewhere).
    engine_cuda_graphs: bool = True
    # Multi-LoRA: device slots for resident adapters (the engine's pool also holds ranks up
    # to max_lora_rank), and the adapter cache's byte budgets; the disk tier defaults to
    # home/adapter-cache.
    engine_max_loras: int = 16
    adapter_device_bytes: int | None = None
    adapter_host_bytes: int = 1 << 30
    adapter_disk_bytes: int = 8 << 30
    adapter_cache_dir: Path | None = None

    default_max_tokens: int = 256
    max_tokens_cap: int = 4096
    max_n: int = 8
    # prompts x n: each choice is one engine sequence, however the request spells it.
    max_choices_per_request: int = 64
    require_services: bool = False
    # GET /metrics: "admin" asks for an admin key (engine load, adapter-cache activity and
    # request counts are not for tenants); "none" leaves it open, e.g. behind a firewall.
    metrics_auth: Literal["admin", "none"] = "admin"
    # Logs (loramux.logging_config): "text" for a person at a terminal (`loramux serve`),
    # "json" (one object a line with request and trace ids) for a collector; the container
    # image sets json. Loggers that would write SQL parameters or request bodies (tenants'
    # prompts and outputs) stay at WARNING whatever log_level says.
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Tracing (loramux.telemetry), off by default. "otlp": OTLP over HTTP to otel_endpoint,
    # the collector's base URL (/v1/traces is added; None: OTEL_EXPORTER_OTLP_* variables or
    # http://localhost:4318); "console": spans as JSON on stdout. A ratio below 1 samples
    # that share of new traces; a request arriving with a sampled traceparent is kept.
    otel_exporter: Literal["none", "otlp", "console"] = "none"
    otel_endpoint: str | None = None
    otel_service_name: str = "loramux"
    otel_sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    # Whether a public route continues the trace a caller's traceparent names. Off: tenants
    # are hostile, so only /internal/* (this deployment's own hops) continue one and every
    # other request starts its own trace. On only behind a proxy that sets the header.
    trace_trust_incoming: bool = False

    # Adapter lifecycle: how long an upload may hold its blobs before cleanup may take them
    # (also the presigned URL's lifetime), and how often the cleanup task runs.
    adapter_upload_ttl_s: int = 3600
    cleanup_interval_s: int = 900
    # Validation through an outbox (adapters/outbox.py): the version row, committed with the
    # upload, says its message is due; the API process publishes it (at once in the
    # background, at start, and every dispatch interval), a request never waiting on the
    # broker, and a publish giving up after about broker_timeout_s a try. An attempt not
    # finished within adapter_validation_timeout_s, doubled for each further one (1, 2, 4,
    # 8, 16 min), is published again; once the attempts are spent the version is rejected.
    adapter_validation_timeout_s: float = Field(default=60.0, gt=0)
    adapter_validation_max_attempts: int = Field(default=5, ge=1)
    adapter_validation_dispatch_interval_s: float = Field(default=5.0, gt=0)
    broker_timeout_s: float = Field(default=1.0, gt=0)
    # Merge jobs (POST /v1/adapters/{name}/versions/{v}/merge, adapters/merge_job.py), sent
    # through an outbox as validations are: an attempt has merge_timeout_s, doubled for each
    # further one, before it is published again, up to merge_max_attempts, then it fails. A
    # finished export's presigned download URL (S3) lives merge_download_url_ttl_s.
    merge_timeout_s: float = Field(default=1800.0, gt=0)
    merge_max_attempts: int = Field(default=3, ge=1)
    merge_dispatch_interval_s: float = Field(default=5.0, gt=0)
    merge_download_url_ttl_s: int = Field(default=3600, ge=1)
    # A dedicated deployment of one hot adapter (adapters/merged_serving.py):
    # "<tenant>/<adapter>[@version]" or an adapter version id. The engine loads the base
    # with that adapter merged (no LoRA cost) and serves only it, to its tenant, under its
    # name; the base model and every other adapter are refused with a 400.
    merged_adapter: str | None = None

    # Batches: input file limits; the API server a worker reaches the engine through
    # (default http://{host}:{port}, with the admin key); lines in flight per batch (default
    # half of engine_max_num_seqs, so interactive requests always find running slots); the
    # lease a running batch renews, and how often it checks for cancellation.
    files_max_bytes: int = 200 * 1024 * 1024
    batch_max_lines: int = 50_000
    engine_url: str | None = None
    batch_max_in_flight: int | None = None
    batch_lease_s: float = 30.0
    batch_poll_s: float = 0.5

    # Ray Serve (`pip install 'loramux[ray]'`, `loramux serve --ray`). engine_backend: where
    # `loramux serve` finds the engine: "local", in its own process; "ray", the engine
    # deployment of a running loramux Serve app (batch workers reach either through the API
    # server at engine_url). ray_address: the cluster (None: RAY_ADDRESS, or for `serve
    # --ray` a local Ray it starts). Engine replicas autoscale on ongoing requests per
    # replica between min (0: scale to zero) and max; idle for ray_engine_downscale_delay_s,
    # one goes. Each takes up to ray_engine_max_ongoing_requests (None: engine_max_num_seqs)
    # and holds up to engine_max_loras adapters for routing (Serve's multiplexing by adapter
    # version id). A request finding no replica waits ray_replica_wait_s for one, then a 503.
    engine_backend: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    ray_app_name: str = "loramux"
    ray_engine_min_replicas: int = Field(default=1, ge=0)
    ray_engine_max_replicas: int = Field(default=1, ge=1)
    ray_engine_target_ongoing_requests: float = Field(default=16.0, gt=0)
    ray_engine_max_ongoing_requests: int | None = Field(default=None, ge=1)
    ray_engine_upscale_delay_s: float = Field(default=5.0, ge=0)
    ray_engine_downscale_delay_s: float = Field(default=300.0, ge=0)
    ray_engine_num_cpus: float = Field(default=1.0, ge=0)
    ray_engine_num_gpus: float = Field(default=0.0, ge=0)
    ray_ingress_replicas: int = Field(default=1, ge=1)
    ray_ingress_num_cpus: float = Field(default=0.5, ge=0)
    ray_replica_wait_s: float = Field(default=120.0, gt=0)

    # The CLI's client side (`loramux adapters push`): LORAMUX_BASE_URL, LORAMUX_API_KEY.
    base_url: str = "http://127.0.0.1:8000"
    api_key: SecretStr | None = None

    @field_validator("quantization_group_size")
    @classmethod
    def _int4_group_size(cls, value: int) -> int:
        if value not in (32, 64, 128, 256):
            raise ValueError(
                "must be 32, 64, 128 or 256, the group sizes torch's int4 kernels take"
            )
        return value

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'registry.db'}"

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or (self.home / "storage").as_uri()

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.home / 'broker.db'}"

    @property
    def resolved_engine_url(self) -> str:
        return self.engine_url or f"http://{self.host}:{self.port}"

    @property
    def resolved_batch_max_in_flight(self) -> int:
        return self.batch_max_in_flight or max(1, self.engine_max_num_seqs // 2)

    @property
    def resolved_adapter_cache_dir(self) -> Path:
        return self.adapter_cache_dir or self.home / "adapter-cache"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
