"""Shared by scripts/bench-ack, scripts/bench-cluster and scripts/soak: start
`target/debug/voxpoll serve` ($VOXPOLL_BIN overrides it) on a free loopback port with a given
SQLite file and extra flags."""
import os
import re
import subprocess
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("VOXPOLL_BIN") or os.path.join(ROOT, "target", "debug", "voxpoll")


def start(db, *flags):
    """Returns (process, port) once the server logs that it listens."""
    p = subprocess.Popen([BIN, "serve", "--host", "127.0.0.1", "--port", "0", "--db", db, *flags],
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         env=dict(os.environ, NO_COLOR="1", RUST_LOG="voxpoll=info"))
    for line in p.stderr:
        m = re.search(rb"listening addr=([\d.]+):(\d+)", line)
        if m:
            # Keep draining the log so the server never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            return p, int(m.group(2))
    raise SystemExit("server did not start")
