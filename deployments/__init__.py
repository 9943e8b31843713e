"""graphserve's Ray Serve wiring: the only package that imports both `replica` and `router`.

- `deployments.app`: `build_app(AppArgs) -> Application` (import path of deployments/app.yaml).
- `deployments.config`: `AppArgs`, the pydantic `args:` of app.yaml; one source of truth for buckets.
- `deployments.llm_replica`: `LLMReplica`, one engine per replica (GPU), routing stats, health.
- `deployments.batch_runner`: runs a `PromptBatch` on an engine (merging, failure, cancellation).
- `deployments.ingress`: `OpenAIIngress`, the HTTP + Python entry deployment.
- `deployments.frontend`: tokenizing and checking input into a routed `PromptBatch`.
- `deployments.http_api` / `http_stream` / `http_guard`: FastAPI routes, SSE streams, API keys and
  the body limit.
- `deployments.openai_fields` / `openai_schema` / `openai_format`: every request field's policy
  (honoured or refused), the request models, the response wire format (logprobs included).
- `deployments.errors`: typed errors and the one map from a failure to an HTTP status.
- `deployments.replica_watch`: whether a decode replica runs; a bounded wait for one.
- `deployments.protocol`: `PromptBatch`, `BatchResult`, `StreamChunk` (the Python API's types).
- `deployments.replica_metrics`: Ray metrics from the catalog in router/metrics.py.

Imports nothing itself, so `import deployments.protocol` stays free of Ray.
"""
