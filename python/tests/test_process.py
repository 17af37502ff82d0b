"""A real worker process on real pipes: fd 3 in, fd 4 out, stdout redirected, and it
ends on EOF, on a failed import, and when its parent dies."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pyherd_worker import protocol

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pipes_for_child():
    """(request read end, request write end, reply read end, reply write end); the child's
    ends sit above fd 4 so that wiring them onto 3 and 4 cannot overwrite one another."""
    import fcntl

    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    high = []
    for fd in (req_r, rep_w):
        high.append(fcntl.fcntl(fd, fcntl.F_DUPFD, 10))
        os.close(fd)
    return high[0], req_w, rep_r, high[1]


def wiring(req_r: int, rep_w: int):
    """A preexec_fn putting the pipes on fds 3 and 4 (which must be listed in pass_fds,
    or subprocess closes them after preexec_fn has run)."""

    def wire() -> None:
        os.dup2(req_r, 3)
        os.dup2(rep_w, 4)

    return wire


class Worker:
    """`python -m pyherd_worker` with its request pipe on fd 3 and reply pipe on fd 4."""

    def __init__(self, *handler_specs: str, worker_id: str = "t1") -> None:
        req_r, self.req_w, self.rep_r, rep_w = pipes_for_child()

        args = [sys.executable, "-m", "pyherd_worker", "--worker-id", worker_id]
        for spec in handler_specs:
            args += ["--handlers", spec]
        env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
        self.proc = subprocess.Popen(
            args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=wiring(req_r, rep_w), pass_fds=(3, 4),
        )
        os.close(req_r)
        os.close(rep_w)
        self.requests = os.fdopen(self.req_w, "wb")
        self.replies = os.fdopen(self.rep_r, "rb")

    def read(self):
        body = protocol.read_frame(self.replies)
        return None if body is None else json.loads(body)

    def call(self, cmd, args=None, request_id=1):
        msg = {"t": "call", "id": request_id, "cmd": cmd, "args": args if args is not None else {}}
        protocol.write_frame(self.requests, json.dumps(msg).encode())
        return self.read()

    def close(self) -> None:
        for f in (self.requests, self.replies):
            try:
                f.close()
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def worker():
    w = Worker("pyherd_worker.testing")
    yield w
    w.close()


def test_it_says_hello_then_answers_calls(worker):
    hello = worker.read()
    assert hello["t"] == "hello" and hello["protocol"] == 1
    assert hello["pid"] == worker.proc.pid and hello["worker_id"] == "t1"
    assert {"ping", "echo", "info", "sleep", "crash"} <= set(hello["handlers"])
    assert worker.call("echo", {"x": "ü"}, request_id=5) == {"t": "ok", "id": 5, "result": {"x": "ü"}}


def test_output_on_stdout_goes_to_stderr_and_never_into_a_frame(worker):
    worker.read()
    reply = worker.call("spam_stdout", {"lines": 200})
    assert reply == {"t": "ok", "id": 1, "result": {"printed": 200}}
    assert worker.call("echo", [1, 2], request_id=2)["result"] == [1, 2]
    worker.requests.close()
    worker.proc.wait(timeout=10)
    assert worker.proc.stdout.read() == b""
    err = worker.proc.stderr.read()
    assert b"spam 199 from t1" in err and b"raw spam line" in err and b"not a frame at all" in err


def test_it_exits_zero_when_its_request_pipe_closes(worker):
    worker.read()
    worker.requests.close()
    assert worker.proc.wait(timeout=10) == 0
    assert worker.read() is None


def test_a_module_failing_at_import_is_reported_in_a_frame_and_exits_3(tmp_path):
    module = tmp_path / "broken_handlers.py"
    module.write_text("raise ImportError('needs a GPU')\n")
    w = Worker(str(module))
    try:
        frame = w.read()
        assert (frame["t"], frame["id"], frame["category"], frame["kind"]) == (
            "err", 0, "initialization", "handler_import_failed")
        assert "needs a GPU" in frame["message"] and frame["python_type"] == "ImportError"
        assert w.proc.wait(timeout=10) == 3
        assert b"needs a GPU" in w.proc.stderr.read()
    finally:
        w.close()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_it_exits_when_its_parent_dies_even_with_its_pipes_held_open(tmp_path):
    # An intermediate parent starts the worker, keeps the worker's pipes open elsewhere
    # (in this test process), reports the worker's pid, then is SIGKILLed: only the
    # worker's parent watchdog can notice.
    launcher = tmp_path / "launcher.py"
    launcher.write_text(
        "import os, signal, subprocess, sys\n"
        "env = dict(os.environ, PYTHONPATH=sys.argv[1])\n"
        "child = subprocess.Popen([sys.executable, '-m', 'pyherd_worker', '--worker-id', 'orphan',\n"
        "                          '--parent-pid', str(os.getpid())],\n"
        "                         env=env, pass_fds=(3, 4), stdin=subprocess.DEVNULL)\n"
        "print(child.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    req_r, req_w, rep_r, rep_w = pipes_for_child()
    proc = subprocess.Popen([sys.executable, str(launcher), PYTHON_DIR], stdout=subprocess.PIPE,
                            preexec_fn=wiring(req_r, rep_w), pass_fds=(3, 4))
    worker_pid = int(proc.stdout.readline())
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    try:
        deadline = time.monotonic() + 5
        while _running(worker_pid):
            assert time.monotonic() < deadline, "the orphaned worker is still running"
            time.sleep(0.02)
    finally:
        if _running(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
        for fd in (req_r, req_w, rep_r, rep_w):
            os.close(fd)
