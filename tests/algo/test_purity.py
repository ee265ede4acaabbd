import subprocess
import sys


def test_algo_imports_no_engine():
    code = ("import sys, mopd_ray.algo; bad = [m for m in ('ray', 'vllm', 'deepspeed') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
