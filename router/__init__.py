"""graphserve's routing package: pure Python, never imports torch.

- `router.stats`: the `ReplicaStats` / `RoutingHint` contracts between replicas, callers and router.
- `router.metrics`: the catalog of metric names.
- `router.buckets`: batch-size bucket arithmetic (`bucket_for`, `padding_waste`,
  `validate_buckets`).
- `router.hint`: a caller's hint checked (`coerce_hint`) and reduced to a `Batch`.
- `router.estimate`: the time model: when a batch's first and last token would arrive at a
  replica (`estimate`, `score`); docs/routing-estimate.md.
- `router.inflight`: the router's ledger of what it sent each replica (`InFlight`).
- `router.policy`: the pure ranking policy (`rank_replicas`), no Ray.
- `router.request_router`: `BucketAwareRequestRouter`, the Ray Serve `RequestRouter` subclass
  (import path `router.request_router:BucketAwareRequestRouter`).

This file imports nothing, so `import router.stats` stays free of Ray and of torch.
"""
