"""Fixtures of the real-node tests (`pytest --cluster=node`): kubeforge installed on the node once for
the session (support.node), and for each test a fresh namespace holding the S3 Secret of
examples/kubectl/s3-secret.yaml, as a user would create it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from k8s.cluster import Cluster, real_cluster, realk8s_dir
from support.node import SECRET, Node, kubeforge_on_node, s3_client


@pytest.fixture(scope="session")
def node(real_kubeconfig: str | None) -> Iterator[Node]:
    assert real_kubeconfig, "--cluster=node starts the real control plane"
    with kubeforge_on_node(real_kubeconfig, realk8s_dir()) as running:
        s3_client(running).create_bucket(Bucket="kubeforge")  # the kind values' bucket
        yield running


@pytest_asyncio.fixture
async def node_cluster(node: Node) -> AsyncIterator[Cluster]:
    async with real_cluster(node.kubeconfig) as cluster:
        await cluster.apply(SECRET)
        yield cluster
    # Gone while the operator still runs: it lets go of the jobs (their finalizers) as they are deleted.
    node.kubectl("wait", "--for=delete", f"namespace/{cluster.namespace}", "--timeout=120s", check=False, timeout=150)
