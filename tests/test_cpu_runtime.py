"""cpu_runtime: MKL's AVX2 kernels chosen on non-Intel x86 CPUs only, by every model builder, never over the user."""
import os

import pytest

import cpu_runtime
from beit import build_beit
from beit_pretrain import build_beit_pretrain
from config import get_config
from helpers import TINY_CONFIG

VARIABLE = cpu_runtime.MKL_CPU_TYPE_VARIABLE


@pytest.fixture()
def on_cpu(monkeypatch):
    """Pretend to run on a CPU of the given vendor and architecture, with the variable unset."""
    def pretend(vendor: str, machine: str = 'x86_64'):
        monkeypatch.setattr(cpu_runtime, 'cpu_vendor', lambda: vendor)
        monkeypatch.setattr(cpu_runtime.platform, 'machine', lambda: machine)
        environment = {name: value for name, value in os.environ.items() if name != VARIABLE}
        monkeypatch.setattr(os, 'environ', environment)  # what the test sets goes with it
    return pretend


@pytest.mark.parametrize('build', [build_beit, build_beit_pretrain])
def test_model_builders_choose_the_avx2_kernels_on_amd(build, on_cpu, monkeypatch):
    on_cpu('AuthenticAMD')
    build(get_config(TINY_CONFIG))
    assert os.environ[VARIABLE] == '5'
    assert 'MKL_DEBUG_CPU_TYPE=5' in cpu_runtime.describe()


@pytest.mark.parametrize('vendor, machine', [('GenuineIntel', 'x86_64'), ('', 'x86_64'), ('ARM', 'aarch64')])
def test_other_cpus_keep_mkls_own_choice(vendor, machine, on_cpu):
    on_cpu(vendor, machine)
    assert not cpu_runtime.use_fast_blas_kernels()
    assert VARIABLE not in os.environ


def test_the_users_own_setting_wins(on_cpu, monkeypatch):
    on_cpu('AuthenticAMD')
    os.environ[VARIABLE] = '4'
    assert not cpu_runtime.use_fast_blas_kernels()
    assert os.environ[VARIABLE] == '4'


def test_this_machine_is_described():
    assert cpu_runtime.describe().startswith('CPU: ')
    assert cpu_runtime.cpu_model()
