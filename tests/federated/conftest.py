import pytest
from fed_reference import make_problem


@pytest.fixture
def problem():
    return make_problem()
