"""The compiled Rademacher kernel's loader: cached build, and a clean fallback when it cannot build."""

import pytest
import torch

from anyorder.core import native
from anyorder.core.rng import add_direction_, direction


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """An empty loader state and cache for the test; the real state is put back afterwards."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.delenv("ANYORDER_NATIVE", raising=False)
    monkeypatch.setenv("ANYORDER_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_cache_dirs", lambda: [tmp_path / "native"])
    return tmp_path


def test_disabled_by_environment_falls_back_with_the_same_numbers(fresh_loader, monkeypatch):
    monkeypatch.setenv("ANYORDER_NATIVE", "0")
    assert native.available() is False
    assert "ANYORDER_NATIVE=0" in native.status()
    w = torch.zeros(130)
    add_direction_(w, 0.5, 1, 2, 3, 4, distribution="rademacher")
    assert torch.equal(w, 0.5 * direction((130,), 1, 2, 3, 4, distribution="rademacher"))


def test_a_broken_compiler_warns_once_and_falls_back(fresh_loader, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_loader / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="could not build the native Rademacher kernel"):
        assert native.available() is False
    assert "compilation failed" in native.status()
    assert native.rademacher_axpy_(torch.zeros(10), 1, 1.0) is False


def test_builds_into_the_cache_once(fresh_loader, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    if not native.available():
        pytest.skip(native.status())
    built = list((fresh_loader / "native").glob("rademacher-*.so"))
    assert len(built) == 1
    monkeypatch.setattr(native, "_state", {})
    assert native.available()  # loads the cached file, no second build
    assert list((fresh_loader / "native").glob("*")) == built
