"""`AppArgs`: the pydantic model of the `args:` block in deployments/app.yaml (the Ray boundary).

This is the one source of truth for the bucket list. `build_app` turns it into deployment options;
each replica turns it into its own frozen `replica.EngineConfig` with `engine_config(rank)`, and
publishes the buckets it captured to the router through `record_routing_stats()`. The router never
reads this config: it learns each replica's buckets from those stats.

Bucket assignment:
- `batch_buckets: [1, 2, 4, 8, 16, 32, 64]`: every replica captures the same ladder;
- `bucket_sets: [[1, 2, 4, 8], [16, 32, 64]]`: tiers inside ONE deployment, so one router chooses
  among all replicas; the replica of rank r captures `bucket_sets[r % len(bucket_sets)]`.
Give at most one of the two; neither lets every engine size its own ladder from memory (paged KV:
up to the rows its KV pool holds at `expected_seq_len`, at most 512 on a GPU, 64 on a CPU).

Every bucket set is checked by building the `EngineConfig` it will produce, so a bad value fails
at `serve run` time with the engine's own message, not later inside a replica.

Limits and failure handling (README, "Errors, limits and security"): a replica admits at most
`max_num_seqs + max_queued_sequences` sequences (past that: 429 with `Retry-After:
retry_after_s`); one request holds at most `max_sequences_per_request` sequences (prompts x n; past
that: 400); a request body at most `max_request_bytes` (413); while no replica runs, a request waits
`replica_wait_s` and then gets a 503. API keys come from the environment or from the file named by
`api_keys_file` (a path, never a key: keys do not belong in this config).
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from replica.config import DEFAULT_CPU_ROWS, MAX_ROWS_CUDA, ConfigError, EngineConfig

DEFAULT_ROUTER = "router.request_router:BucketAwareRequestRouter"


class RouterArgs(BaseModel):
    """The replica deployment's `RequestRouterConfig` (see ray-serve notes §1)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Import path of the RequestRouter class; null selects Ray Serve's default (power of two).
    request_router_class: Optional[str] = DEFAULT_ROUTER
    request_router_kwargs: dict[str, Any] = Field(default_factory=dict)
    # How often each replica's record_routing_stats() is polled (Ray's default is 10 s).
    request_routing_stats_period_s: float = Field(1.0, gt=0)
    request_routing_stats_timeout_s: float = Field(30.0, gt=0)

    def to_serve(self, ingress_replicas: int = 1) -> Optional[dict[str, Any]]:
        """Serve's request_router_config. Our router also learns how many routers share the
        traffic (`peers`: one per ingress replica) unless its kwargs say otherwise."""
        if self.request_router_class is None:
            return {"request_routing_stats_period_s": self.request_routing_stats_period_s,
                    "request_routing_stats_timeout_s": self.request_routing_stats_timeout_s}
        out = self.model_dump()
        if self.request_router_class == DEFAULT_ROUTER and ingress_replicas > 1:
            out["request_router_kwargs"] = {"peers": ingress_replicas, **self.request_router_kwargs}
        return out


class AutoscalingArgs(BaseModel):
    """Serve's `autoscaling_config` for the decode deployment, instead of a fixed `num_replicas`.

    Serve adds a replica while the mean requests in flight per replica stay above
    `target_ongoing_requests` for `upscale_delay_s`, and removes one while they stay below it for
    `downscale_delay_s` (averaged over `look_back_period_s`). A new replica loads the model and
    captures its graphs before Serve offers it (~4 s for random llama-8b on an H200, plus the
    weight read), and the router ranks it as idle until its first stats (router kwarg
    `new_replica_idle_s`). A replica being removed finishes its requests for up to
    `graceful_shutdown_timeout_s`. No scale to zero: a request that finds no replica waits
    `replica_wait_s`, then gets a 503. Nodes for more GPUs come from the Ray autoscaler (KubeRay:
    `enableInTreeAutoscaling`), not from this.
    """
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(..., ge=1)
    initial_replicas: Optional[int] = Field(None, ge=1)   # null: min_replicas
    # Requests (batches) in flight per replica that Serve aims for; null: half the sequences one
    # replica runs at once (AppArgs.replica_capacity), so a replica is added well before a
    # one-prompt workload fills its rows. Batches of many prompts count once each: lower it there.
    target_ongoing_requests: Optional[float] = Field(None, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "AutoscalingArgs":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"autoscaling: max_replicas={self.max_replicas} is below "
                             f"min_replicas={self.min_replicas}")
        if self.initial_replicas is not None and not \
                self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"autoscaling: initial_replicas={self.initial_replicas} is outside "
                             f"[min_replicas, max_replicas] = [{self.min_replicas}, {self.max_replicas}]")
        return self

    def to_serve(self, replica_capacity: int) -> dict[str, Any]:
        """Serve's autoscaling_config, the target filled in from one replica's capacity."""
        out = self.model_dump(exclude_none=True)
        out.setdefault("target_ongoing_requests", max(1.0, replica_capacity / 2))
        return out


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # A local checkpoint directory or "random:<preset>" (random:tiny runs anywhere, CPU included).
    model: str = "random:tiny"
    # The name clients pass as `model` and see in responses; null: `model` itself.
    served_model_name: Optional[str] = None
    dtype: str = "auto"
    # One bucket ladder for every replica ...
    batch_buckets: Optional[list[int]] = None
    # ... or one set per tier: replica rank r captures bucket_sets[r % len(bucket_sets)].
    bucket_sets: Optional[list[list[int]]] = None
    # Longest sequence (prompt + completion); also the ingress's context-length limit.
    max_seq_len: int = 2048
    # Sequences each engine admits at once (decode rows); null: what its KV pool holds at
    # expected_seq_len (or its largest bucket when buckets are given).
    max_num_seqs: Optional[int] = Field(None, ge=1)
    # Sequence length the KV pool is sized for; null: min(max_seq_len, 1024).
    expected_seq_len: Optional[int] = Field(None, ge=1)
    # Tokens per KV block (prefix-cache granularity) and whether identical prompt prefixes share blocks.
    block_size: int = Field(16, ge=1)
    enable_prefix_cache: bool = True
    # Tokens one engine step carries (decode rows + prefill chunks); null: sized from the model
    # on a GPU (a ~50 ms step: llama-8b 2560, llama-1b 16128; replica/sizing.py), 2048 on CPU.
    step_token_budget: Optional[int] = Field(None, ge=1)
    # Mixed steps of up to this many tokens replay piecewise CUDA graphs; null: sized from the
    # model (llama-8b 384, llama-1b 1024; replica/sizing.py); 0: always eager.
    mixed_graph_tokens: Optional[int] = Field(None, ge=0)
    # Fraction of each GPU's memory an engine may hold (weights + graphs + KV pool; vLLM's
    # gpu_memory_utilization). Lower it when something else shares the GPU.
    memory_utilization: float = Field(0.90, ge=0.05, le=0.99)
    # False: no CUDA graphs, every step eager (vLLM's enforce_eager; for debugging, not speed).
    use_cuda_graphs: bool = True
    # What a replica does with a decode batch larger than its largest bucket (EngineConfig.fallback).
    fallback: Literal["eager", "queue"] = "eager"
    # Each engine admits the waiting request with the most output left among those that arrived
    # within this many seconds of the oldest one waiting (a burst's tail of small decode batches
    # is shorter); 0: in order of arrival (EngineConfig.admission_window_s).
    admission_window_s: float = Field(2.0, ge=0)
    seed: int = 0
    # Where each replica's step loop runs (EngineConfig.engine_process): "auto" is a child process
    # on CUDA, so the replica's busy event loop never holds the GPU loop back, and a thread on CPU.
    engine_process: Literal["auto", "thread", "process"] = "auto"
    # Replicas of the decode deployment; null: one per GPU in the cluster, or one per bucket set
    # on a CPU-only cluster.
    num_replicas: Optional[int] = Field(None, ge=1)
    # ... or let Serve scale them between min_replicas and max_replicas (AutoscalingArgs).
    autoscaling: Optional[AutoscalingArgs] = None
    # GPUs per replica; null: 1 when the cluster has GPUs, else 0 (CPU, eager decode).
    num_gpus_per_replica: Optional[float] = Field(None, ge=0)
    # CPUs Ray reserves per replica (a scheduling label: the step loop is one thread either way).
    num_cpus_per_replica: float = Field(0.0, ge=0)
    # Requests (batches) Serve lets one replica hold; null: twice what it admits in sequences
    # (capacity + max_queued_sequences), so Serve's default of 5 never caps a decode batch and a
    # request past the replica's queue bound reaches it and gets its 429 at once.
    max_ongoing_requests: Optional[int] = Field(None, ge=1)
    # Ingress replicas (each one Python process that tokenizes, routes and relays every token
    # stream); null: one per GPU decode replica on a ladder, else one (CPU, or tiers). Measured on
    # 2x H200 (docs/perf-notes.md, session 8): on the ladder a second ingress lifted chat bursts
    # from ~5.5k to 7.5-8.2k tokens/s and cut chat TTFT p50 at 0.8x load from ~88 to 45-50 ms;
    # on tiers it cost our router its interactive tail (TTFT p99 2.05x and 1.72x the default
    # router's on mix and chat-long, against 0.22x and 1.10x with one). Each ingress runs its own
    # router, which sees only the requests it sent until the replicas' next stats; each is told
    # how many share the traffic (router kwarg `peers`) and counts its recent sends that many times.
    ingress_replicas: Optional[int] = Field(None, ge=1)
    # Requests one ingress replica passes on at once; null: enough to fill every decode replica.
    ingress_max_ongoing_requests: Optional[int] = Field(None, ge=1)
    # CPUs Ray reserves for each ingress replica. Must be > 0: a KubeRay head offers none
    # (num-cpus "0"), so the ingress lands on a worker pod, where the model files are.
    ingress_num_cpus: float = Field(1.0, gt=0)
    # How often Serve checks each replica; the controller notices a dead replica at the next check,
    # and until then the ingress cannot know that none is left.
    health_check_period_s: float = Field(2.0, gt=0)
    # In-flight requests get this long to finish when a replica stops (scale-down, redeploy).
    graceful_shutdown_timeout_s: float = Field(30.0, ge=0)
    # -- limits (README: "Errors, limits and security") --
    # Sequences a replica holds waiting beyond its running rows (max_num_seqs); past them a batch is
    # refused with 429. null: as many as it runs (max_num_seqs).
    max_queued_sequences: Optional[int] = Field(None, ge=0)
    # Sequences (prompts x n) one request may hold; null: the replica capacity. Past it: 400.
    max_sequences_per_request: Optional[int] = Field(None, ge=1)
    # How long a request waits for a replica while none is running, before a 503.
    replica_wait_s: float = Field(3.0, ge=0)
    # The Retry-After of 429 and 503 answers.
    retry_after_s: float = Field(2.0, gt=0)
    # Ray items per second one replica's token streams send in all (handle and HTTP streams): each
    # stream sends at most one item per (open streams / this) seconds, capped at 0.2 s, carrying
    # every token made meanwhile; first and last tokens are never held. Ray moves a few thousand
    # items/s per hop, one token each at one item per step (deployments/stream_pacing.py). 0: one
    # item per decode step per stream. Every replica's items also pass the ingress (one Python
    # process per ingress replica): with many replicas per ingress, lower this or raise ingress_replicas.
    stream_items_per_s: float = Field(500.0, ge=0)
    # Largest request body (bytes); larger is a 413.
    max_request_bytes: int = Field(16 * 2**20, ge=1024)
    # A file of API keys (one per line; a mounted Kubernetes Secret). Keys can also come from the
    # GRAPHSERVE_API_KEYS environment variable. Neither set: no authentication.
    api_keys_file: Optional[str] = None
    router: RouterArgs = Field(default_factory=RouterArgs)
    # Import path of the engine class; tests and serving-overhead benchmarks may swap in a fake.
    engine_class: str = "replica:Engine"

    @model_validator(mode="after")
    def _check(self) -> "AppArgs":
        if self.batch_buckets is not None and self.bucket_sets is not None:
            raise ValueError("give batch_buckets (one ladder for all replicas) or bucket_sets "
                             "(one set per tier), not both")
        if self.bucket_sets is not None and not self.bucket_sets:
            raise ValueError("bucket_sets is empty; give at least one set, e.g. [[1, 2, 4, 8]]")
        for rank in range(len(self.tiers)):
            try:
                self.engine_config(rank)
            except ConfigError as e:
                where = f"bucket_sets[{rank}]" if self.bucket_sets is not None else "args"
                raise ValueError(f"{where}: {e}") from None
        if self.autoscaling is not None:
            if self.num_replicas is not None:
                raise ValueError("give num_replicas (a fixed count) or autoscaling (a range), not both")
            if self.autoscaling.min_replicas < len(self.tiers):
                raise ValueError(f"autoscaling.min_replicas={self.autoscaling.min_replicas} is fewer "
                                 f"than the {len(self.tiers)} bucket_sets: some sets would not be "
                                 "served at the minimum")
        if self.num_replicas is not None and self.num_replicas < len(self.tiers):
            raise ValueError(f"num_replicas={self.num_replicas} is fewer than the {len(self.tiers)} "
                             f"bucket_sets: the sets {self.tiers[self.num_replicas:]} would never be "
                             "served; add replicas or drop sets")
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def tiers(self) -> list[Optional[tuple[int, ...]]]:
        """The bucket sets, one per tier (a single ladder is one tier; None: the engine's own)."""
        if self.bucket_sets is not None:
            return [tuple(s) for s in self.bucket_sets]
        return [tuple(self.batch_buckets) if self.batch_buckets is not None else None]

    def buckets_for_rank(self, rank: int) -> Optional[tuple[int, ...]]:
        return self.tiers[rank % len(self.tiers)]

    def engine_config(self, rank: int, device: str = "auto") -> EngineConfig:
        """The EngineConfig of the replica with this rank (raises ConfigError)."""
        return EngineConfig(model=self.model, dtype=self.dtype, device=device,
                            batch_buckets=self.buckets_for_rank(rank), max_seq_len=self.max_seq_len,
                            max_num_seqs=self.max_num_seqs, expected_seq_len=self.expected_seq_len,
                            block_size=self.block_size, enable_prefix_cache=self.enable_prefix_cache,
                            step_token_budget=self.step_token_budget,
                            mixed_graph_tokens=self.mixed_graph_tokens, fallback=self.fallback,
                            memory_utilization=self.memory_utilization, use_cuda_graphs=self.use_cuda_graphs,
                            admission_window_s=self.admission_window_s, seed=self.seed,
                            engine_process=self.engine_process)

    def replica_capacity(self, gpus: bool = True) -> int:
        """Sequences one replica holds at once, as far as the config says: max_num_seqs, else the
        largest bucket of any tier, else the engine's cap (the KV pool may hold fewer)."""
        if self.max_num_seqs:
            return self.max_num_seqs
        explicit = [t[-1] for t in self.tiers if t]
        if explicit:
            return max(explicit)
        return MAX_ROWS_CUDA if gpus else DEFAULT_CPU_ROWS

    def queued_sequences(self, running_capacity: int) -> int:
        """Sequences a replica running `running_capacity` at once may hold waiting."""
        return running_capacity if self.max_queued_sequences is None else self.max_queued_sequences
