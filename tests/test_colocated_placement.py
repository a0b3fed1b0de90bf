"""Colocated engines of tp > 1 GPUs: the config rules, the bundles, which GPUs and node each engine gets, and the
CUDA_VISIBLE_DEVICES its server is launched with. Ray runs with fake GPUs (`ray.init(num_gpus=8)`): nothing here
needs a GPU or SGLang."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from pipeline.config import ConfigError, layout, load_config
from pipeline.runtime.cluster import BUNDLE_CPU, Cluster, check_resources, engine_devices, placement_specs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SEVEN_B = CONFIGS / "qwen2.5-7b-8gpu.yaml"  # megatron + SGLang engines
SHARED = [
    "weight_sync.mode=colocated", "weight_sync.release_memory=[kv_cache,weights,cuda_graph]", "weight_sync.every=1",
    "trainer.world_size=8", "trainer.gpus_per_rank=1", "trainer.parallel.dp=2",
    "engine.tp=4", "engine.gpus_per_engine=4", "engine.num_engines=2",
]  # fmt: skip


def _cfg(*extra: str):
    return load_config(SEVEN_B, [*SHARED, *extra])


def test_rules_of_multi_gpu_colocated_engines():
    cfg = _cfg("cluster.gpus_per_node=8")
    assert layout(cfg).engine_span == 4
    # a whole GPU per trainer rank, shared with the engine that serves on it; no engine group
    assert placement_specs(cfg) == {"trainer": ([{"CPU": BUNDLE_CPU, "GPU": 1.0}] * 8, "PACK")}
    check_resources(cfg, {"GPU": 8.0})  # 8 GPUs, not 8 + 2 x 4
    with pytest.raises(ConfigError, match=r"needs 8 GPUs \(trainer.world_size=8 whole GPUs"):
        check_resources(cfg, {"GPU": 7.0})
    bad = {
        "engine.gpus_per_engine=1": r"engine.gpus_per_engine: colocated with engine.tp = 4: .* must be 4; got 1",
        "engine.num_engines=3": r"engine.num_engines: colocated: engines of tp = 4 on .* at most 2; got 3",
        "cluster.gpus_per_node=2": r"engine.tp: colocated: an engine's 4 GPUs are on one node",
        "cluster.gpus_per_node=6": r"must divide cluster.gpus_per_node = 6",
        "trainer.gpus_per_rank=0": r"trainer.gpus_per_rank: colocated with engine.tp = 4: .* in \(0, 1\], got 0",
        "weight_sync.release_memory=[]": r"engine.mem_fraction: colocated with engine.tp = 4 and no weight_sync",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            _cfg(override)
    with pytest.raises(ConfigError, match=r"engine.tp: colocated: engine.tp = 4 must divide trainer.world_size = 6"):
        load_config(SEVEN_B, [*SHARED, "trainer.world_size=6", "trainer.parallel.dp=0", "trainer.parallel.pp=1",
                              "trainer.parallel.tp=1", "rollout.n_samples_per_prompt=12"])  # fmt: skip
    # resident engines fit when the memory adds up: 0.5 GPU of trainer + 0.4 of engine
    ok = _cfg("weight_sync.release_memory=[]", "trainer.gpus_per_rank=0.5", "engine.mem_fraction=0.4")
    assert layout(ok).engine_span == 4 and not layout(ok).releases_memory


def test_engine_devices_by_hand():
    bundles = [("nodeA", ["3"]), ("nodeA", ["1"]), ("nodeB", ["0"]), ("nodeB", ["2"])]
    assert engine_devices(bundles, 2, 2) == [("nodeA", "3,1"), ("nodeB", "0,2")]  # in rank order
    assert engine_devices(bundles, 2, 1) == [("nodeA", "3,1")]
    with pytest.raises(ConfigError, match=r"engine 0 \(engine.tp = 4\) spans trainer ranks 0..3, which Ray placed "
                       r"on different nodes \(rank 0 on node nodeA.*rank 2 on node nodeB"):  # fmt: skip
        engine_devices(bundles, 4, 1)
    with pytest.raises(ConfigError, match=r"needs 2 distinct GPUs .* gave them \['1', '1'\]"):
        engine_devices([("n", ["1"]), ("n", ["1"])], 2, 1)


@ray.remote(num_cpus=0)
def _rank_gpus() -> list[str]:
    """Stands in for a trainer rank: the GPUs Ray gives trainer.gpus_per_rank in a trainer bundle."""
    return [str(g) for g in ray.get_gpu_ids()]


def test_engines_get_their_ranks_gpus_and_node(tmp_path):
    cfg = _cfg("cluster.namespace=colocpg")
    ray.init(num_cpus=2, num_gpus=8, include_dashboard=False, namespace="colocpg")  # fake GPUs: ids 0..7
    try:
        with Cluster(cfg) as cluster:
            assert set(cluster.groups) == {"trainer"}
            here = ray.get_runtime_context().get_node_id()
            placed = cluster.engine_placement
            assert [node for node, _ in placed] == [here, here]
            devices = [d.split(",") for _, d in placed]
            assert sorted(g for d in devices for g in d) == [str(i) for i in range(8)]  # 2 engines x 4 distinct GPUs
            # the ranks that later run in those bundles get the same GPUs the engines were given
            rank_gpus = ray.get([
                _rank_gpus.options(num_gpus=cfg.trainer.gpus_per_rank, **cluster._in_bundle("trainer", r)).remote()
                for r in range(8)
            ])  # fmt: skip
            assert [",".join(g for r in range(4 * j, 4 * j + 4) for g in rank_gpus[r]) for j in range(2)] == [
                d for _, d in placed
            ]
            # engine j runs in rank 4j's bundle, asks Ray for no GPU, launches its server on its ranks' GPUs
            engines = cluster.create_engines(str(tmp_path))
            assert [cluster._in_bundle("engines", j)["scheduling_strategy"].placement_group_bundle_index
                    for j in range(2)] == [0, 4]  # fmt: skip
            envs = ray.get([a.launch_env.remote() for a in engines])
            assert envs == [{"CUDA_VISIBLE_DEVICES": d} for _, d in placed]
            assert ray.get([a.node_id.remote() for a in engines]) == [here, here]
        assert cluster.groups == {}
    finally:
        ray.shutdown()


def test_launch_passes_the_devices_to_the_server(monkeypatch, tmp_path):
    import engines.process as process

    seen = {}

    class FakeProcess:
        def __init__(self, cmd, url, log_path, env=None, secret=()):
            seen.update(cmd=cmd, env=env)

        def start(self):
            return self

        def wait_healthy(self, timeout_s):
            pass

    monkeypatch.setattr(process, "EngineProcess", FakeProcess)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # what Ray gave the launching actor (or nothing)
    e = _cfg().engine
    process.launch_engine(e, "/m", 30000, tmp_path / "e.log", devices="4,5,6,7")
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    assert seen["cmd"][seen["cmd"].index("--tp-size") + 1] == "4"
    process.launch_engine(e, "/m", 30000, tmp_path / "e.log")
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "5"  # no devices: inherited


def test_an_engine_whose_ranks_land_on_two_nodes_is_refused():
    """Two raylets of 2 fake GPUs each stand in for two nodes: a tp=4 engine's 4 ranks cannot share a node."""
    from ray.cluster_utils import Cluster as RayCluster

    nodes = RayCluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 2})
    nodes.add_node(num_cpus=1, num_gpus=2)
    nodes.wait_for_nodes()
    cfg = load_config(SEVEN_B, [
        *SHARED, "trainer.world_size=4", "trainer.parallel.dp=1", "engine.num_engines=1",
        f"cluster.address={nodes.address}", "cluster.namespace=colocspan", "cluster.placement_timeout_s=30",
    ])  # fmt: skip
    try:
        with pytest.raises(ConfigError, match=r"colocated engine 0 \(engine.tp = 4\) spans trainer ranks 0..3, which "
                           r"Ray placed on different nodes"):  # fmt: skip
            with Cluster(cfg):
                pass
        assert not ray.is_initialized()  # the failed start left its groups and connection behind it
    finally:
        ray.shutdown()
        nodes.shutdown()
