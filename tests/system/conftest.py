"""Fixtures shared by the system tests."""
import pytest
import ray


@pytest.fixture(scope="module")
def cluster():
    """A new local Ray cluster for one test module (never one already running on the machine): 8 CPUs
    and 2 logical GPUs, so placement runs as on GPUs."""
    ray.init(address="local", num_cpus=8, num_gpus=2, include_dashboard=False)
    yield
    ray.shutdown()
