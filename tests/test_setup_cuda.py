"""The CUDA side of the setup (tools/cuda_toolchain.py, used by tools/setup_env.sh), the GPU check
script (benchmarks/gpu_check.sh, dry run and an orchestration run with a stub interpreter), and
CI's deselection of the GPU-only tests."""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NVCC_13_0 = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2025 NVIDIA Corporation
Built on Wed_Aug_20_01:58:59_PM_PDT_2025
Cuda compilation tools, release 13.0, V13.0.88
Build cuda_13.0.r13.0/compiler.36424714_0
"""


def _load_toolchain() -> ModuleType:
    spec = importlib.util.spec_from_file_location('cuda_toolchain',
                                                  REPO / 'tools' / 'cuda_toolchain.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules['cuda_toolchain'] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


tc = _load_toolchain()


# --- the decision ---------------------------------------------------------------------------------

def test_no_gpu_keeps_the_cpu_build() -> None:
    plan = tc.decide(None, [], '13.0', (13, 0))
    assert not plan.cuda and plan.toolkit == '' and plan.arch_list == ''
    assert 'no GPU' in plan.reason


def test_cpu_only_torch_or_mmoverlock_cuda_0_keep_the_cpu_build() -> None:
    assert not tc.decide(None, [(9, 0)], None, (13, 0)).cuda
    plan = tc.decide(False, [(9, 0)], '13.0', (13, 0))
    assert not plan.cuda and 'MMOVERLOCK_CUDA=0' in plan.reason


def test_visible_gpus_give_a_cuda_build_with_their_archs_and_the_matching_system_nvcc() -> None:
    plan = tc.decide(None, [(9, 0), (8, 6), (9, 0)], '13.0', (13, 0))
    assert plan.cuda and plan.toolkit == 'system'
    assert plan.arch_list == '8.6;9.0' and plan.cuda_version == '13.0'


@pytest.mark.parametrize('system', [None, (12, 8), (13, 1)], ids=['none', '12.8', '13.1'])
def test_a_missing_or_mismatched_system_nvcc_takes_the_pip_compiler(system) -> None:
    plan = tc.decide(None, [(9, 0)], '13.0', system)
    assert plan.cuda and plan.toolkit == 'pip' and plan.cuda_version == '13.0'


def test_forced_cuda_without_gpu_needs_an_arch_list_and_then_takes_the_pip_compiler() -> None:
    with pytest.raises(tc.ToolchainError, match='TORCH_CUDA_ARCH_LIST'):
        tc.decide(True, [], '13.0', None)
    plan = tc.decide(True, [], '13.0', None, arch_override='9.0')
    assert plan.cuda and plan.toolkit == 'pip' and plan.arch_list == '9.0'
    assert 'MMOVERLOCK_CUDA=1' in plan.reason


def test_forced_cuda_with_a_cpu_only_torch_is_refused() -> None:
    with pytest.raises(tc.ToolchainError, match='CPU-only build'):
        tc.decide(True, [(9, 0)], None, (13, 0))


def test_arch_override_wins_over_the_gpus() -> None:
    plan = tc.decide(None, [(8, 0)], '13.0', (13, 0), arch_override='9.0;8.0+PTX')
    assert plan.arch_list == '9.0;8.0+PTX' and 'TORCH_CUDA_ARCH_LIST' in plan.reason


def test_toolkit_choice() -> None:
    assert tc.decide(None, [(9, 0)], '13.0', (13, 0), toolkit_choice='pip').toolkit == 'pip'
    assert tc.decide(None, [(9, 0)], '13.0', (13, 0), toolkit_choice='system').toolkit == 'system'
    with pytest.raises(tc.ToolchainError, match='no system CUDA toolkit'):
        tc.decide(None, [(9, 0)], '13.0', None, toolkit_choice='system')
    with pytest.raises(tc.ToolchainError, match='CUDA 12.8 and PyTorch was built with CUDA 13.0'):
        tc.decide(None, [(9, 0)], '13.0', (12, 8), toolkit_choice='system')
    with pytest.raises(tc.ToolchainError, match='MMOVERLOCK_CUDA_TOOLKIT'):
        tc.parse_toolkit_choice('conda')


@pytest.mark.parametrize('value,expected', [(None, None), ('', None), ('auto', None),
                                            ('1', True), ('0', False), ('yes', True)])
def test_parse_cuda_flag(value, expected) -> None:
    assert tc.parse_cuda_flag(value) is expected


def test_parse_cuda_flag_rejects_other_values() -> None:
    with pytest.raises(tc.ToolchainError, match="MMOVERLOCK_CUDA='gpu'"):
        tc.parse_cuda_flag('gpu')


# --- arch lists, versions, cache keys -------------------------------------------------------------

def test_arch_list_is_deduplicated_and_sorted_numerically() -> None:
    assert tc.format_arch_list([(9, 0), (12, 0), (8, 0), (9, 0)]) == '8.0;9.0;12.0'
    assert tc.format_arch_list([]) == ''


def test_parse_arch_list() -> None:
    assert tc.parse_arch_list('8.6; 9.0+PTX,9.0a 8.6') == ['8.6', '9.0+PTX', '9.0a']
    with pytest.raises(tc.ToolchainError, match="'sm_90'"):
        tc.parse_arch_list('sm_90')
    with pytest.raises(tc.ToolchainError, match='empty'):
        tc.parse_arch_list(' ; ')


def test_versions() -> None:
    assert tc.parse_nvcc_version(NVCC_13_0) == (13, 0)
    assert tc.parse_nvcc_version('command not found') is None
    assert tc.parse_version('12.8.1') == (12, 8)
    assert tc.cuda_tag('13.0') == 'cu130' and tc.cuda_tag('12.8') == 'cu128'


def test_cache_keys() -> None:
    cpu = tc.BuildPlan(cuda=False)
    # the CPU key is the one setup_env.sh has always used: CI's cached wheels stay valid
    assert tc.cache_key('2.14.1_cu130', 'cp311', cpu) == 'torch2.14.1_cu130-cp311'
    assert tc.default_tags('2.14.1+cu130', (3, 11, 7)) == ('2.14.1_cu130', 'cp311')
    cuda = tc.decide(True, [], '13.0', None, arch_override='9.0')
    assert tc.cache_key('2.14.1_cu130', 'cp311', cuda) == 'torch2.14.1_cu130-cp311-cu130-sm90'
    assert tc.arch_tag('8.6;9.0+PTX') == 'sm86_sm90ptx' and tc.arch_tag('9.0a') == 'sm90a'


def test_pip_toolkit_requirement_and_root(tmp_path: Path) -> None:
    assert (tc.pip_toolkit_requirement('13.0', '13.0.3.0')
            == 'cuda-toolkit[nvcc,cccl]==13.0.3.0')
    assert tc.pip_toolkit_requirement('13.0', None) == 'cuda-toolkit[nvcc,cccl]==13.0.*'
    with pytest.raises(tc.ToolchainError, match='cuda-toolkit 12.8.1 is installed'):
        tc.pip_toolkit_requirement('13.0', '12.8.1')
    assert tc.pip_toolkit_root(tmp_path, '13.0') == tmp_path / 'nvidia' / 'cu13'
    with pytest.raises(tc.ToolchainError, match='system CUDA 12.8 toolkit'):
        tc.pip_toolkit_root(tmp_path, '12.8')


# --- the CUDA_HOME made of links ------------------------------------------------------------------

def _fake_pip_toolkit(root: Path) -> Path:
    for rel in ('bin/nvcc', 'nvvm/bin/cicc', 'include/cuda_runtime.h',
                'include/cccl/cuda/std/version', 'lib/libcudart.so.13', 'lib/libcublas.so.13',
                'lib/libnvperf_host.so'):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    return root


def test_make_cuda_home_links_an_unversioned_cudart(tmp_path: Path) -> None:
    root = _fake_pip_toolkit(tmp_path / 'site' / 'nvidia' / 'cu13')
    home = tmp_path / 'cuda-home'
    for _ in range(2):  # re-running replaces it
        assert tc.make_cuda_home(root, home) == home
        assert (home / 'bin' / 'nvcc').read_text() == 'bin/nvcc'
        assert (home / 'nvvm' / 'bin' / 'cicc').read_text() == 'nvvm/bin/cicc'
        assert (home / 'include' / 'cuda_runtime.h').is_file()
        lib64 = home / 'lib64'
        assert os.path.realpath(lib64 / 'libcudart.so') == str(root / 'lib' / 'libcudart.so.13')
        assert (lib64 / 'libcudart.so.13').read_text() == 'lib/libcudart.so.13'
        assert (lib64 / 'libcublas.so').is_symlink()
        assert (lib64 / 'libnvperf_host.so').read_text() == 'lib/libnvperf_host.so'
    assert not (root / 'lib' / 'libcudart.so').exists()  # site-packages untouched


def test_make_cuda_home_names_what_is_missing(tmp_path: Path) -> None:
    root = _fake_pip_toolkit(tmp_path / 'cu13')
    (root / 'nvvm' / 'bin' / 'cicc').unlink()
    with pytest.raises(tc.ToolchainError, match=r'nvvm/bin/cicc \(extra nvvm\).*cuda-toolkit\['):
        tc.make_cuda_home(root, tmp_path / 'home')


def test_plan_command_prints_shell_assignments(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    if torch.version.cuda is None:
        pytest.fail('the pinned torch is a CUDA build (torch.version.cuda set); this one is not')
    monkeypatch.setenv('MMOVERLOCK_CUDA', '1')
    monkeypatch.setenv('TORCH_CUDA_ARCH_LIST', '9.0')
    monkeypatch.setenv('MMOVERLOCK_CUDA_TOOLKIT', 'pip')
    assert tc.main(['plan', '--torch-tag', '2.14.1_cu130', '--py-tag', 'cp311']) == 0
    values = dict(shlex.split(line)[0].split('=', 1) for line in
                  capsys.readouterr().out.splitlines())
    assert values['MMCV_CUDA'] == '1' and values['CUDA_TOOLKIT'] == 'pip'
    cuda = tc.cuda_tag(torch.version.cuda)
    assert values['CACHE_KEY'] == f'torch2.14.1_cu130-cp311-{cuda}-sm90'
    assert values['CPU_CACHE_KEY'] == 'torch2.14.1_cu130-cp311'
    assert re.fullmatch(r'cuda-toolkit\[nvcc,cccl\]==\d+\.\d+(\.\d+)*(\.\*)?',
                        values['PIP_TOOLKIT_REQ'])
    assert values['PIP_TOOLKIT_ROOT'].endswith(f'nvidia/cu{torch.version.cuda.split(".")[0]}')
    # forced without a GPU and without an arch list: one error line, status 2
    monkeypatch.delenv('TORCH_CUDA_ARCH_LIST')
    if not torch.cuda.is_available():
        assert tc.main(['plan']) == 2
        err = capsys.readouterr().err
        assert err.startswith('error: MMOVERLOCK_CUDA=1 but no GPU') and err.count('\n') == 1


# --- shell scripts --------------------------------------------------------------------------------

@pytest.mark.parametrize('script', ['tools/setup_env.sh', 'benchmarks/gpu_check.sh',
                                    'benchmarks/gpu_bundle.sh'])
def test_shell_scripts_parse(script: str) -> None:
    result = subprocess.run(['bash', '-n', str(REPO / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _gpu_check_repo(tmp_path: Path, with_bench: bool) -> Path:
    """A copy of the script in a repository layout with a small bundle beside it."""
    repo = tmp_path / 'repo'
    (repo / 'benchmarks').mkdir(parents=True)
    (repo / 'tools').mkdir()
    (repo / 'benchmarks' / 'gpu_check.sh').write_text(
        (REPO / 'benchmarks' / 'gpu_check.sh').read_text())
    (repo / 'tools' / 'cuda_toolchain.py').write_text(
        (REPO / 'tools' / 'cuda_toolchain.py').read_text())
    if with_bench:
        (repo / 'benchmarks' / 'gpu.py').write_text('')
    bundle = repo / 'gpu_bundle'
    bundle.mkdir()
    (bundle / 'addict-2.4.0-py3-none-any.whl').write_text('')
    src = tmp_path / 'mmcv-2.1.0'
    src.mkdir()
    (src / 'setup.py').write_text("args = ['-std=c++17']\nnvcc = ['-std=c++17']\n")
    with tarfile.open(bundle / 'mmcv-2.1.0.tar.gz', 'w:gz') as tar:
        tar.add(src, arcname='mmcv-2.1.0')
    return repo


def _run_gpu_check(repo: Path, tmp_path: Path, *args: str, **env: str):
    skip = ('GPU_', 'CUDA_', 'TORCH_CUDA', 'FORCE_CUDA', 'MMCV_', 'MMOVERLOCK_CUDA')
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    full_env = {**inherited, 'OUT': str(tmp_path / 'out'), 'TMPDIR': str(tmp_path),
                'GPU_CHECK_SITE': str(tmp_path / 'site'), 'MAX_JOBS': '1', **env}
    return subprocess.run(['bash', str(repo / 'benchmarks' / 'gpu_check.sh'), *args],
                          capture_output=True, text=True, env=full_env, timeout=120)


def test_gpu_check_dry_run_lists_the_steps(tmp_path: Path) -> None:
    repo = _gpu_check_repo(tmp_path, with_bench=True)
    result = _run_gpu_check(repo, tmp_path, '--dry-run')
    assert result.returncode == 0, result.stderr
    steps = re.findall(r'^step (\S+)', result.stdout, flags=re.M)
    assert steps == ['env', 'install', 'mmcv-cuda', 'mmcv-cpu', 'imports', 'pytest', 'bench-gpu']
    assert '1 wheels (addict )' in result.stdout
    assert 'mmcv-2.1.0.tar.gz' in result.stdout
    assert not (tmp_path / 'out').exists()  # nothing run, nothing written

    (repo / 'benchmarks' / 'gpu.py').unlink()
    result = _run_gpu_check(repo, tmp_path, '--dry-run', '--mmcv', 'cpu')
    steps = re.findall(r'^step (\S+)', result.stdout, flags=re.M)
    assert steps == ['env', 'install', 'mmcv-cpu', 'imports', 'pytest']
    assert 'bench: no benchmarks/gpu.py' in result.stdout
    # without gpu.py (which measures the kernels itself) the kernel benchmark runs alone
    (repo / 'benchmarks' / 'triton_bandwidth.py').write_text('')
    result = _run_gpu_check(repo, tmp_path, '--dry-run', '--mmcv', 'none')
    steps = re.findall(r'^step (\S+)', result.stdout, flags=re.M)
    assert steps == ['env', 'install', 'imports', 'pytest', 'bench-triton_bandwidth']


def test_gpu_check_refuses_a_missing_bundle_and_bad_options(tmp_path: Path) -> None:
    repo = _gpu_check_repo(tmp_path, with_bench=False)
    result = _run_gpu_check(repo, tmp_path, '--dry-run', '--mmcv', 'gpu')
    assert result.returncode == 2 and "--mmcv must be auto, cpu or none, not 'gpu'" in result.stderr
    (repo / 'gpu_bundle' / 'mmcv-2.1.0.tar.gz').unlink()
    result = _run_gpu_check(repo, tmp_path, '--dry-run')
    assert result.returncode == 2 and 'no mmcv-*.tar.gz' in result.stderr
    assert _run_gpu_check(repo, tmp_path, '--dry-run', '--mmcv', 'none').returncode == 0
    result = _run_gpu_check(repo, tmp_path, '--dry-run', '--bundle', str(tmp_path / 'nowhere'))
    assert result.returncode == 2 and 'benchmarks/gpu_bundle.sh' in result.stderr


# Logs each call with the variables that matter; prints a CUDA plan of the system toolkit for
# tools/cuda_toolchain.py; the CUDA build takes 2 s (it runs in the background); pytest fails.
STUB_PYTHON = r"""#!/usr/bin/env bash
# the line is formed first and appended in one write: the background CUDA build logs
# concurrently with the other steps, and piecewise writes would interleave
line=$(printf 'CALL'; printf ' %q' "$@"
  printf ' | FORCE_CUDA=%s CUDA_VISIBLE_DEVICES=%s MMCV_WITH_OPS=%s PYTHONPATH=%s' \
    "${FORCE_CUDA-unset}" "${CUDA_VISIBLE_DEVICES-unset}" "${MMCV_WITH_OPS-unset}" "${PYTHONPATH-}"
  printf ' TORCH_CUDA_ARCH_LIST=%s CUDA_HOME=%s' \
    "${TORCH_CUDA_ARCH_LIST-unset}" "${CUDA_HOME-unset}")
printf '%s\n' "$line" >>"$STUB_LOG"
[ "${1:-}" = - ] && cat >/dev/null
case " $* " in
  *cuda_toolchain.py*) printf '%s\n' CUDA_TOOLKIT=system ARCH_LIST=9.0 CUDA_HOME_SYSTEM=/opt/cuda \
                         "PLAN_REASON='CUDA ops for 9.0'" ;;
  *" pytest "*) echo '[    1.5s] tests/test_x.py::test_y (call): failed' >&2; exit 3 ;;
  *" wheel "*) [ "${FORCE_CUDA:-}" = 1 ] && sleep 2 ;;
esac
exit 0
"""


def test_gpu_check_runs_every_step_and_records_each(tmp_path: Path) -> None:
    """The whole orchestration with a stub interpreter that logs its calls (the real stack needs
    the GPU machine): a failing step is recorded and the later ones still run."""
    repo = _gpu_check_repo(tmp_path, with_bench=True)
    stub = tmp_path / 'python'
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    log = tmp_path / 'calls.log'
    result = _run_gpu_check(repo, tmp_path, '--budget', '600', PYTHON=str(stub),
                            STUB_LOG=str(log))
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / 'out'
    summary = (out / 'summary.txt').read_text()
    status = dict(re.findall(r'^(\S+)\s+(ok|failed \(exit \d+\)|timeout[^\n]*?)\s+\d+s$', summary,
                             flags=re.M))
    assert status == {'env': 'ok', 'install': 'ok', 'mmcv-cpu': 'ok', 'imports': 'ok',
                      'pytest': 'failed (exit 3)', 'bench-gpu': 'ok', 'cuda-build': 'ok',
                      'mmcv-cuda': 'failed (exit 3)'}, summary  # the stub's pytest fails
    assert 'mmcv CUDA plan: CUDA ops for 9.0' in summary
    assert re.search(r'^total\s', summary, flags=re.M)
    assert len(list(out.iterdir())) <= 8  # the device tool returns at most 8 files

    calls = log.read_text().splitlines()
    site, work = tmp_path / 'site', tmp_path / 'gpu_check_work'
    install = next(c for c in calls if ' install ' in c and '--target' in c)
    assert '--no-index' in install and f'--target {site}' in install and 'addict-2.4.0' in install
    build = next(c for c in calls if ' wheel ' in c and 'src-cpu' in c)
    assert 'FORCE_CUDA=0 CUDA_VISIBLE_DEVICES= MMCV_WITH_OPS=1' in build
    assert '--no-index' in build and f'{work}/src-cpu' in build
    cuda_build = next(c for c in calls if ' wheel ' in c and 'src-cuda' in c)
    assert 'FORCE_CUDA=1 CUDA_VISIBLE_DEVICES=unset MMCV_WITH_OPS=1' in cuda_build
    assert 'TORCH_CUDA_ARCH_LIST=9.0 CUDA_HOME=/opt/cuda' in cuda_build
    for kind in ('cpu', 'cuda'):
        patched = (work / f'src-{kind}' / 'setup.py').read_text()
        assert '-std=c++20' in patched and '-std=c++17' not in patched
    # the CUDA-ops wheel goes to its own target, which the comparison with the CPU ops reads first
    assert any(f'--target {site}-cuda' in c for c in calls)
    smoke = next(c for c in calls if c.startswith('CALL -') and f'PYTHONPATH={site}-cuda:' in c)
    assert smoke
    pytest_call, det_call = [c for c in calls if ' pytest ' in c]
    assert ' -m cuda ' in pytest_call and f'--junitxml={out}/junit_cuda.xml' in pytest_call
    assert f'PYTHONPATH={site}:{repo}' in pytest_call and '--report-at-once' in pytest_call
    # Mask R-CNN's AMP iteration needs mmcv's CUDA ops: deselected with the CPU-ops mmcv, run
    # with the CUDA-ops build first on the path once that build is done
    det = r'tests/test_cuda.py::test_one_training_iteration_with_amp\[det\]'
    assert f'--deselect {det}' in pytest_call
    assert det_call.endswith(f'{det} | FORCE_CUDA=unset CUDA_VISIBLE_DEVICES=unset '
                             f'MMCV_WITH_OPS=unset PYTHONPATH={site}-cuda:{site}:{repo} '
                             'TORCH_CUDA_ARCH_LIST=unset CUDA_HOME=unset'), det_call
    assert 'deselected (needs mmcv\'s CUDA ops' in summary
    # the tests' outcomes as printed at once, in the summary (once: the pytest step's)
    assert summary.count('  [    1.5s] tests/test_x.py::test_y (call): failed\n') == 1
    bench = next(c for c in calls if 'benchmarks/gpu.py' in c)
    # gpu.py ends its own cases 30 s before the step's timeout
    assert f'--out {out}/gpu --budget ' in bench
    assert 60 < int(re.search(r'--budget (\d+)', bench).group(1)) <= 600 - 30


# --- CI -------------------------------------------------------------------------------------------

def test_ci_runs_the_readme_test_command_without_the_gpu_tests() -> None:
    readme = (REPO / 'README.md').read_text()
    block = re.search(r'```bash\n(.*?)```', readme, flags=re.S).group(1)
    test_line = next(line for line in block.splitlines() if '-m pytest' in line)
    command = test_line.split('  #')[0].strip()
    assert "-m 'not cuda'" in command or '-m "not cuda"' in command
    ci = (REPO / '.ci' / 'run').read_text().strip().splitlines()[-1].strip()
    assert ci == command
