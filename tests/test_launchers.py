"""The launchers (tools/dist_*.sh, tools/slurm_*.sh) run the project's Python without an activated
environment: <repo>/.venv/bin/python, else $PYTHON, else python3 (tools/_python.sh)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

SCRIPTS = ('dist_train.sh', 'dist_test.sh', 'slurm_train.sh', 'slurm_test.sh', '_python.sh')


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the launchers in ``<tmp>/repo/tools``, without a .venv (tests add one)."""
    tools = tmp_path / 'repo' / 'tools'
    tools.mkdir(parents=True)
    for name in SCRIPTS:
        shutil.copy(REPO / 'tools' / name, tools / name)
    return tmp_path / 'repo'


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """A PATH folder with a fake ``srun`` that writes its arguments, one a line, to $SRUN_LOG,
    and a ``python3`` without torch."""
    folder = tmp_path / 'bin'
    _executable(folder / 'srun', '#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_LOG"\n')
    _executable(folder / 'python3', '#!/bin/sh\necho "ModuleNotFoundError: No module named '
                "'torch'\" >&2\nexit 1\n")
    return folder


def _env(bin_dir: Path, tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHON', 'VIRTUAL_ENV')}
    env.update(PATH=f'{bin_dir}:/usr/bin:/bin', SRUN_LOG=str(tmp_path / 'srun.log'), **extra)
    return env


def _venv_python(root: Path) -> Path:
    """``<root>/.venv/bin/python``: a wrapper around the interpreter running the tests."""
    return _executable(root / '.venv' / 'bin' / 'python',
                       f'#!/bin/sh\nexec {sys.executable} "$@"\n')


def _srun_argv(script: Path, args: list[str], env: dict, tmp_path: Path) -> list[str]:
    proc = subprocess.run(['bash', str(script), 'gpu', 'job', *args], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return (tmp_path / 'srun.log').read_text().splitlines()


def test_slurm_train_uses_the_venv_python(checkout: Path, bin_dir: Path, tmp_path: Path) -> None:
    python = _venv_python(checkout)
    argv = _srun_argv(checkout / 'tools' / 'slurm_train.sh', ['a.py', 'work', '--amp'],
                      _env(bin_dir, tmp_path, PYTHON='/no/such/python'), tmp_path)
    start = argv.index(str(python))
    assert argv[start:] == [str(python), '-u', str(checkout / 'tools' / 'train.py'), 'a.py',
                            '--work-dir=work', '--launcher', 'slurm', '--amp']
    assert '--ntasks=8' in argv[:start] and '-p' in argv[:start]


def test_slurm_test_falls_back_to_PYTHON(checkout: Path, bin_dir: Path, tmp_path: Path) -> None:
    argv = _srun_argv(checkout / 'tools' / 'slurm_test.sh', ['a.py', 'b.pth'],
                      _env(bin_dir, tmp_path, PYTHON=sys.executable), tmp_path)
    start = argv.index(sys.executable)
    assert argv[start:] == [sys.executable, '-u', str(checkout / 'tools' / 'test.py'), 'a.py',
                            'b.pth', '--launcher', 'slurm']


@pytest.mark.parametrize('script', ['dist_train.sh', 'dist_test.sh', 'slurm_train.sh',
                                    'slurm_test.sh'])
def test_no_python_with_torch_is_one_clear_error(script: str, checkout: Path, bin_dir: Path,
                                                 tmp_path: Path) -> None:
    # no .venv, no PYTHON, and the python3 on PATH lacks torch
    proc = subprocess.run(['bash', str(checkout / 'tools' / script), 'a', 'b', 'c', 'd'],
                          env=_env(bin_dir, tmp_path), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count('\n') == 1 and proc.stderr.startswith('error: python3 '), proc.stderr
    assert "No module named 'torch'" in proc.stderr
    assert 'bash tools/setup_env.sh' in proc.stderr and str(checkout / '.venv') in proc.stderr
    assert not (tmp_path / 'srun.log').exists()  # nothing was launched
