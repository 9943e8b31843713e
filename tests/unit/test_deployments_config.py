"""AppArgs validation, the bucket assignment by rank, the derived deployment options, and the
shipped deployments/app.yaml. No Ray cluster (the guard fixture refuses ray.init)."""
from __future__ import annotations

import pathlib

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from deployments.app import build_app, ingress_options, replica_options
from deployments.config import DEFAULT_ROUTER, AppArgs
from router_fakes import no_ray_init  # noqa: F401 - autouse guard

APP_YAML = pathlib.Path(__file__).resolve().parents[2] / "deployments" / "app.yaml"


@pytest.mark.parametrize("kwargs, message", [
    # Unsorted ladder: the engine's own message, naming the fix.
    (dict(batch_buckets=[8, 4, 1]), "must be sorted and unique"),
    (dict(batch_buckets=[]), "non-empty list of positive integers"),
    (dict(batch_buckets=[0, 1]), "positive integers"),
    # The failing tier is named by its index.
    (dict(bucket_sets=[[1, 2], [32, 16]]), "bucket_sets[1]"),
    (dict(bucket_sets=[]), "bucket_sets is empty"),
    (dict(batch_buckets=[1, 2], bucket_sets=[[1, 2]]), "not both"),
    # A tier no replica would serve.
    (dict(bucket_sets=[[1, 2], [4, 8]], num_replicas=1), "would never be served"),
    (dict(max_seq_len=1), "max_seq_len=1"),
    (dict(fallback="queue", max_num_seqs=128, batch_buckets=[1, 2, 64]), "exceeds the largest bucket"),
    (dict(block_size=24), "block_size=24"),
    (dict(batch_bucket=[1, 2]), "Extra inputs are not permitted"),   # typo of batch_buckets
    # Autoscaling: a range instead of a count, and a range that serves every tier.
    (dict(num_replicas=2, autoscaling={"max_replicas": 4}), "not both"),
    (dict(autoscaling={"min_replicas": 3, "max_replicas": 2}), "max_replicas=2 is below min_replicas=3"),
    (dict(autoscaling={"max_replicas": 4, "initial_replicas": 5}), "initial_replicas=5 is outside"),
    (dict(autoscaling={"min_replicas": 0, "max_replicas": 4}), "greater than or equal to 1"),
    (dict(bucket_sets=[[1, 2], [4, 8]], autoscaling={"max_replicas": 4}), "min_replicas=1 is fewer"),
    (dict(autoscaling={"max_replicas": 4, "target": 3}), "Extra inputs are not permitted"),
])
def test_bad_args_fail_with_a_clear_message(kwargs, message):
    with pytest.raises(ValidationError) as err:
        AppArgs(**kwargs)
    assert message in str(err.value)


def test_replica_rank_picks_its_tier_round_robin():
    args = AppArgs(bucket_sets=[[1, 2, 4, 8], [16, 32, 64]], max_seq_len=256)
    assert [args.buckets_for_rank(r) for r in range(4)] == [(1, 2, 4, 8), (16, 32, 64)] * 2
    cfg = args.engine_config(1)
    assert cfg.batch_buckets == (16, 32, 64) and cfg.max_seq_len == 256 and cfg.device == "auto"


def test_served_model_name_defaults_to_the_model():
    assert AppArgs().model_name == "random:tiny"
    assert AppArgs(model="/models/llama", served_model_name="llama").model_name == "llama"


def test_one_ladder_and_the_default_ladder_serve_every_rank():
    assert AppArgs(batch_buckets=[1, 4]).buckets_for_rank(5) == (1, 4)
    assert AppArgs().tiers == [None]            # each engine sizes its own ladder from memory
    assert AppArgs().engine_config(3).batch_buckets is None
    assert AppArgs(block_size=32, enable_prefix_cache=False).engine_config(0).block_size == 32
    assert AppArgs().engine_config(0).mixed_graph_tokens is None          # sized by the engine
    assert AppArgs(mixed_graph_tokens=0).engine_config(0).mixed_graph_tokens == 0
    with pytest.raises(ValidationError):
        AppArgs(mixed_graph_tokens=-1)
    eng = AppArgs(memory_utilization=0.5, use_cuda_graphs=False).engine_config(0)
    assert (eng.memory_utilization, eng.use_cuda_graphs) == (0.5, False)
    assert (AppArgs().engine_config(0).memory_utilization, AppArgs().engine_config(0).use_cuda_graphs) == (0.90, True)
    for bad in (dict(memory_utilization=1.0), dict(memory_utilization=0.0), dict(use_cuda_graphs="sometimes")):
        with pytest.raises(ValidationError):
            AppArgs(**bad)


def test_the_admission_window_reaches_every_engine():
    assert AppArgs().engine_config(0).admission_window_s == 2.0
    assert AppArgs(admission_window_s=0).engine_config(1).admission_window_s == 0.0
    with pytest.raises(ValidationError, match="admission_window_s"):
        AppArgs(admission_window_s=-0.5)


def test_cpu_cluster_gets_one_cpu_replica_per_tier():
    opts = replica_options(AppArgs(bucket_sets=[[1, 2], [4, 8]]), gpus_in_cluster=0)
    assert opts["num_replicas"] == 2
    assert opts["ray_actor_options"] == {"num_cpus": 0.0, "num_gpus": 0.0}


def test_gpu_cluster_gets_one_pinned_replica_per_gpu():
    opts = replica_options(AppArgs(), gpus_in_cluster=4)
    assert opts["num_replicas"] == 4 and opts["ray_actor_options"]["num_gpus"] == 1.0
    explicit = replica_options(AppArgs(num_replicas=2, num_gpus_per_replica=0.5), gpus_in_cluster=4)
    assert explicit["num_replicas"] == 2 and explicit["ray_actor_options"]["num_gpus"] == 0.5


def test_max_ongoing_requests_leaves_room_for_the_replicas_own_429_not_serves_default_of_5():
    # Twice capacity (running rows) plus the queue bound: a request past the replica's bound
    # reaches it and is refused at once, instead of waiting in Serve's queue at the caller.
    assert replica_options(AppArgs(bucket_sets=[[1, 2], [16, 32, 64]]), 0)["max_ongoing_requests"] == 256
    assert replica_options(AppArgs(max_num_seqs=24), 0)["max_ongoing_requests"] == 96
    assert replica_options(AppArgs(max_num_seqs=24, max_queued_sequences=0), 0)["max_ongoing_requests"] == 48
    assert replica_options(AppArgs(max_ongoing_requests=7), 0)["max_ongoing_requests"] == 7


def test_failure_handling_options_reach_both_deployments():
    args = AppArgs(graceful_shutdown_timeout_s=12, health_check_period_s=3, ingress_num_cpus=0.5)
    app = build_app(args)
    ingress = app._bound_deployment
    replica = ingress.init_args[0]._bound_deployment
    assert replica._deployment_config.graceful_shutdown_timeout_s == 12
    assert ingress._deployment_config.graceful_shutdown_timeout_s == 12
    assert replica._deployment_config.health_check_period_s == 3
    assert ingress.ray_actor_options["num_cpus"] == 0.5


def test_the_ingress_always_asks_for_cpu_so_a_cpu_less_head_cannot_take_it():
    # KubeRay's head has num-cpus "0" and no model volume (k8s/rayservice.yaml); Serve's SPREAD
    # would place a 0-CPU ingress there. Zero is refused at validation.
    assert build_app(AppArgs())._bound_deployment.ray_actor_options["num_cpus"] > 0
    with pytest.raises(ValidationError, match="greater than 0"):
        AppArgs(ingress_num_cpus=0)


def test_router_config_comes_from_args():
    opts = replica_options(AppArgs(), 0)
    assert opts["request_router_config"]["request_router_class"] == DEFAULT_ROUTER
    assert opts["request_router_config"]["request_routing_stats_period_s"] == 1.0
    default = replica_options(AppArgs(router={"request_router_class": None}), 0)
    assert "request_router_class" not in default["request_router_config"]
    # one router per ingress replica: ours learns how many share the traffic, unless told otherwise
    assert opts["request_router_config"]["request_router_kwargs"] == {}
    two = replica_options(AppArgs(ingress_replicas=2), 0)["request_router_config"]
    assert two["request_router_kwargs"] == {"peers": 2}
    told = AppArgs(ingress_replicas=2, router={"request_router_kwargs": {"peers": 3, "seed": 1}})
    assert replica_options(told, 0)["request_router_config"]["request_router_kwargs"] == {"peers": 3, "seed": 1}
    other = AppArgs(ingress_replicas=2, router={"request_router_class": "x.y:Z"})
    assert "peers" not in replica_options(other, 0)["request_router_config"]["request_router_kwargs"]


def test_one_ingress_per_gpu_replica_unless_told():
    """An ingress process relays every token stream, so a GPU ladder fleet gets one per decode
    replica (and each router is told it has peers); CPU engines and tiers share one; an explicit
    count wins."""
    def fleet(args, gpus):
        opts = replica_options(args, gpus)
        return (opts["num_replicas"], ingress_options(args, opts)["num_replicas"],
                opts["request_router_config"]["request_router_kwargs"].get("peers", 1))
    assert fleet(AppArgs(), 4) == (4, 4, 4)
    assert fleet(AppArgs(), 1) == (1, 1, 1)
    assert fleet(AppArgs(bucket_sets=[[1, 2], [4, 8]]), 0) == (2, 1, 1)      # CPU replicas
    assert fleet(AppArgs(bucket_sets=[[1, 2], [4, 8]]), 2) == (2, 1, 1)      # tiers: one router
    assert fleet(AppArgs(bucket_sets=[[1, 2], [4, 8]], ingress_replicas=2), 2) == (2, 2, 2)
    assert fleet(AppArgs(ingress_replicas=1), 4) == (4, 1, 1)
    assert fleet(AppArgs(num_replicas=2, ingress_replicas=3), 2) == (2, 3, 3)


def test_autoscaling_replaces_the_replica_count_with_a_range():
    """Serve gets an autoscaling_config and no num_replicas; the target defaults to half a
    replica's sequence capacity; the ingress is sized for the minimum and passes on enough
    requests for the maximum."""
    args = AppArgs(autoscaling={"min_replicas": 2, "max_replicas": 6, "upscale_delay_s": 5})
    opts = replica_options(args, gpus_in_cluster=2)
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 6, "target_ongoing_requests": 256.0,
                                          "upscale_delay_s": 5.0, "downscale_delay_s": 600.0,
                                          "look_back_period_s": 30.0}
    ingress = ingress_options(args, opts)
    assert ingress["num_replicas"] == 2 and opts["request_router_config"]["request_router_kwargs"]["peers"] == 2
    assert ingress["max_ongoing_requests"] == 6 * opts["max_ongoing_requests"]
    own = AppArgs(max_num_seqs=24, autoscaling={"max_replicas": 3, "target_ongoing_requests": 4})
    assert replica_options(own, 0)["autoscaling_config"]["target_ongoing_requests"] == 4.0
    assert replica_options(AppArgs(max_num_seqs=24, autoscaling={"max_replicas": 3}), 0)[
        "autoscaling_config"]["target_ongoing_requests"] == 12.0


def test_serve_accepts_the_autoscaled_deployment():
    """Serve's own validation of the options (its AutoscalingConfig; no num_replicas beside it)."""
    app = build_app(AppArgs(bucket_sets=[[1, 2], [4, 8]],
                            autoscaling={"min_replicas": 2, "max_replicas": 4, "initial_replicas": 3}))
    replica = app._bound_deployment.init_args[0]._bound_deployment
    auto = replica._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.initial_replicas) == (2, 4, 3)
    assert auto.target_ongoing_requests == 4.0     # half of the larger tier's 8 rows


def test_build_app_without_ray_is_a_cpu_build():
    app = build_app(AppArgs(bucket_sets=[[1, 2], [4, 8]]))
    ingress = app._bound_deployment
    replica = ingress.init_args[0]._bound_deployment
    assert ingress.name == "OpenAIIngress" and replica.name == "LLMReplica"
    assert replica.num_replicas == 2 and replica.ray_actor_options["num_gpus"] == 0.0
    assert ingress._deployment_config.max_ongoing_requests == 2 * 2 * (8 + 8)


def test_app_yaml_is_a_valid_serve_config_whose_args_validate():
    config = yaml.safe_load(APP_YAML.read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["name"] == "graphserve" and app["import_path"] == "deployments.app:build_app"
    args = AppArgs.model_validate(app["args"])
    assert args.model == "random:tiny"   # runs on a CPU-only laptop
    assert args.router.request_router_class == DEFAULT_ROUTER
    assert args.router.request_routing_stats_period_s == 1


def test_serve_validates_builder_args_into_appargs():
    # Serve picks the pydantic model from the evaluated annotation of the builder's one parameter.
    import inspect
    assert inspect.signature(build_app).parameters["args"].annotation is AppArgs
    assert build_app({"batch_buckets": [1, 2]})._bound_deployment.name == "OpenAIIngress"
