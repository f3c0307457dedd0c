import pytest, torch
from hypothesis import settings, HealthCheck

# Property tests: CI runs a fixed set of examples; `pytest --hypothesis-profile=dev` explores many more at random
settings.register_profile('ci', max_examples=40, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile('dev', max_examples=500, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile('ci')

def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")

def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"): return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords: item.add_marker(skip)

@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
