"""Placement on a simulated multi-node Ray cluster with logical GPUs: with the cluster's CUDA deployment options,
each replica lands on a GPU of its own. The replicas are a trivial class (no models), to stay cheap."""

from __future__ import annotations

import tempfile
from typing import Any

import pytest

pytest.importorskip("ray.serve")


def test_each_replica_gets_its_own_gpu_across_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    import ray._private.ray_constants as ray_constants
    from ray import serve
    from ray.cluster_utils import Cluster

    from ccld_trt.cluster.app import ClusterSpec, StatsBoard, deployment_options
    from ccld_trt.cluster.replica import ReplicaSettings

    class WhereAmI:  # defined here: the workers cannot import a test module, so it travels by value
        """Reports the node and the GPU Ray gave this replica."""

        def __init__(self, board: Any) -> None:
            import ray

            context = ray.get_runtime_context()
            ray.get(board.put.remote(context.get_actor_id(), {"node": context.get_node_id(),
                                                              "gpus": [str(g) for g in ray.get_gpu_ids()]}))

        def __call__(self) -> str:
            return "ok"

    # every node's files under one short directory (Ray's socket paths must stay short)
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="ccp-", dir="/tmp"))
    # every node and this driver on 127.0.0.1 (Ray's loopback-only mode; the node processes read the variable,
    # this process has read it already)
    monkeypatch.setenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):  # two "machines" of two GPUs each
            cluster.add_node(num_cpus=2, num_gpus=2)
        ray.init(address=cluster.address, namespace="ccld-trt-placement", log_to_driver=False)
        board = ray.remote(StatsBoard).options(num_cpus=0).remote()
        serve.start(proxy_location="Disabled")
        spec = ClusterSpec(replicas=4, settings=ReplicaSettings(max_ongoing=2))
        options = deployment_options("cuda", spec)
        assert options["ray_actor_options"]["num_gpus"] == 1
        deployment = serve.deployment(name="where", **{k: v for k, v in options.items() if k != "user_config"})
        serve.run(deployment(WhereAmI).bind(board), name="placement", route_prefix=None)
        places = list(ray.get(board.get.remote()).values())
        assert len(places) == 4
        assert all(len(p["gpus"]) == 1 for p in places)
        slots = {(p["node"], p["gpus"][0]) for p in places}
        assert len(slots) == 4  # no GPU holds two replicas
        assert len({p["node"] for p in places}) == 2  # both GPU nodes are used; the GPU-less head holds none
    finally:
        if ray.is_initialized():  # serve.shutdown would start a Ray of its own otherwise
            serve.shutdown()
            ray.shutdown()
        cluster.shutdown()
