"""The package installs beside a cluster's own torch: its requirement is a range, not a pin."""
from __future__ import annotations

from importlib.metadata import requires

from packaging.requirements import Requirement


def test_the_torch_requirement_accepts_a_clusters_cuda_builds():
    torch_req = next(Requirement(r) for r in requires("prunerep") if Requirement(r).name == "torch")
    for version in ("2.11.0", "2.13.0", "2.14.1"):
        assert torch_req.specifier.contains(version), (version, str(torch_req))
    assert not torch_req.specifier.contains("2.10.0")  # older than anything it is tested with
