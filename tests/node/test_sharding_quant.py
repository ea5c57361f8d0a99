"""Weight quantization asked for in POST /instances, on real `shoal node` processes on loopback: the instance
records it, its runners apply it (a 2-node int8 pipeline answers what one int8 process answers), previews
count it, and an unknown mode is refused before anything is placed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shoal.engine.sampling import SamplingParams
from shoal.local_cluster import LocalCluster
from tests.node.instance_helpers import generate, place, tokens, wait_gone, wait_members, wait_ready
from tests.runner.harness import reference
from tests.runner.tiny_model_dir import write_tiny_model_dir

pytestmark = pytest.mark.slow

PROMPT = "the quick brown fox"
GREEDY = {"temperature": 0.0, "max_tokens": 12, "ignore_eos": True}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("pair"), cluster="quant", node_timeout_s=3.0)
    try:
        cluster.add(2, extra=("--runner-threads", "1"))
        wait_members(cluster, 2)
        yield cluster
    finally:
        cluster.stop_all()


def test_int8_pipeline_over_two_nodes_gives_the_tokens_of_one_int8_process(
    pair: LocalCluster, tmp_path: Path
) -> None:
    tiny = write_tiny_model_dir(tmp_path / "tiny-llama")
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = list(reference(tiny, [PROMPT], params, quant="int8")[0].token_ids)
    n0, n1 = pair.nodes
    response = place(n0, model=str(tiny), sharding="pipeline", min_nodes=2, quant="int8")
    assert response.status_code == 201, response.text
    instance = response.json()
    assert instance["quant"] == "int8" and len(instance["shards"]) == 2
    wait_ready(pair, n0, instance["instance_id"])
    status, lines = generate(n1, model="tiny-llama", prompt=PROMPT, **GREEDY)
    assert status == 200, lines
    assert tokens(lines) == expected
    deleted = httpx.delete(f"{n0.api_url}/instances/{instance['instance_id']}", timeout=10)
    assert deleted.status_code == 200, deleted.text
    wait_gone(pair, n0, instance["instance_id"], 5.0)


def test_previews_count_quantized_weights_and_unknown_modes_are_refused(
    pair: LocalCluster, tmp_path: Path
) -> None:
    tiny = write_tiny_model_dir(tmp_path / "tiny-llama")
    n0, _ = pair.nodes

    def single_node_weights(quant: str) -> int:
        response = httpx.get(
            f"{n0.api_url}/instances/previews", params={"model": str(tiny), "quant": quant}, timeout=10
        )
        assert response.status_code == 200, response.text
        (one,) = [p for p in response.json()["previews"] if len(p["memory"]) == 1 and p["backend"] == "gloo"][
            :1
        ]
        assert one["request"]["quant"] == quant
        return int(one["memory"][0]["weight_bytes"])

    assert single_node_weights("int8") < single_node_weights("none")
    before = n0.state()["instances"]
    refused = place(n0, model=str(tiny), quant="int3")
    assert refused.status_code == 422, refused.text
    assert "quant" in refused.text
    assert n0.state()["instances"] == before
