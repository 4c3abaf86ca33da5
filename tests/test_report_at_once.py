"""``--report-at-once`` (tests/report_at_once.py): a failure is on record even when the run is
cut off before pytest's summary, as a time limit cuts off benchmarks/gpu_check.sh's GPU tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
CUT_OFF = '''
def test_fails():
    assert 1 + 1 == 3, 'planted failure'


def test_is_cut_off():
    import os
    os._exit(3)  # the process ends here, as under `timeout`: no summary
'''


@pytest.mark.parametrize('at_once', [True, False])
def test_failure_is_printed_before_the_run_is_cut_off(tmp_path: Path, at_once: bool) -> None:
    (tmp_path / 'test_cut.py').write_text(CUT_OFF)
    args = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-p', 'report_at_once',
            'test_cut.py'] + (['--report-at-once'] if at_once else [])
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert ('planted failure' in output) is at_once, output
    assert ('test_cut.py::test_fails (call): failed' in output) is at_once, output
