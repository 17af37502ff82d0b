"""The zygote: imports the preload modules once, then forks every worker from itself.

Run by the host as ``python -m pyherd_worker.zygote --parent-pid PID --preload MODULE...``
with two fds open:

- fd 3, a SOCK_SEQPACKET socket on which fork requests arrive: one JSON message
  ``{"t": "fork", "seq": N, "worker_id": "w3", "argv": [...]}`` carrying the new
  worker's three fds (request pipe, reply pipe, stderr) by SCM_RIGHTS;
- fd 4, a pipe on which it reports, in the workers' framing (4-byte big-endian
  length + JSON): ``ready`` or ``preload_failed`` first, then ``forked`` /
  ``fork_failed`` per request and ``exit`` (pid, raw wait status) for every child it
  reaps.

A forked child leads its own process group, dies with the zygote (PR_SET_PDEATHSIG),
puts its fds on 3, 4 and 2 and runs the usual worker start (handlers, hello, calls),
watching the zygote as its parent. The zygote exits when the host closes the socket or
is gone, killing and reaping its children first.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from typing import Any, Dict, List, Optional, Set

from . import protocol, runtime
from .options import flag_pairs

CONTROL_FD = 3
REPORT_FD = 4
FORK_FDS = 3
MAX_REQUEST_BYTES = 1 << 16
PARENT_CHECK_INTERVAL_MS = 250
PR_SET_PDEATHSIG = 1
#: Exit code of a forked child whose worker start raised before the worker loop.
CHILD_FAILED = 70


def _parse_args(argv: List[str]) -> Dict[str, Any]:
    opts: Dict[str, Any] = {"preload": [], "parent_pid": None, "run_id": None}
    for flag, value in flag_pairs(argv, "pyherd_worker.zygote"):
        if flag == "--preload":
            opts["preload"].append(value)
        elif flag == "--parent-pid":
            opts["parent_pid"] = int(value)
        elif flag == "--run-id":  # the run's marker, for the registry's sweep
            opts["run_id"] = value
        else:
            raise SystemExit(f"pyherd_worker.zygote: unknown option {flag}")
    return opts


def preload(modules: List[str]) -> Optional[Dict[str, Any]]:
    """Imports `modules` in order; the `preload_failed` report of the first that raises."""
    for module in modules:
        try:
            importlib.import_module(module)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt at import included
            traceback.print_exc()
            frame = runtime.exception_frame(0, exc, "initialization", "startup_failed")
            frame["t"] = "preload_failed"
            frame["module"] = module
            frame["message"] = f"preloading {module!r} failed: {type(exc).__name__}: {frame['message']}"
            return frame
    others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    if others:
        # A fork copies only the forking thread: a lock another thread holds stays held
        # for ever in the child.
        return {
            "t": "preload_failed",
            "module": modules[-1] if modules else "",
            "message": f"fork is unsafe: the preload modules started threads ({', '.join(others)})",
        }
    return None


class Zygote:
    """The fork loop: requests in on the control socket, reports out on the report pipe."""

    def __init__(self, control: socket.socket, report_fd: int, parent: int) -> None:
        self.control = control
        self.report_fd = report_fd
        self.parent = parent
        self.pid = os.getpid()
        self.children: Set[int] = set()
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def report(self, frame: Dict[str, Any]) -> None:
        body = json.dumps(frame, separators=(",", ":")).encode("utf-8")
        data = struct.pack(">I", len(body)) + body
        while data:
            data = data[os.write(self.report_fd, data):]

    def serve(self) -> int:
        """Forks on request and reports exits until the host is gone or closes the socket."""
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w)
        poller = select.poll()
        poller.register(self.control.fileno(), select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        try:
            while True:
                events = poller.poll(PARENT_CHECK_INTERVAL_MS)
                if os.getppid() != self.parent:
                    return 0
                self.drain_wakeups()
                self.reap()
                if any(fd == self.control.fileno() for fd, _ in events):
                    body, fds, _, _ = socket.recv_fds(self.control, MAX_REQUEST_BYTES, FORK_FDS)
                    if not body and not fds:
                        return 0
                    self.fork(body, fds)
        except (BrokenPipeError, ConnectionResetError):
            return 0
        finally:
            self.end_children()

    def drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.report({"t": "exit", "pid": pid, "status": status})

    def fork(self, body: bytes, fds: List[int]) -> None:
        seq = 0
        try:
            msg = json.loads(body)
            seq = int(msg["seq"])
            worker_id = str(msg["worker_id"])
            argv = [str(a) for a in msg["argv"]]
            if len(fds) != FORK_FDS:
                raise ValueError(f"expected {FORK_FDS} fds with the request, got {len(fds)}")
        except (ValueError, KeyError, TypeError) as exc:
            for fd in fds:
                os.close(fd)
            self.report({"t": "fork_failed", "seq": seq, "message": f"bad fork request: {exc}"})
            return
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            self.report({"t": "fork_failed", "seq": seq, "message": f"fork failed: {exc}"})
            return
        if pid == 0:
            self.become_worker(fds, worker_id, argv)
        # The child does the same: whichever runs first, the group exists before the
        # host hears of the child, so killing the group always reaches it.
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass
        for fd in fds:
            os.close(fd)
        self.children.add(pid)
        self.report({"t": "forked", "seq": seq, "pid": pid})

    def become_worker(self, fds: List[int], worker_id: str, argv: List[str]) -> None:
        """In the forked child: becomes a worker on `fds`; never returns."""
        code = CHILD_FAILED
        try:
            os.setpgid(0, 0)
            if self.libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
            # The zygote may have died between fork and prctl: then nobody would kill us.
            if os.getppid() != self.pid:
                os._exit(0)
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.close(self.wake_r)
            os.close(self.wake_w)
            self.control.close()
            os.close(self.report_fd)
            request, reply, stderr = fds
            os.dup2(request, runtime.REQUEST_FD)
            os.dup2(reply, runtime.REPLY_FD)
            os.dup2(stderr, 2)
            for fd in fds:
                os.close(fd)
            os.environ["PYHERD_WORKER_ID"] = worker_id
            code = runtime.main(argv + ["--parent-pid", str(self.pid)])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def end_children(self) -> None:
        """Kills every child's process group and reaps them: the zygote leaves nothing."""
        for pid in self.children:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in list(self.children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self.children.clear()


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m pyherd_worker.zygote``."""
    opts = _parse_args(sys.argv[1:] if argv is None else argv)
    os.dup2(2, 1)
    parent = opts["parent_pid"] if opts["parent_pid"] is not None else os.getppid()
    if os.getppid() != parent:
        return 0
    try:
        control = socket.socket(fileno=CONTROL_FD)
        control.setblocking(True)
        os.fstat(REPORT_FD)
    except OSError as exc:
        print(f"pyherd_worker.zygote: fd 3 must be a socket and fd 4 a pipe: {exc}", file=sys.stderr)
        return 2
    zygote = Zygote(control, REPORT_FD, parent)
    began = time.perf_counter()
    failure = preload(opts["preload"])
    if failure is not None:
        zygote.report(failure)
        return 3
    protocol.select_codec()
    gc.collect()
    gc.freeze()
    zygote.report(
        {
            "t": "ready",
            "pid": zygote.pid,
            "preloaded": opts["preload"],
            "ms": round((time.perf_counter() - began) * 1000, 3),
        }
    )
    return zygote.serve()


if __name__ == "__main__":
    sys.exit(main())
