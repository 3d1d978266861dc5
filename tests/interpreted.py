"""Run a test script in a fresh Python under Triton's CPU interpreter (TRITON_INTERPRET=1 must be set
before triton is imported, so not in the test's own process); the script prints "ok" last."""
import os
import subprocess
import sys


def run_interpreted(code: str, timeout: int = 600, drop_env=()):
    env = {k: v for k, v in os.environ.items() if k not in drop_env}
    env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.stdout[-2000:], r.stderr[-3000:])
