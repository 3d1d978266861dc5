"""Start a command, SIGKILL it once its output file holds a first complete line: the shared first
half of the kill-and-resume tests (batch runner, OpenAI batch files, data wrangling)."""
import signal
import subprocess
import time


def kill_after_first_line(cmd, cwd, env, out_path, log_path, timeout=240) -> int:
    """Run cmd until out_path has a line, then kill it; returns the lines written by then. Fails
    the test if the run ended on its own before it could be killed."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if out_path.exists() and out_path.read_bytes().count(b"\n") >= 1:
                    break
                time.sleep(0.005)
            finished = proc.poll() is not None
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert not finished, "the run ended before it could be killed: " + log_path.read_text()[-2000:]
    return out_path.read_bytes().count(b"\n")
