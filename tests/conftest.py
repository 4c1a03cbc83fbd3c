"""Shared test setup."""

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def _istn_cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("istn-cache")


@pytest.fixture(autouse=True)
def _isolated_istn_cache(_istn_cache_root, monkeypatch):
    """Run every test with the preprocessing cache on but never in the real ~/.cache,
    and without the README examples' epoch/refinement caps.

    Subprocesses started by a test inherit the variable too.
    """
    monkeypatch.setenv("ISTN_CACHE_DIR", str(_istn_cache_root))
    monkeypatch.delenv("ISTN_NO_CACHE", raising=False)
    # the caps of the README examples (tests/test_readme.py sets them for its blocks)
    monkeypatch.delenv("ISTN_EXAMPLE_EPOCHS", raising=False)
    monkeypatch.delenv("ISTN_EXAMPLE_REFINE", raising=False)
    monkeypatch.delenv("ISTN_EXAMPLE_PAIRS", raising=False)


@pytest.fixture(scope="module")
def one_thread():
    """Bitwise-equal weights need the same thread count in-process and in subprocesses.

    Modules that compare weights use it with ``pytestmark = pytest.mark.usefixtures(...)``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small_synth2d(tmp_path_factory) -> Path:
    """8 training and 2 test pairs of istn's synthetic 2D data at 48x48 (seed 1)."""
    from istn.cli import main

    d = tmp_path_factory.mktemp("synth")
    assert main(["synth", "2d", "--out", str(d), "--pairs", "8", "--val", "0", "--test", "2",
                 "--size", "48", "48", "--seed", "1"]) == 0
    return d


def pytest_terminal_summary(terminalreporter):
    """List the README blocks that were not run (tests/test_readme.py), with the reason."""
    lines = []
    for rep in terminalreporter.stats.get("skipped", []):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        if "README block" in reason:
            lines.append(reason.removeprefix("Skipped: "))
    if lines:
        terminalreporter.write_sep("-", "README blocks not run")
        for line in lines:
            terminalreporter.write_line(line)
