"""`build_app(args: AppArgs) -> Application`: the graphserve Serve application.

    serve run deployments/app.yaml                                   # from the repo root
    serve run deployments.app:build_app model=random:tiny            # the same, without the file

The graph is `OpenAIIngress -> LLMReplica`: the ingress tokenizes and calls the replica deployment
through a handle, so the bucket-aware router (set here from `args.router`) runs in the ingress.

Deployment options derived from the args (the only place they are set):
- `num_gpus` per replica: `args.num_gpus_per_replica`, else 1 when the cluster has GPUs, else 0;
- `num_replicas`: `args.num_replicas`, else one per GPU (or per `num_gpus_per_replica` share), or
  one per bucket set on a CPU-only cluster; or, with `args.autoscaling`, Serve's
  `autoscaling_config` instead (config.AutoscalingArgs; the ingress is sized for its minimum);
- `max_ongoing_requests`: twice what a replica admits in sequences, running plus queued
  (`2 x (replica_capacity + max_queued_sequences)`). Serve's default of 5 would cap a replica at 5
  concurrent batches; and a request past the replica's own bound must reach the replica to be
  refused at once (429), rather than wait in the caller's queue, which Serve fills when every
  replica holds `max_ongoing_requests`. The ingress's is, by default, enough to fill every
  decode replica;
- `graceful_shutdown_timeout_s` and `health_check_period_s` for both deployments; the ingress's
  `num_cpus` (`ingress_num_cpus`, > 0, so never on a CPU-less KubeRay head).
Each replica derives its engine config (and bucket set) from the same `args` by its rank.
"""
# No `from __future__ import annotations` here: Serve validates a builder's `args` into the
# pydantic model named by the *evaluated* annotation of its parameter; a string annotation would
# hand build_app a plain dict.
import logging
from typing import Any

from ray.serve import Application

from deployments.config import AppArgs
from deployments.ingress import OpenAIIngress
from deployments.llm_replica import LLMReplica

log = logging.getLogger("ray.serve")
APP_NAME = "graphserve"   # the application name in deployments/app.yaml


def cluster_gpus() -> float:
    """GPUs in the Ray cluster (0 when Ray is not initialized: a dry build)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def replica_options(args: AppArgs, gpus_in_cluster: float) -> dict[str, Any]:
    """The LLMReplica `.options(...)` for these args on a cluster with this many GPUs: a fixed
    `num_replicas`, or Serve's `autoscaling_config` when `args.autoscaling` is set."""
    gpus = args.num_gpus_per_replica
    if gpus is None:
        gpus = 1.0 if gpus_in_cluster > 0 else 0.0
    capacity = args.replica_capacity(gpus > 0)
    if args.autoscaling is not None:
        count: dict[str, Any] = {"autoscaling_config": args.autoscaling.to_serve(capacity)}
        fewest, most = args.autoscaling.min_replicas, args.autoscaling.max_replicas
    else:
        most = args.num_replicas
        if most is None:
            most = int(gpus_in_cluster // gpus) if gpus > 0 else 0
            most = max(most, len(args.tiers), 1)
        fewest, count = most, {"num_replicas": most}
    if gpus > 0 and most * gpus > gpus_in_cluster:
        log.warning("graphserve: %d replicas x %s GPU need more than the %s GPUs in the cluster; "
                    "replicas past them stay pending until the Ray autoscaler adds nodes",
                    most, gpus, gpus_in_cluster)
    return {
        **count,
        "max_ongoing_requests": args.max_ongoing_requests
        or 2 * (capacity + args.queued_sequences(capacity)),
        "ray_actor_options": {"num_cpus": args.num_cpus_per_replica, "num_gpus": gpus},
        "request_router_config": args.router.to_serve(ingress_count(args, fewest, gpus)),
        "health_check_period_s": args.health_check_period_s,
        "graceful_shutdown_timeout_s": args.graceful_shutdown_timeout_s,
    }


def decode_replicas(replica_opts: dict[str, Any]) -> tuple[int, int]:
    """(fewest, most) decode replicas these options run: the fixed count twice, or the range."""
    auto = replica_opts.get("autoscaling_config")
    if auto is None:
        return replica_opts["num_replicas"], replica_opts["num_replicas"]
    return auto["min_replicas"], auto["max_replicas"]


def ingress_count(args: AppArgs, replicas: int, gpus_per_replica: float) -> int:
    """`ingress_replicas`, else one per decode replica when they have GPUs and share one ladder
    (an ingress process relays every token stream), else one: on CPU, and with tiers, whose
    placement wants one router that sees every send (see AppArgs.ingress_replicas)."""
    if args.ingress_replicas is not None:
        return args.ingress_replicas
    return replicas if gpus_per_replica > 0 and not args.bucket_sets else 1


def ingress_options(args: AppArgs, replica_opts: dict[str, Any]) -> dict[str, Any]:
    """The ingress's options: sized for the fewest decode replicas (an autoscaled fleet's
    minimum; `ingress_replicas` overrides), passing on enough requests for the most."""
    fewest, most = decode_replicas(replica_opts)
    count = ingress_count(args, fewest, replica_opts["ray_actor_options"]["num_gpus"])
    return {
        "num_replicas": count,
        "max_ongoing_requests": args.ingress_max_ongoing_requests
        or most * replica_opts["max_ongoing_requests"],
        "ray_actor_options": {"num_cpus": args.ingress_num_cpus},
        "graceful_shutdown_timeout_s": args.graceful_shutdown_timeout_s,
    }


def build_app(args: AppArgs) -> Application:
    if not isinstance(args, AppArgs):   # a dict from a caller that bypassed Serve's validation
        args = AppArgs.model_validate(args)
    opts = replica_options(args, cluster_gpus())
    ingress = ingress_options(args, opts)
    fewest, most = decode_replicas(opts)
    log.info("graphserve: %s, %s x LLMReplica (num_gpus=%s, max_ongoing_requests=%d), tiers %s, "
             "%d x OpenAIIngress", args.model, fewest if fewest == most else f"{fewest}-{most}",
             opts["ray_actor_options"]["num_gpus"],
             opts["max_ongoing_requests"], [list(t) if t else "auto" for t in args.tiers],
             ingress["num_replicas"])
    replica = LLMReplica.options(**opts).bind(args)
    return OpenAIIngress.options(**ingress).bind(replica, args)
