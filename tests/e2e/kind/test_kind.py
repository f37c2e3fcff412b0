"""The Helm suite (tests/e2e/helmsuite.py) on kind: the same checks the README's test
command runs on `cilia cluster` (tests/cluster/test_helm.py), here for machines with
Docker (.github/workflows/e2e-kind.yml runs this file)."""

from __future__ import annotations

import pytest
from helmsuite import HelmSuite

pytestmark = pytest.mark.timeout(2400)


class TestOnKind(HelmSuite):
    @pytest.fixture(scope="class")
    @classmethod
    def platform(cls, kind_cluster):
        return kind_cluster
