"""serve_load's deployment flags reach the app as AppArgs: four replicas sharing two GPUs at half
a GPU and a 0.45 memory share each (the session-10 run), and the defaults leave both unset."""
from __future__ import annotations

from benchmarks.serve_load import app_args, parse_args
from deployments.app import ingress_options, replica_options
from deployments.config import AppArgs


def test_four_replicas_on_two_gpus_reach_the_deployment_and_the_engine():
    a = parse_args(["--device", "cuda", "--num-replicas", "4", "--gpus-per-replica", "0.5",
                    "--memory-utilization", "0.45"])
    args = AppArgs(**app_args(a, "ours"))
    opts = replica_options(args, gpus_in_cluster=2.0)
    assert opts["num_replicas"] == 4 and opts["ray_actor_options"]["num_gpus"] == 0.5
    assert ingress_options(args, opts)["num_replicas"] == 4          # one ingress per GPU replica
    assert args.engine_config(0).memory_utilization == 0.45
    assert opts["request_router_config"]["request_router_class"].endswith("BucketAwareRequestRouter")


def test_without_the_flags_the_app_defaults_stand():
    a = parse_args(["--device", "cuda"])
    sent = app_args(a, "default")
    assert "num_gpus_per_replica" not in sent and "memory_utilization" not in sent
    args = AppArgs(**sent)
    assert replica_options(args, gpus_in_cluster=2.0)["ray_actor_options"]["num_gpus"] == 1.0
    assert args.engine_config(0).memory_utilization == 0.90


def test_the_alternating_order_swaps_the_first_router_every_seed_in_four_deploys():
    a = parse_args(["--device", "cpu", "--traces", "mix,chat", "--seeds", "0,1,2", "--phases", "burst,lo"])
    from benchmarks.serve_plan import plan, segments
    keys = plan(a)
    order = segments(a, keys)
    assert [r for r, _ in order] == ["default", "ours", "default", "ours"]      # d0 | o0 o1 | d1 d2 | o2
    seeds = [sorted({k.split("/")[1] for k in ks}) for _, ks in order]
    assert seeds == [["s0"], ["s0", "s1"], ["s1", "s2"], ["s2"]]
    for router in ("default", "ours"):                                         # every phase once per router
        assert sorted(k for r, ks in order if r == router for k in ks) == sorted(keys)
    a.order = "blocks"
    assert segments(a, keys) == [("default", keys), ("ours", keys)]
