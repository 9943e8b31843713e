"""One Ray cluster and one Serve instance for the whole integration run (starting them costs
~10 s on 2 cores, each app deploy another ~15-30 s), shared by every module in this folder.

The cluster has 2 CPUs and 2 fake GPUs (`ray.init(num_gpus=2)`): GPU-pinned replicas schedule and
each sees its own CUDA_VISIBLE_DEVICES, while torch runs on the CPU. Serve's HTTP proxy and Ray's
metrics exporter listen on free ports (other Ray clusters may run on the same host); the
`ray_cluster` fixture publishes them with the GCS address, which second drivers and
`serve run --address` use instead of `address="auto"` (that could pick another cluster on a
shared host). Modules deploy their app with `serve.run` and `serve.delete` it when done.
"""
from __future__ import annotations

import pytest

from serve_helpers import RayCluster, free_port


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray import serve

    metrics_port, http_port = free_port(), free_port()
    # address="local": a new cluster, never one that another process on this host started
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False,
             _metrics_export_port=metrics_port)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    try:
        yield RayCluster(ray.get_runtime_context().gcs_address, http_port, metrics_port)
    finally:
        serve.shutdown()
        ray.shutdown()
