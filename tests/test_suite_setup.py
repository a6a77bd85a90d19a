"""The suite's own machinery: `make test` runs `-n 2 --dist loadgroup`, and each xdist_group must
reach one worker whole, or the module fixtures holding pipeline runs are built once per worker."""

import os

import pytest


@pytest.mark.xdist_group("suite_setup")
def test_an_xdist_group_reaches_the_scheduler(request):
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("only meaningful under `-n N --dist loadgroup` (make test)")
    # pytest-xdist's loadgroup groups by this suffix of the node id (xdist/remote.py
    # pytest_collection_modifyitems); pytest 9 ignores how xdist 3.8 sets it (requirements/lock.in).
    assert request.node.nodeid.endswith("@suite_setup"), request.node.nodeid
    assert os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw")
