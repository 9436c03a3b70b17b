"""What Paddle needs on the CPU it runs on, applied from outside the model: the BLAS kernels for this CPU's vendor.

Paddle 3.3.1's CPU matmul calls its bundled MKL (libmklml_intel), which picks kernels by vendor: on x86 CPUs that
are not Intel's it takes slow generic ones (measured on a 2-core AMD EPYC, Zen 4: a 1576x768 @ 768x3072 fp32
matmul at 40 GFLOP/s, 108 with MKL_DEBUG_CPU_TYPE=5, torch 135). That variable makes this MKL use its AVX2
kernels whatever the vendor. MKL reads it at its first GEMM, not when Paddle is imported (``python benchmark.py
-mode gemm`` shows it: set after the first GEMM it changes nothing), so build_beit sets it before the model's
first GEMM. On Intel CPUs it would cap MKL at AVX2 (slower on AVX-512 machines), so it is set only for other
vendors, and never over a value the user has set. Paddle Inference (oneDNN) and GPU kernels do not use this MKL.
"""
import os
import platform

MKL_CPU_TYPE_VARIABLE = 'MKL_DEBUG_CPU_TYPE'
MKL_AVX2 = '5'
INTEL = 'GenuineIntel'


def _cpuinfo_field(name: str) -> str:
    """The first ``name : value`` of /proc/cpuinfo (Linux), or '' elsewhere."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
            for line in f:
                key, _, value = line.partition(':')
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ''


def cpu_vendor() -> str:
    """The CPU's vendor id, e.g. GenuineIntel or AuthenticAMD ('' when unknown)."""
    return _cpuinfo_field('vendor_id')


def cpu_model() -> str:
    return _cpuinfo_field('model name') or platform.processor() or platform.machine()


def is_x86() -> bool:
    return platform.machine().lower() in ('x86_64', 'amd64', 'i686', 'i386')


def use_fast_blas_kernels() -> bool:
    """Let MKL use its AVX2 GEMM kernels on a non-Intel x86 CPU; returns whether the variable was set here."""
    vendor = cpu_vendor()
    if not is_x86() or not vendor or vendor == INTEL or MKL_CPU_TYPE_VARIABLE in os.environ:
        return False
    os.environ[MKL_CPU_TYPE_VARIABLE] = MKL_AVX2
    return True


def describe() -> str:
    """One log line: the CPU and the BLAS setting in force."""
    setting = os.environ.get(MKL_CPU_TYPE_VARIABLE)
    return f'CPU: {cpu_model()} ({cpu_vendor() or "unknown vendor"})' + (
        f'; {MKL_CPU_TYPE_VARIABLE}={setting} (MKL kernels for any vendor)' if setting else '')


def cpu_line() -> str:
    """The header of every benchmark table: the CPU, its cores, and the BLAS setting the benchmark started with."""
    return (f'CPU: {cpu_model()} ({cpu_vendor() or "unknown vendor"}), {os.cpu_count()} cores; '
            f'{MKL_CPU_TYPE_VARIABLE}={os.environ.get(MKL_CPU_TYPE_VARIABLE, "unset")} at start')
