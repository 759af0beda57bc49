"""Start and stop `target/debug/aios serve` (built by `cargo test`) for the Python client tests."""
import os
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
BIN = os.path.join(TARGET if os.path.isabs(TARGET) else os.path.join(ROOT, TARGET), "debug", "aios")


def start():
    """Serve the default config on a free port; returns (process, base URL) once healthy."""
    proc = subprocess.Popen([BIN, "serve", "--port", "0", "--threads", "2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    line = proc.stdout.readline()
    assert "listening on" in line, f"unexpected first line: {line!r}"
    base = line.strip().split()[-1]
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(base + "/health") as r:
                if r.status == 200:
                    return proc, base
        except Exception:
            pass
        if time.time() > deadline:
            proc.kill()
            raise SystemExit("server never became healthy")
        time.sleep(0.2)


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
