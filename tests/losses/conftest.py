"""Fixtures for the loss tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_for_small_cases(request):
    # Small tiles gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's waits for a
    # descheduled thread dominate their run time. The large (slow-marked) cases keep every thread.
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
