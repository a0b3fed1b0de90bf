"""Orchestration across nodes: a socket listening on every interface (0.0.0.0) is advertised as its node's IP (engine
URLs, the trainer ranks' rendezvous, the weight-sync group), so ranks and engines on other nodes can reach it.
One node stands in for several here: the node's IP is a real interface, not the loopback."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import ray

from pipeline.config import load_config
from pipeline.runtime.cluster import Cluster, advertised
from pipeline.runtime.train import train
from pipeline.warmstart import prepare_model_dir

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"


def test_advertised_address():
    assert advertised("0.0.0.0", "10.1.2.3") == "10.1.2.3"
    assert advertised("", "10.1.2.3") == "10.1.2.3"
    assert advertised("127.0.0.1", "10.1.2.3") == "127.0.0.1"  # an explicit address is used as given
    assert advertised("10.9.9.9", "10.1.2.3") == "10.9.9.9"


@pytest.mark.slow
def test_every_interface_is_advertised_as_the_node_ip(tmp_path):
    """A two-node Ray cluster on one machine (two raylets), joined through cluster.address: the two trainer ranks are
    spread over both nodes (STRICT_SPREAD) and meet at rank 0's node IP, the engine is reached at its advertised URL."""
    from ray.cluster_utils import Cluster as RayCluster

    nodes = RayCluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    cfg = load_config(TINY, [
        f"cluster.address={nodes.address}", "cluster.placement_strategy=STRICT_SPREAD",
        "engine.host=0.0.0.0", "cluster.bind_host=0.0.0.0", "weight_sync.master_address=0.0.0.0",
        "trainer.world_size=2", "trainer.total_steps=2", "trainer.batch_size=2", "rollout.n_samples_per_prompt=4",
        "trainer.micro_batch_size=4", "eval.every=0", f"logging.dir={tmp_path}", "logging.run_name=any",
        "cluster.namespace=addrtest",
    ])  # fmt: skip
    try:
        with Cluster(cfg) as cluster:
            ip = ray.util.get_node_ip_address()
            assert ip not in ("0.0.0.0", "")
            placed = ray.util.placement_group_table(cluster.groups["trainer"])["bundles_to_node_id"]
            assert len(set(placed.values())) == 2  # one trainer rank per node
            host, port = cluster.rendezvous()  # found on rank 0's node (its bundle)
            assert host == ip and 0 < port < 65536
            url = cluster.launch_engines(prepare_model_dir(cfg, str(tmp_path)), str(tmp_path))[0]
            assert url.startswith(f"http://{ip}:"), url
            with urllib.request.urlopen(f"{url}/health", timeout=10) as resp:
                assert resp.status == 200
        assert not ray.is_initialized()  # the run disconnected from the cluster it joined...
        # Two ranks meet at rank 0's node IP, the sync group at the source rank's, the engine at its advertised URL.
        result = train(cfg)
        assert result.steps == 2 and result.engine_versions == ["2"]
        assert result.accounting["balanced"] == 1 and result.accounting["trained"] == 4, result.accounting
        assert all(n.remaining_processes_alive() for n in nodes.list_all_nodes())  # ...and left it running
    finally:
        ray.shutdown()
        nodes.shutdown()
