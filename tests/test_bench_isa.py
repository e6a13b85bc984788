"""benchmarks/isa.py: the --isa stand-in's environment (issue 29 item 1)."""
import subprocess
import sys

import pytest

from benchmarks import isa


def test_avx2_limits_every_library_and_builds_apart():
    env = isa.environment("avx2", {"HOME": "/h", "PATH": "/bin"})
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert env["DDPM_KERNEL_ISA"] == "avx2" and env["DDPM_KERNEL_CACHE"] == "/h/.cache/ddpm/kernels-avx2"
    assert env["PATH"] == "/bin"
    assert isa.environment("native", {"PATH": "/bin"}) == {"PATH": "/bin"}


@pytest.mark.parametrize("argv, want", [(["x"], "native"), (["x", "--isa", "avx2"], "avx2"),
                                        (["x", "--isa=avx512", "--runs", "3"], "avx512")])
def test_the_flag_is_read_before_argparse(argv, want):
    assert isa._asked(argv) == want


def test_reexec_sets_the_limits_before_torch(tmp_path):
    """The re-executed process sees the variables (torch reads them at import), and says so only once."""
    code = ("import os, sys; sys.argv += ['--isa', 'avx2']; from benchmarks import isa; print('run'); isa.reexec(); "
            "print(os.environ['ATEN_CPU_CAPABILITY'], os.environ['DDPM_KERNEL_ISA'], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**isa.environment("native"), "XDG_CACHE_HOME": str(tmp_path)}).stdout.split("\n")
    assert out[:3] == ["run", "run", "avx2 avx2 False"]


def test_an_unknown_isa_is_refused():
    with pytest.raises(SystemExit, match="--isa 'avx9': allowed are native, avx2, avx512"):
        isa.reexec(["x", "--isa", "avx9"])
