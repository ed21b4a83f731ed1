"""Test-suite root: its folder is on sys.path (pytest's rootdir conftest), so tests import shared
reference implementations with `from references import ...`."""

import pytest
import torch


@pytest.fixture()
def one_thread():  # noqa: ANN201
    """Run a test with one intra-op thread (restored afterwards).

    Tiny models gain nothing from intra-op threads but their fork/join overhead: on a busy 2-core machine, two threads
    took 5-6x the CPU time of one for the coco128 end-to-end runs and the mode-switch matrices. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
