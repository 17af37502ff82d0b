"""A real worker process on real pipes: fd 3 in, fd 4 out, stdout redirected, and it
ends on EOF, on a failed import, and when its parent dies.

Every read from a worker has a deadline, so a hung worker fails a test instead of
hanging the suite, and every process a test starts is killed in a finally block.
"""

import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READ_TIMEOUT_S = 10.0
EXIT_TIMEOUT_S = 5.0
ORPHAN_TIMEOUT_S = 2.0


def pipes_for_child():
    """(request read end, request write end, reply read end, reply write end); the child's
    ends sit above fd 4 so that wiring them onto 3 and 4 cannot overwrite one another."""
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


def read_exact(fd: int, n: int, deadline: float) -> bytes:
    """n bytes from fd, fewer only at end of file; fails the test at the deadline."""
    data = b""
    while len(data) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"no frame from the worker within {READ_TIMEOUT_S} s"
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            continue
        chunk = os.read(fd, n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def read_frame(fd: int, timeout: float = READ_TIMEOUT_S):
    """The next frame's JSON from fd (decoded independently of the package), or None at EOF."""
    deadline = time.monotonic() + timeout
    header = read_exact(fd, 4, deadline)
    if not header:
        return None
    assert len(header) == 4, f"the reply pipe ended inside a frame header: {header!r}"
    length = int.from_bytes(header, "big")
    body = read_exact(fd, length, deadline)
    assert len(body) == length, "the reply pipe ended inside a frame body"
    return json.loads(body.decode("utf-8"))


def write_frame(fd: int, msg) -> None:
    body = json.dumps(msg).encode("utf-8")
    data = memoryview(len(body).to_bytes(4, "big") + body)
    while data:
        data = data[os.write(fd, data):]


def running(pid: int) -> bool:
    """Whether pid is a live process (a zombie nobody has reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_gone(pid: int, timeout: float) -> float:
    """Seconds until pid is gone; fails the test if it outlives the timeout."""
    start = time.monotonic()
    while running(pid):
        assert time.monotonic() - start < timeout, f"process {pid} still runs after {timeout} s"
        time.sleep(0.01)
    return time.monotonic() - start


def kill_if_running(pid: int) -> None:
    if running(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Worker:
    """`python -m pyherd_worker` with its request pipe on fd 3 and reply pipe on fd 4."""

    def __init__(self, *handler_specs: str, worker_id: str = "t1", extra_args=()) -> None:
        req_r, self.req_w, self.rep_r, rep_w = pipes_for_child()
        args = [sys.executable, "-m", "pyherd_worker", "--worker-id", worker_id, *extra_args]
        for spec in handler_specs:
            args += ["--handlers", spec]
        env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
        env.pop("PYHERD_JSON", None)
        try:
            self.proc = subprocess.Popen(
                args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                preexec_fn=wiring(req_r, rep_w), pass_fds=(3, 4),
            )
        finally:
            os.close(req_r)
            os.close(rep_w)

    def read(self, timeout: float = READ_TIMEOUT_S):
        return read_frame(self.rep_r, timeout)

    def call(self, cmd, args=None, request_id=1):
        write_frame(self.req_w, {"t": "call", "id": request_id, "cmd": cmd, "args": args if args is not None else {}})
        return self.read()

    def close_requests(self) -> None:
        if self.req_w is not None:
            os.close(self.req_w)
            self.req_w = None

    def wait(self, timeout: float = EXIT_TIMEOUT_S) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        self.close_requests()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        os.close(self.rep_r)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def worker():
    w = Worker("pyherd_worker.testing")
    try:
        yield w
    finally:
        w.close()


def test_it_says_hello_then_answers_calls(worker):
    hello = worker.read()
    assert hello["t"] == "hello" and hello["id"] == 0 and hello["protocol"] == 1
    assert hello["pid"] == worker.proc.pid and hello["worker_id"] == "t1"
    assert {"ping", "echo", "info", "sleep", "crash"} <= set(hello["handlers"])
    assert hello["adapters"] == []
    assert hello["python"] == sys.version.split()[0]
    assert hello["json"] in ("json", "orjson")
    assert worker.call("echo", {"x": "ü", "n": [1, None]}, request_id=5) == {
        "t": "ok", "id": 5, "result": {"x": "ü", "n": [1, None]}}
    ping = worker.call("ping", request_id=6)
    assert ping == {"t": "ok", "id": 6, "result": {"pong": True, "worker_id": "t1", "pid": worker.proc.pid}}


def test_the_dspy_adapter_loads_by_module_name_and_is_announced(tmp_path):
    # A second handler file reports the environment the adapter left for litellm.
    (tmp_path / "env_probe.py").write_text(
        "import os\nfrom pyherd_worker import handler\n\n"
        "@handler\ndef env_probe(args):\n    return os.environ.get('LITELLM_LOCAL_MODEL_COST_MAP')\n"
    )
    saved = os.environ.pop("LITELLM_LOCAL_MODEL_COST_MAP", None)
    try:
        w = Worker("pyherd_worker.dspy_adapter", str(tmp_path / "env_probe.py"))
    finally:
        if saved is not None:
            os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = saved
    try:
        hello = w.read()
        assert hello["t"] == "hello" and hello["adapters"] == ["dspy"]
        assert {"configure_lm", "create_program", "execute_program"} <= set(hello["handlers"])
        assert w.call("env_probe", request_id=2)["result"] == "True"
        created = w.call("create_program", {"id": "qa", "signature": "question -> answer"}, request_id=3)["result"]
        lm = {"provider": "dummy", "answers": {"": {"answer": "42"}}}
        args = {"program_id": "qa", "inputs": {"question": "q"}, "program": created["definition"], "lm": lm}
        reply = w.call("execute_program", args, request_id=4)
        assert (reply["t"], reply["result"]["outputs"]) == ("ok", {"answer": "42"})
        reply = w.call("execute_program", {**args, "lm": None}, request_id=5)
        assert (reply["t"], reply["id"], reply["category"], reply["kind"]) == (
            "err", 5, "invalid_request", "lm_not_configured")
        assert reply["python_type"] == "pyherd_worker.handlers.HandlerError" and "configure_lm" in reply["message"]
    finally:
        w.close()


def test_frames_larger_than_a_pipe_buffer_cross_both_ways(worker):
    assert worker.read()["t"] == "hello"
    text = "é" * 300_000 + "end"
    assert worker.call("echo", {"text": text}, request_id=3) == {"t": "ok", "id": 3, "result": {"text": text}}
    assert worker.call("big_result", {"bytes": 1_000_000}, request_id=4)["result"] == "x" * 1_000_000
    assert worker.call("echo", "small", request_id=5)["result"] == "small"


def test_output_on_stdout_goes_to_stderr_and_never_into_a_frame(worker):
    assert worker.read()["t"] == "hello"
    reply = worker.call("spam_stdout", {"lines": 200})
    assert reply == {"t": "ok", "id": 1, "result": {"printed": 200}}
    # The fake frame header written to fd 1 did not land on the reply pipe.
    assert worker.call("echo", [1, 2], request_id=2) == {"t": "ok", "id": 2, "result": [1, 2]}
    worker.close_requests()
    assert worker.wait() == 0
    assert worker.read() is None  # nothing else was on the reply pipe
    assert worker.proc.stdout.read() == b""
    err = worker.proc.stderr.read()
    assert b"spam 0 from t1" in err and b"spam 199 from t1" in err
    assert err.count(b"raw spam line") == 200
    assert b"\x00\x00\x00\x10not a frame at all" in err


def test_faults_in_handlers_are_answered_and_the_worker_goes_on():
    w = Worker("pyherd_worker.testing", extra_args=("--max-frame-bytes", "4096"))
    try:
        assert w.read()["t"] == "hello"
        replies = {
            cmd: w.call(cmd, args, request_id=i)
            for i, (cmd, args) in enumerate(
                [
                    ("raise_error", {"message": "on purpose ü"}),
                    ("not_json", {}),
                    ("deep_result", {}),
                    ("big_result", {"bytes": 10_000}),
                    ("no_such_handler", {}),
                ],
                start=1,
            )
        }
        err = replies["raise_error"]
        assert (err["t"], err["id"], err["category"], err["kind"], err["python_type"], err["message"]) == (
            "err", 1, "python", "python_exception", "ValueError", "on purpose ü")
        assert "raise_error" in err["traceback"]
        assert (replies["not_json"]["id"], replies["not_json"]["kind"]) == (2, "result_not_serializable")
        assert (replies["deep_result"]["id"], replies["deep_result"]["kind"]) == (3, "result_not_serializable")
        assert (replies["big_result"]["id"], replies["big_result"]["kind"]) == (4, "result_too_large")
        assert (replies["no_such_handler"]["id"], replies["no_such_handler"]["kind"]) == (5, "unknown_command")
        assert w.call("big_result", {"bytes": 1000}, request_id=6) == {"t": "ok", "id": 6, "result": "x" * 1000}
        assert w.call("async_echo", {"a": 1}, request_id=7) == {"t": "ok", "id": 7, "result": {"a": 1}}
        assert w.proc.poll() is None
    finally:
        w.close()


def test_it_exits_zero_promptly_when_its_request_pipe_closes(worker):
    assert worker.read()["t"] == "hello"
    assert worker.call("echo", 1)["result"] == 1
    start = time.monotonic()
    worker.close_requests()
    assert worker.wait(timeout=EXIT_TIMEOUT_S) == 0
    assert time.monotonic() - start < 2.0
    assert worker.read() is None


def test_a_crashing_handler_ends_the_process_with_its_code(worker):
    assert worker.read()["t"] == "hello"
    write_frame(worker.req_w, {"t": "call", "id": 1, "cmd": "crash", "args": {"code": 7}})
    assert worker.read() is None  # no reply: the reply pipe just ends
    assert worker.wait() == 7
    assert b"exiting on purpose" in worker.proc.stderr.read()


def test_processes_a_handler_starts_do_not_hold_the_pipes(worker):
    assert worker.read()["t"] == "hello"
    child = worker.call("spawn_child", {"close_fds": False})["result"]["pid"]
    try:
        assert running(child)
        write_frame(worker.req_w, {"t": "call", "id": 2, "cmd": "crash", "args": {"code": 5}})
        # The reply pipe ends with the worker, though its child lives on.
        assert worker.read(timeout=5.0) is None
        assert worker.wait() == 5
        assert running(child)
    finally:
        kill_if_running(child)


@pytest.mark.parametrize(
    "source, python_type, words",
    [
        ("raise ImportError('needs a GPU')\n", "ImportError", "needs a GPU"),
        ("import sys\nsys.exit('needs a GPU')\n", "SystemExit", "needs a GPU"),
        ("raise RuntimeError('needs a GPU at /dev/\\udcff')\n", "RuntimeError", "needs a GPU at /dev/\\udcff"),
    ],
    ids=["import-error", "system-exit", "surrogate-in-message"],
)
def test_a_module_failing_at_import_is_reported_in_a_frame_and_exits_3(tmp_path, source, python_type, words):
    module = tmp_path / "broken_handlers.py"
    module.write_text(source)
    w = Worker("pyherd_worker.testing", str(module))
    try:
        frame = w.read()
        assert (frame["t"], frame["id"], frame["category"], frame["kind"]) == (
            "err", 0, "initialization", "handler_import_failed")
        assert str(module) in frame["message"] and words in frame["message"]
        assert frame["python_type"] == python_type
        assert "broken_handlers.py" in frame["traceback"]
        assert w.wait() == 3
        assert w.read() is None  # no hello after the error
        assert b"needs a GPU" in w.proc.stderr.read()
    finally:
        w.close()


def test_a_missing_handler_file_is_reported_and_exits_3(tmp_path):
    w = Worker(str(tmp_path / "nowhere.py"))
    try:
        frame = w.read()
        assert (frame["id"], frame["kind"], frame["python_type"]) == (0, "handler_import_failed", "FileNotFoundError")
        assert w.wait() == 3
    finally:
        w.close()


LAUNCHER = """\
import os, signal, subprocess, sys
python_dir, mode = sys.argv[1], sys.argv[2]
args = [sys.executable, '-m', 'pyherd_worker', '--worker-id', 'orphan']
if mode != 'no-parent-pid':
    args += ['--parent-pid', str(os.getpid())]
env = dict(os.environ, PYTHONPATH=python_dir)
child = subprocess.Popen(args, env=env, pass_fds=(3, 4), stdin=subprocess.DEVNULL)
print(child.pid, flush=True)
if mode != 'at-once':
    sys.stdin.readline()  # the test has seen the worker's hello: it is past its start-up
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("mode", ["at-once", "after-hello", "no-parent-pid"])
def test_an_orphaned_worker_exits_even_with_its_pipes_held_open(tmp_path, mode):
    # An intermediate parent starts the worker and is SIGKILLed, either at once (maybe
    # before the worker's watchdog has started) or once the worker has said hello.
    # The worker's pipes stay open in this test process, so EOF cannot end it: only
    # its parent watchdog can notice.
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    req_r, req_w, rep_r, rep_w = pipes_for_child()
    worker_pid = None
    proc = subprocess.Popen(
        [sys.executable, str(launcher), PYTHON_DIR, mode],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        preexec_fn=wiring(req_r, rep_w), pass_fds=(3, 4),
    )
    try:
        worker_pid = int(proc.stdout.readline())
        if mode != "at-once":
            hello = read_frame(rep_r)
            assert hello["t"] == "hello" and hello["pid"] == worker_pid
            assert running(worker_pid)
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        assert proc.wait(timeout=EXIT_TIMEOUT_S) == -signal.SIGKILL
        wait_gone(worker_pid, ORPHAN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if worker_pid is not None:
            kill_if_running(worker_pid)
        proc.stdin.close()
        proc.stdout.close()
        for fd in (req_r, req_w, rep_r, rep_w):
            os.close(fd)
