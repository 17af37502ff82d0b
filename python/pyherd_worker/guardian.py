"""``python -m pyherd_worker.guardian``: ends what a host run leaves behind when the host dies.

The host starts one guardian per pool with a pipe on stdin that only the host holds and
never writes to. The guardian detaches (forks; the parent exits at once, so the host knows
it runs) and waits for EOF on that pipe: the kernel closes the pipe when the host exits,
even by SIGKILL. It then kills, PID-reuse safe:

- every process carrying the run id in its environment (``PYHERD_RUN_ID``, which every
  worker has and every process a handler starts inherits), and the recorded worker group
  it is in;
- every recorded worker (``--registry``) still running with the recorded start time and
  the run id on its command line or in its environment, with its whole process group;

repeating until a pass finds nothing, then removes the registry file and the temporary
file beside it (``<registry>.tmp``) that a host killed while rewriting the registry leaves.
A host that shuts down cleanly has removed the file and ended its workers already: the
pass finds nothing.
"""

from __future__ import annotations

import json
import os
import signal
import stat as stat_module
import sys
import time
from typing import Dict, List, Optional, Set, Tuple

from .options import flag_pairs

RUN_ID_VAR = b"PYHERD_RUN_ID"
RUN_ID_FLAG = b"--run-id"
SETTLE_S = 0.01
GIVE_UP_S = 1.5
#: What the host adds to the registry's name for the file it writes before renaming it.
TEMP_SUFFIX = ".tmp"


def stat(pid: int) -> Optional[Tuple[str, int, int]]:
    """(state, process group, start time) of a process, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 1 :].split()
    return fields[0].decode(), int(fields[2]), int(fields[19])


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def env_run_id(pid: int) -> Optional[bytes]:
    """The run id in a process's environment, if any."""
    for entry in _read(f"/proc/{pid}/environ").split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if sep and name == RUN_ID_VAR:
            return value
    return None


def carries(pid: int, run_id: bytes) -> bool:
    """The process has the run id in its environment or as ``--run-id`` on its command line."""
    if env_run_id(pid) == run_id:
        return True
    args = _read(f"/proc/{pid}/cmdline").split(b"\0")
    return any(a == RUN_ID_FLAG and b == run_id for a, b in zip(args, args[1:]))


def read_workers(registry: Optional[str]) -> List[Dict[str, int]]:
    """The recorded workers of the run (none when the file is gone or unreadable)."""
    if registry is None:
        return []
    try:
        with open(registry, "rb") as f:
            record = json.load(f)
        return [
            {"pid": int(w["pid"]), "pgid": int(w["pgid"]), "start_time": int(w["start_time"])}
            for w in record["workers"]
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _pids() -> List[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _signal(kill, target: int) -> bool:
    if target <= 1:  # never group or process 0/1
        return False
    try:
        kill(target, signal.SIGKILL)
        return True
    except OSError:
        return False


def sweep_once(run_id: bytes, workers: List[Dict[str, int]]) -> Set[int]:
    """One pass: kill what of the run is still alive; the pids found."""
    me = os.getpid()
    groups = {w["pgid"] for w in workers}
    found: Set[int] = set()
    for w in workers:
        s = stat(w["pid"])
        if s and s[0] not in "ZX" and s[2] == w["start_time"] and s[1] == w["pgid"] and carries(w["pid"], run_id):
            found.add(w["pid"])
            _signal(os.killpg, w["pgid"])
    for pid in _pids():
        if pid == me or env_run_id(pid) != run_id:
            continue
        s = stat(pid)
        if s is None or s[0] in "ZX":
            continue
        found.add(pid)
        if s[1] in groups:
            # The group is still the worker's: a pid stays taken while its group has members.
            _signal(os.killpg, s[1])
        _signal(os.kill, pid)
    return found


def sweep(run_id: str, registry: Optional[str], give_up_s: float = GIVE_UP_S) -> Set[int]:
    """Kill everything of the run until a pass finds nothing (or ``give_up_s`` passed);
    remove the registry file and its temporary file. Returns every pid killed."""
    rid = run_id.encode()
    workers = read_workers(registry)
    killed: Set[int] = set()
    deadline = time.monotonic() + give_up_s
    while True:
        found = sweep_once(rid, workers)
        killed |= found
        if not found or time.monotonic() > deadline:
            break
        time.sleep(SETTLE_S)
    if registry is not None:
        for path in (registry, registry + TEMP_SUFFIX):
            try:
                os.remove(path)
            except OSError:
                pass
    return killed


def wait_for_eof(fd: int = 0) -> None:
    """Block until every writer of ``fd`` has closed it (the host writes nothing)."""
    while os.read(fd, 4096):
        pass


def _parse_args(argv: List[str]) -> Dict[str, Optional[str]]:
    opts: Dict[str, Optional[str]] = {"run_id": None, "registry": None}
    for flag, value in flag_pairs(argv, "pyherd guardian"):
        if flag == "--run-id":
            opts["run_id"] = value
        elif flag == "--registry":
            opts["registry"] = value
        else:
            raise SystemExit(f"pyherd guardian: unknown option {flag}")
    if not opts["run_id"]:
        raise SystemExit("pyherd guardian: --run-id is required")
    return opts


def main(argv: Optional[List[str]] = None) -> int:
    """Detach, wait for the host to exit, then end the rest of its run."""
    opts = _parse_args(sys.argv[1:] if argv is None else argv)
    run_id = opts["run_id"] or ""
    try:
        is_pipe = stat_module.S_ISFIFO(os.fstat(0).st_mode)
    except OSError:
        is_pipe = False
    if not is_pipe:
        raise SystemExit("pyherd guardian: stdin must be the host's pipe")
    if os.fork() > 0:
        os._exit(0)  # the host reaps this parent; the guardian lives on, reparented
    os.setsid()  # out of the host's group and session: its signals and hangups miss us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    wait_for_eof()
    killed = sweep(run_id, opts["registry"])
    if killed:
        print(f"pyherd guardian: run {run_id} ended; killed pids {sorted(killed)}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
