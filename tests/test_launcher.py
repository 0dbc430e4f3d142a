"""vllm_safelora.launcher: ServerProcess ends its whole process tree, and its HTTP helpers.

A small Python "server" stands in for vLLM (``launcher.server_command`` is pointed at it): it
answers /v1/models, /metrics and /health like vLLM, and before serving it starts the kinds of
process vLLM's API server leaves behind when only it is stopped: a child that ignores SIGTERM
(an engine core busy in a kernel), a child in a session of its own, and a grandchild.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vllm_safelora import launcher

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process trees are read from /proc")

METRICS_TEXT = textwrap.dedent("""\
    # HELP safelora_refusals_total Adapters refused.
    # TYPE safelora_refusals_total counter
    safelora_refusals_total{reason="non_finite"} 2.0
    safelora_refusals_total{reason="too_large"} 1.0
    # HELP safelora_projections_total Projections.
    # TYPE safelora_projections_total counter
    safelora_projections_total 5.0
""")

SERVER = textwrap.dedent("""\
    import http.server, json, os, signal, subprocess, sys, time

    mode, pids_file, port = sys.argv[1], sys.argv[2], int(sys.argv[sys.argv.index("--port") + 1])
    py = sys.executable
    sleeper = "import time\\nwhile True: time.sleep(1)"
    deaf = "import signal, time\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\nwhile True: time.sleep(1)"
    own_session = "import os, time\\nos.setsid()\\nwhile True: time.sleep(1)"
    parent = ("import subprocess, sys, time\\n"
              f"subprocess.Popen([sys.executable, '-c', {sleeper!r}])\\nwhile True: time.sleep(1)")
    kids = [subprocess.Popen([py, "-c", code]) for code in (deaf, own_session, parent)]
    deadline = time.monotonic() + 30
    def tree():
        out = [os.getpid()] + [k.pid for k in kids]
        for k in kids:
            try:
                out += [int(p) for p in open(f"/proc/{k.pid}/task/{k.pid}/children").read().split()]
            except OSError:
                pass
        return out
    while len(tree()) < 5 and time.monotonic() < deadline:  # the grandchild is up
        time.sleep(0.05)
    while os.getsid(kids[1].pid) != kids[1].pid and time.monotonic() < deadline:  # setsid() done
        time.sleep(0.05)
    if mode == "deaf-leader":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *a: os._exit(0))  # the leader goes, its children stay
    metrics = open(pids_file + ".metrics", "rb").read()

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = {"/v1/models": b'{"data": []}', "/metrics": metrics, "/health": b""}.get(self.path)
            self.send_response(404 if body is None else 200)
            self.end_headers()
            self.wfile.write(body or b"")
        def do_POST(self):
            data = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(json.dumps({"echo": json.loads(data)}).encode())
        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", port), H)
    with open(pids_file + ".tmp", "w") as f:
        json.dump(tree(), f)
    os.replace(pids_file + ".tmp", pids_file)
    if mode == "leader-exits":
        os._exit(0)  # gone before stop(): its children are orphans
    srv.serve_forever()
""")


def alive(pid: int) -> bool:
    """Independent of the launcher: /proc/<pid>/stat exists and is not a zombie."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return data[data.rfind(")") + 2] not in "ZX"


@pytest.fixture
def fake_server(tmp_path, monkeypatch):
    script = tmp_path / "fake_vllm.py"
    script.write_text(SERVER)
    pids_file = tmp_path / "pids.json"
    Path(str(pids_file) + ".metrics").write_text(METRICS_TEXT)

    def make(mode: str) -> launcher.ServerProcess:
        monkeypatch.setattr(
            launcher, "server_command", lambda args: [sys.executable, str(script), mode, str(pids_file), *args]
        )
        server = launcher.ServerProcess(args=[], env=dict(os.environ), log_path=tmp_path / f"{mode}.log")
        return server

    def pids() -> list[int]:
        deadline = time.monotonic() + 30
        while not pids_file.exists():
            assert time.monotonic() < deadline, "the fake server never wrote its pids"
            time.sleep(0.05)
        return json.loads(pids_file.read_text())

    yield make, pids
    for pid in json.loads(pids_file.read_text()) if pids_file.exists() else []:  # never leave a tree behind
        if alive(pid):
            os.kill(pid, 9)


def test_stop_ends_the_whole_tree(fake_server):
    make, pids = fake_server
    server = make("leader-goes").start().wait_ready(timeout=60)
    tree = pids()
    assert len(tree) == 5 and all(alive(p) for p in tree)
    assert os.getsid(tree[2]) == tree[2] != os.getsid(tree[0])  # one child is in a session of its own
    t0 = time.monotonic()
    server.stop(timeout=3)
    assert [p for p in tree if alive(p)] == [], "processes of the server's tree outlived stop()"
    assert time.monotonic() - t0 < 3 + 10
    assert server.proc.returncode is not None  # the leader was reaped
    assert not server.alive()


def test_stop_escalates_to_sigkill_when_the_leader_ignores_sigterm(fake_server):
    make, pids = fake_server
    with make("deaf-leader") as server:
        server.wait_ready(timeout=60)
        tree = pids()
        t0 = time.monotonic()
        server.stop(timeout=1)
        assert time.monotonic() - t0 >= 1  # the grace period was given
    assert [p for p in tree if alive(p)] == []
    assert server.proc.returncode == -9


def test_stop_after_the_leader_exited_still_ends_its_children(fake_server):
    make, pids = fake_server
    server = make("leader-exits").start()
    tree = pids()
    server.proc.wait(timeout=30)
    leftover = [p for i, p in enumerate(tree) if i != 2]  # the child in its own session is out of reach
    assert leftover[1:] and all(alive(p) for p in leftover[1:])
    server.stop(timeout=2)
    assert [p for p in leftover if alive(p)] == []
    os.kill(tree[2], 9)


def test_kill_is_immediate(fake_server):
    make, pids = fake_server
    server = make("deaf-leader").start().wait_ready(timeout=60)
    tree = pids()
    t0 = time.monotonic()
    server.kill()
    assert time.monotonic() - t0 < 5
    assert [p for p in tree if alive(p)] == []


def test_http_helpers_and_metrics(fake_server):
    make, _ = fake_server
    server = make("leader-goes").start()
    try:
        server.wait_ready(timeout=60)
        assert server.startup_s is not None and server.healthy()
        assert server.get("/v1/models").json() == {"data": []}
        assert server.post("/echo", json={"a": 1}).json() == {"echo": {"a": 1}}
        m = server.metrics()
        assert m.refusals("non_finite") == 2 and m.value("safelora_refusals_total") == 3
        assert m.projections() == 5 and m.has_plugin_metrics()
        assert m.by_labels("safelora_refusals_total") == {'{reason="non_finite"}': 2.0, '{reason="too_large"}': 1.0}
        assert m.labelsets("safelora_refusals_total") == [{"reason": "non_finite"}, {"reason": "too_large"}]
        assert server.rss_bytes() > 0
    finally:
        server.stop(timeout=1)  # a child ignores SIGTERM: do not wait the default 30 s for it
    assert not server.healthy()


def test_wait_ready_stops_a_server_that_exits(fake_server, tmp_path, monkeypatch):
    monkeypatch.setattr(
        launcher, "server_command", lambda args: [sys.executable, "-c", "print('boom'); raise SystemExit(3)"]
    )
    server = launcher.ServerProcess(args=[], env=dict(os.environ), log_path=tmp_path / "exits.log")
    with pytest.raises(RuntimeError, match="exited with 3"):
        server.start().wait_ready(timeout=30)
    assert "boom" in server.log_text()


def test_run_to_exit_ends_the_tree_on_timeout(tmp_path):
    pids_file = tmp_path / "pids"
    code = (
        "import os, subprocess, sys, time\n"
        "k = subprocess.Popen([sys.executable, '-c', 'import os, time\\nos.setsid()\\nwhile True: time.sleep(1)'])\n"
        f"open({str(pids_file)!r}, 'w').write(f'{{os.getpid()}} {{k.pid}}')\n"
        "print('started', flush=True)\n"
        "while True: time.sleep(1)\n"
    )
    rc, out = launcher.run_to_exit([sys.executable, "-c", code], dict(os.environ), tmp_path / "run.log", timeout=5)
    assert rc is None and "started" in out
    assert [p for p in map(int, pids_file.read_text().split()) if alive(p)] == []
