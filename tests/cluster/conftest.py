"""The cluster tests make hosts out of Linux namespaces (tests/cluster/harness.py): root and iproute2 only."""

from __future__ import annotations

import pytest

from tests.cluster.harness import cluster_unavailable


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = cluster_unavailable()
    for item in items:
        if "tests/cluster/" in str(item.fspath):
            item.add_marker(pytest.mark.cluster)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
