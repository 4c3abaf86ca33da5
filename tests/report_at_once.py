"""pytest plugin: ``--report-at-once`` prints each test's outcome and duration, and each
failure's traceback, on stderr as soon as the test ends.

For runs that a time limit may stop before pytest's own summary (``benchmarks/gpu_check.sh`` runs
the GPU tests under ``timeout`` on a lent machine): what ran is on record even then. Loaded by
``tests/conftest.py``; elsewhere with ``-p report_at_once`` (``tests/`` on ``sys.path``).
"""
from __future__ import annotations

import sys

import pytest

#: the pytest config, for the report hook (a TestReport does not carry it)
_CONFIG: dict = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption('--report-at-once', action='store_true',
                     help="print each test's outcome and duration, and each failure's traceback, "
                     'as soon as the test ends (for runs a time limit may cut off before the '
                     "summary, as benchmarks/gpu_check.sh's)")


def pytest_configure(config: pytest.Config) -> None:
    _CONFIG['config'] = config


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    config = _CONFIG.get('config')
    if config is None or not config.getoption('--report-at-once'):
        return
    if report.when == 'call' or report.failed:
        sys.stderr.write(f'\n[{report.duration:7.1f}s] {report.nodeid} ({report.when}): '
                         f'{report.outcome}\n')
        if report.failed:
            sys.stderr.write(report.longreprtext + '\n')
        sys.stderr.flush()
