"""The benchmarks' switches of prunekit's module settings hold only inside their block, an error included;
every benchmark script compiles."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from common import min_keep, residual_sums, scan_budget  # noqa: E402
from prunekit import planning, reconstruct, sensitivity  # noqa: E402


def test_scan_budget_is_set_inside_and_restored_after_an_error():
    before = sensitivity.SCAN_SECONDS
    with pytest.raises(RuntimeError), scan_budget(before * 2):
        assert before * 2 == sensitivity.SCAN_SECONDS
        raise RuntimeError("a row failed")
    assert before == sensitivity.SCAN_SECONDS


def test_residual_sums_restore_the_setting_they_found():
    before = reconstruct.SHORTCUTS
    try:
        reconstruct.SHORTCUTS = False  # not the default: a switch that forced it back on would show
        with residual_sums(True):
            assert reconstruct.SHORTCUTS is True
        assert reconstruct.SHORTCUTS is False
    finally:
        reconstruct.SHORTCUTS = before


def test_min_keep_holds_inside_only_and_none_leaves_the_default():
    before = planning.MIN_KEEP_FRACTION
    with min_keep(0.25):
        assert planning.MIN_KEEP_FRACTION == 0.25
    with min_keep(None):
        assert before == planning.MIN_KEEP_FRACTION
    assert before == planning.MIN_KEEP_FRACTION


@pytest.mark.parametrize("script", sorted((REPO_ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_every_benchmark_script_compiles(script, tmp_path):
    """Benchmarks run for hours and no test runs them: at least each one compiles (a misplaced ``global``
    in fewshot.py once broke it with a SyntaxError that nothing else caught)."""
    import py_compile

    py_compile.compile(str(script), cfile=str(tmp_path / "script.pyc"), doraise=True)
