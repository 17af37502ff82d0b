"""The zygote as a real process: it preloads, forks workers on request (their fds passed
by SCM_RIGHTS), reports their exits, refuses bad requests, and leaves nothing behind.

Every read has a deadline and every process a test starts is killed in a finally block.
"""

import os
import socket
import subprocess
import sys

import pytest

from test_process import (
    EXIT_TIMEOUT_S,
    PYTHON_DIR,
    kill_if_running,
    read_frame,
    wait_gone,
    write_frame,
)


def _high(fd: int) -> int:
    """fd moved above 9, so that putting it on 3 or 4 cannot overwrite another."""
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Zygote:
    """`python -m pyherd_worker.zygote` with its control socket on fd 3 and report pipe on fd 4."""

    def __init__(self, *preload: str, path: str = "") -> None:
        self.control, child_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        report_r, report_w = os.pipe()
        self.report_r = report_r
        sock_fd, report_w = _high(child_control.detach()), _high(report_w)

        def wire() -> None:
            os.dup2(sock_fd, 3)
            os.dup2(report_w, 4)

        args = [sys.executable, "-m", "pyherd_worker.zygote", "--parent-pid", str(os.getpid())]
        for module in preload:
            args += ["--preload", module]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (PYTHON_DIR, path) if p))
        try:
            self.proc = subprocess.Popen(
                args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                preexec_fn=wire, pass_fds=(3, 4),
            )
        finally:
            os.close(sock_fd)
            os.close(report_w)
        self.seq = 0
        self.workers = []

    def report(self):
        return read_frame(self.report_r)

    def fork(self, fds, worker_id: str = "z1", handlers=()):
        self.seq += 1
        argv = ["--worker-id", worker_id]
        for h in handlers:
            argv += ["--handlers", h]
        msg = {"t": "fork", "seq": self.seq, "worker_id": worker_id, "argv": argv}
        socket.send_fds(self.control, [json_bytes(msg)], fds)
        return self.seq

    def start_worker(self, worker_id: str = "z1", handlers=()):
        """Forks a worker; (its pid, request write end, reply read end, stderr read end)."""
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        err_r, err_w = os.pipe()
        seq = self.fork([req_r, rep_w, err_w], worker_id, handlers)
        for fd in (req_r, rep_w, err_w):
            os.close(fd)
        forked = self.report()
        assert forked == {"t": "forked", "seq": seq, "pid": forked["pid"]}, forked
        self.workers.append(forked["pid"])
        return forked["pid"], req_w, rep_r, err_r

    def close(self) -> None:
        self.control.close()
        for pid in self.workers:
            kill_if_running(pid)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        os.close(self.report_r)
        self.proc.stderr.close()


def json_bytes(msg) -> bytes:
    import json

    return json.dumps(msg).encode("utf-8")


@pytest.fixture
def zygote():
    z = Zygote("json", "pyherd_worker.testing")
    try:
        yield z
    finally:
        z.close()


def test_it_preloads_then_forks_workers_that_serve_and_reports_their_exits(zygote):
    ready = zygote.report()
    assert ready["t"] == "ready" and ready["pid"] == zygote.proc.pid
    assert ready["preloaded"] == ["json", "pyherd_worker.testing"]
    pid, req_w, rep_r, err_r = zygote.start_worker("z7", ["pyherd_worker.testing"])
    try:
        hello = read_frame(rep_r)
        assert (hello["t"], hello["pid"], hello["worker_id"]) == ("hello", pid, "z7")
        assert "crash" in hello["handlers"]
        write_frame(req_w, {"t": "call", "id": 1, "cmd": "ctx_info", "args": {}})
        reply = read_frame(rep_r)
        assert reply["t"] == "ok" and reply["result"]["worker_id"] == "z7", reply
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        assert int(fields[1]) == zygote.proc.pid, "the zygote is the worker's parent"
        assert int(fields[2]) == pid, "the worker leads its own process group"
        write_frame(req_w, {"t": "call", "id": 2, "cmd": "crash", "args": {"code": 5}})
        assert read_frame(rep_r) is None
        assert zygote.report() == {"t": "exit", "pid": pid, "status": 5 << 8}
        assert b"exiting on purpose" in os.read(err_r, 4096)
        assert not os.path.exists(f"/proc/{pid}"), "the zygote reaped it"
    finally:
        for fd in (req_w, rep_r, err_r):
            os.close(fd)


def test_a_worker_ends_on_eof_and_a_bad_request_is_refused(zygote):
    assert zygote.report()["t"] == "ready"
    pid, req_w, rep_r, err_r = zygote.start_worker()
    try:
        assert read_frame(rep_r)["t"] == "hello"
        os.close(req_w)
        req_w = None
        assert zygote.report() == {"t": "exit", "pid": pid, "status": 0}
    finally:
        for fd in (req_w, rep_r, err_r):
            if fd is not None:
                os.close(fd)
    r, w = os.pipe()
    try:
        seq = zygote.fork([r, w])
    finally:
        os.close(r)
        os.close(w)
    refused = zygote.report()
    assert (refused["t"], refused["seq"]) == ("fork_failed", seq)
    assert "expected 3 fds" in refused["message"]
    zygote.seq += 1
    zygote.control.send(b"not json")
    refused = zygote.report()
    assert (refused["t"], refused["seq"]) == ("fork_failed", 0)
    assert "bad fork request" in refused["message"]


def test_closing_the_socket_ends_the_zygote_and_its_workers(zygote):
    assert zygote.report()["t"] == "ready"
    pid, req_w, rep_r, err_r = zygote.start_worker()
    try:
        assert read_frame(rep_r)["t"] == "hello"
        zygote.control.close()
        assert zygote.proc.wait(timeout=EXIT_TIMEOUT_S) == 0
        wait_gone(pid, EXIT_TIMEOUT_S)
    finally:
        for fd in (req_w, rep_r, err_r):
            os.close(fd)


def test_a_killed_zygote_takes_its_workers_with_it(zygote):
    assert zygote.report()["t"] == "ready"
    pid, req_w, rep_r, err_r = zygote.start_worker()
    try:
        assert read_frame(rep_r)["t"] == "hello"
        zygote.proc.kill()
        zygote.proc.wait(timeout=EXIT_TIMEOUT_S)
        # PR_SET_PDEATHSIG: the worker is killed as soon as its parent is gone.
        wait_gone(pid, 2.0)
        assert read_frame(rep_r) is None
    finally:
        for fd in (req_w, rep_r, err_r):
            os.close(fd)


def test_a_preload_that_fails_is_reported_with_its_traceback():
    z = Zygote("json", "no_such_module_for_pyherd")
    try:
        failed = z.report()
        assert failed["t"] == "preload_failed" and failed["module"] == "no_such_module_for_pyherd"
        assert failed["message"].startswith("preloading 'no_such_module_for_pyherd' failed: ModuleNotFoundError")
        assert failed["python_type"] == "ModuleNotFoundError"
        assert "Traceback" in failed["traceback"]
        assert z.proc.wait(timeout=EXIT_TIMEOUT_S) == 3
    finally:
        z.close()


def test_a_preload_that_starts_threads_is_refused_as_unsafe_to_fork(tmp_path):
    (tmp_path / "spins.py").write_text(
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(60,), name='spinner', daemon=True).start()\n"
    )
    z = Zygote("json", "spins", path=str(tmp_path))
    try:
        failed = z.report()
        assert failed["t"] == "preload_failed" and failed["module"] == "spins", failed
        assert failed["message"] == "fork is unsafe: the preload modules started threads (spinner)"
        assert z.proc.wait(timeout=EXIT_TIMEOUT_S) == 3
    finally:
        z.close()


def run_zygote(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyherd_worker.zygote", *args],
        env=dict(os.environ, PYTHONPATH=PYTHON_DIR), capture_output=True, timeout=30,
    )


def test_it_exits_at_once_when_its_parent_is_not_the_one_named():
    proc = run_zygote("--parent-pid", "1", "--preload", "json")
    assert proc.returncode == 0 and proc.stderr == b""


def test_bad_options_and_missing_fds_are_refused():
    proc = run_zygote("--bogus", "x")
    assert proc.returncode != 0 and b"unknown option --bogus" in proc.stderr
    proc = run_zygote("--preload")
    assert proc.returncode != 0 and b"--preload needs a value" in proc.stderr
    proc = run_zygote("--preload", "json")
    assert proc.returncode == 2 and b"fd 3 must be a socket" in proc.stderr
