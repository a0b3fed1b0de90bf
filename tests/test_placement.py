"""Ray placement groups: the bundles asked for per layout, and the groups a Cluster creates, waits for and removes."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from pipeline.config import ConfigError, load_config
from pipeline.runtime.cluster import BUNDLE_CPU, Cluster, placement_specs

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"


def test_specs_for_a_multi_gpu_layout():
    cfg = load_config(TINY, [
        "trainer.backend=megatron", "trainer.world_size=8", "trainer.gpus_per_rank=1",
        "trainer.parallel.tp=2", "trainer.parallel.pp=2", "trainer.micro_batch_size=2",
        "engine.num_engines=4", "engine.tp=2", "engine.gpus_per_engine=2", "cluster.placement_strategy=STRICT_PACK",
    ])  # fmt: skip
    specs = placement_specs(cfg)
    trainer, engines = specs["trainer"], specs["engines"]
    assert trainer == ([{"CPU": BUNDLE_CPU, "GPU": 1.0}] * 8, "STRICT_PACK")  # one bundle per rank (tp*pp*dp = 8)
    assert engines == ([{"CPU": BUNDLE_CPU, "GPU": 2.0}] * 4, "PACK")  # an engine's 2 tp GPUs in one bundle
    external = load_config(TINY, ["engine.backend=external", "engine.urls=[http://127.0.0.1:1]"])
    assert set(placement_specs(external)) == {"trainer"}
    assert placement_specs(load_config(TINY))["trainer"] == ([{"CPU": BUNDLE_CPU}], "PACK")  # CPU: no GPU key


def test_colocated_engines_share_the_trainer_bundles():
    cfg = load_config(TINY, [
        "trainer.world_size=4", "trainer.gpus_per_rank=0.5", "engine.num_engines=3", "engine.gpus_per_engine=0.5",
        "weight_sync.mode=colocated", "trainer.micro_batch_size=2",
    ])  # fmt: skip
    bundles, strategy = placement_specs(cfg)["trainer"]
    assert [b.get("GPU") for b in bundles] == [1.0, 1.0, 1.0, 0.5] and strategy == "PACK"  # rank 3 has no engine
    assert set(placement_specs(cfg)) == {"trainer"}
    with pytest.raises(ConfigError, match=r"engine.num_engines: colocated: .* at most trainer.world_size = 4"):
        load_config(TINY, ["trainer.world_size=4", "engine.num_engines=5", "weight_sync.mode=colocated",
                           "trainer.micro_batch_size=2"])  # fmt: skip


def test_bad_strategy_is_named():
    with pytest.raises(ConfigError, match="cluster.placement_strategy"):
        load_config(TINY, ["cluster.placement_strategy=TIGHT"])


def _groups() -> dict[str, str]:
    return {g["name"]: g["state"] for g in ray.util.placement_group_table().values()}


def test_cluster_creates_waits_for_and_removes_its_groups():
    cfg = load_config(TINY, ["cluster.namespace=pgtest", "engine.num_engines=2"])
    ray.init(num_cpus=2, include_dashboard=False, namespace="pgtest")  # ours: the Cluster joins it, leaves it up
    try:
        with Cluster(cfg) as cluster:
            assert _groups() == {"pgtest-trainer": "CREATED", "pgtest-engines": "CREATED"}
            assert cluster.groups["engines"].bundle_count == 2
        assert cluster.groups == {}
        assert _groups() == {"pgtest-trainer": "REMOVED", "pgtest-engines": "REMOVED"}
    finally:
        ray.shutdown()


def test_unplaceable_group_fails_with_what_it_asked_for():
    # Two trainer bundles that must sit on different nodes, on a one-node cluster: never placeable.
    cfg = load_config(TINY, [
        "trainer.world_size=2", "cluster.placement_strategy=STRICT_SPREAD", "cluster.placement_timeout_s=3",
    ])  # fmt: skip
    with pytest.raises(ConfigError, match=r"placement group 'trainer' \(2 bundles x 0 GPU, STRICT_SPREAD\) not "
                       r"satisfiable within cluster.placement_timeout_s=3s; the cluster has"):  # fmt: skip
        with Cluster(cfg):
            pass
    assert not ray.is_initialized()  # the failed start left no Ray behind
