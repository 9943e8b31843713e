"""graphserve's Ray Serve wiring: the only package that imports both `replica` and `router`.

- `deployments.app`: `build_app(AppArgs) -> Application` (import path of deployments/app.yaml).
- `deployments.config`: `AppArgs`, the pydantic `args:` of app.yaml; one source of truth for buckets.
- `deployments.llm_replica`: `LLMReplica`, one engine per replica (GPU), routing stats, health.
- `deployments.batch_runner`: runs a `PromptBatch` on an engine (merging, failure, cancellation).
- `deployments.ingress`: `OpenAIIngress`, the HTTP + Python entry deployment.
- `deployments.frontend` / `http_api` / `openai_schema`: input checks, FastAPI routes, wire format.
- `deployments.protocol`: `PromptBatch`, `BatchResult`, `StreamChunk` (the Python API's types).
- `deployments.replica_metrics`: Ray metrics from the catalog in router/metrics.py.

Imports nothing itself, so `import deployments.protocol` stays free of Ray.
"""
