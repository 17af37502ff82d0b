"""The guardian as a real process: it detaches, waits for its host's pipe to close, then
kills every process of the run (and only those) and removes the registry file.

Every process a test starts is killed in a finally block; every wait is bounded.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pyherd_worker import guardian

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_ID = "feedfacecafe0001"
GONE_TIMEOUT_S = 5.0

# Starts a child that sleeps (the "grandchild"), prints its pid, then sleeps itself.
PARENT_WITH_CHILD = (
    "import subprocess, sys, time\n"
    "env = None if sys.argv[1] == 'inherit' else {}\n"
    "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], env=env)\n"
    "print(c.pid, flush=True)\n"
    "time.sleep(600)\n"
)


def alive(pid: int) -> bool:
    s = guardian.stat(pid)
    return s is not None and s[0] not in "ZX"


def wait_gone(pids, limit=GONE_TIMEOUT_S):
    deadline = time.monotonic() + limit
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still alive after {limit} s: {[p for p in pids if alive(p)]}"
        time.sleep(0.01)


def start_parent(env_marker: bool, child_env: str, marker_args=()):
    env = dict(os.environ)
    env.pop("PYHERD_RUN_ID", None)
    if env_marker:
        env["PYHERD_RUN_ID"] = RUN_ID
    proc = subprocess.Popen(
        [sys.executable, "-c", PARENT_WITH_CHILD, child_env, *marker_args],
        env=env,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    child = int(proc.stdout.readline())
    return proc, child


def record(path, workers):
    with open(path, "w") as f:
        json.dump({"version": 1, "run_id": RUN_ID, "host": {"pid": 1, "start_time": 1}, "workers": workers}, f)


def worker_entry(pid, start_time=None):
    s = guardian.stat(pid)
    return {"worker_id": f"w{pid}", "run_id": RUN_ID, "pid": pid, "pgid": s[1],
            "start_time": s[2] if start_time is None else start_time}


def test_the_host_pipe_closing_kills_the_run_and_spares_the_rest(tmp_path):
    registry = tmp_path / f"{RUN_ID}.json"
    procs = []
    try:
        # A worker marked in its environment; its child inherits the marker.
        env_worker, env_child = start_parent(True, "inherit")
        # A worker marked only on its command line; its child has an empty environment
        # and is found through the worker's process group.
        arg_worker, bare_child = start_parent(False, "empty", ("--run-id", RUN_ID))
        # An unrelated process recorded with another start time: a reused pid.
        bystander, bystander_child = start_parent(False, "empty")
        procs = [env_worker, arg_worker, bystander]
        record(registry, [worker_entry(env_worker.pid), worker_entry(arg_worker.pid),
                          worker_entry(bystander.pid, start_time=1)])
        guardian_end, host_end = os.pipe()
        starter = subprocess.Popen(
            [sys.executable, "-m", "pyherd_worker.guardian", "--run-id", RUN_ID, "--registry", str(registry)],
            stdin=guardian_end,
            env={**os.environ, "PYTHONPATH": PYTHON_DIR},
        )
        os.close(guardian_end)
        assert starter.wait(timeout=30) == 0  # detached
        assert all(alive(p) for p in (env_worker.pid, env_child, arg_worker.pid, bare_child))
        os.close(host_end)  # the host "dies"
        for p in (env_worker, arg_worker):
            p.wait(timeout=GONE_TIMEOUT_S)
        wait_gone([env_child, bare_child])
        deadline = time.monotonic() + GONE_TIMEOUT_S
        while registry.exists():
            assert time.monotonic() < deadline, "the registry file was not removed"
            time.sleep(0.01)
        assert alive(bystander.pid) and alive(bystander_child)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            p.wait(timeout=GONE_TIMEOUT_S)


def test_a_sweep_without_a_registry_finds_marked_processes_alone():
    proc, child = start_parent(True, "inherit")
    try:
        killed = guardian.sweep(RUN_ID, None)
        assert {proc.pid, child} <= killed
        proc.wait(timeout=GONE_TIMEOUT_S)
        wait_gone([child])
        assert guardian.sweep(RUN_ID, None) == set()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=GONE_TIMEOUT_S)


def test_unreadable_registries_mean_no_recorded_workers(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert guardian.read_workers(str(bad)) == []
    assert guardian.read_workers(str(tmp_path / "missing.json")) == []
    bad.write_text(json.dumps({"workers": [{"pid": "x"}]}))
    assert guardian.read_workers(str(bad)) == []
    assert guardian.read_workers(None) == []
    guardian.sweep(RUN_ID, str(bad), give_up_s=0)
    assert not bad.exists()


def test_options_are_parsed_strictly():
    assert guardian._parse_args(["--run-id", "ab", "--registry", "/x"]) == {"run_id": "ab", "registry": "/x"}
    for argv in ([], ["--run-id"], ["--bogus", "1"], ["--registry", "/x"]):
        with pytest.raises(SystemExit):
            guardian._parse_args(argv)


def test_processes_and_groups_0_and_1_are_never_signalled():
    assert guardian._signal(os.kill, 0) is False
    assert guardian._signal(os.killpg, 1) is False
    gone = 2**22 + 12345  # above the kernel's largest pid
    assert guardian.stat(gone) is None
    assert guardian.carries(gone, b"x") is False
    assert guardian._signal(os.kill, gone) is False


def test_a_sweep_removes_the_temporary_file_a_host_killed_mid_write_left(tmp_path):
    registry = tmp_path / f"{RUN_ID}.json"
    record(registry, [])
    temp = tmp_path / f"{RUN_ID}.json.tmp"
    temp.write_text('{"version": 1, "run_')
    other = tmp_path / "feedfacecafe0002.json.tmp"
    other.write_text("")
    guardian.sweep(RUN_ID, str(registry), give_up_s=0)
    assert not registry.exists() and not temp.exists()
    assert other.exists(), "another run's file was removed"


def test_a_sweep_of_a_missing_registry_file_is_quiet(tmp_path):
    assert guardian.sweep(RUN_ID, str(tmp_path / "gone.json"), give_up_s=0) == set()


def test_a_guardian_without_a_pipe_on_stdin_refuses_to_start(tmp_path):
    def close_stdin():
        os.close(0)

    with open(tmp_path / "not-a-pipe", "w+") as f:
        for stdin, preexec in ((f, None), (subprocess.DEVNULL, close_stdin)):
            starter = subprocess.run(
                [sys.executable, "-m", "pyherd_worker.guardian", "--run-id", RUN_ID],
                stdin=stdin,
                preexec_fn=preexec,
                env={**os.environ, "PYTHONPATH": PYTHON_DIR},
                capture_output=True,
                timeout=30,
            )
            assert starter.returncode != 0
            assert b"stdin must be the host's pipe" in starter.stderr
