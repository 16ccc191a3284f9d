"""`python -m <module> ...` without paying for a fresh interpreter each time: one server process imports
torch, the pipeline and every stage once, then forks a child per command, which runs the module the
way `python -m` would and reports its exit status, stdout and stderr.

The child: its own process group; stdin from /dev/null, stdout and stderr into files; the command's cwd,
environment (the server's unless given) and argv; the cwd first on sys.path; then
`runpy.run_module(module, run_name="__main__", alter_sys=True)`. As the interpreter would: SystemExit's
code is the exit status (None 0, an int itself, anything else printed to stderr and 1); any other
exception goes through sys.excepthook (so the hook `start_stage` installs takes effect) and exits 1;
non-daemon threads are joined, atexit handlers run and stdio is flushed before the child exits.

What differs from a fresh interpreter: modules the server imported are not imported again (so a
warning printed at import time is not printed per command, and an environment variable read at import
time is read once, from the server's environment), and they come from the server's code root (the
repository), not from the command's cwd (a tiny project's copy of the same code).

Use: `with StageServer(env) as server: result = server.run([python, "-m", "stages.prepare", ...], cwd)`;
`result` is a subprocess.CompletedProcess (returncode negative for a signal, as subprocess gives it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class StageServer:
    """A server process (see the module's docstring), started with `env` (default: this process's)."""

    def __init__(self, env: dict | None = None, code_root: Path = REPO, startup_timeout: float = 600):
        self._log = tempfile.TemporaryFile(mode="w+")  # the server's own stderr: import warnings, a crash
        self._process = subprocess.Popen([sys.executable, __file__, str(code_root)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._log, env=env, text=True, bufsize=1)
        ready = self._reply(startup_timeout)
        if ready != {"ready": True}:
            raise RuntimeError(f"the stage server did not start: {ready}")

    def run(self, command: list[str], cwd: Path, env: dict | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess:
        """`command` ([python, "-m", module, *args]) run in a child forked from the server, in `cwd`."""
        if len(command) < 3 or command[1] != "-m":
            raise ValueError(f"not a `python -m <module>` command: {command}")
        request = {"module": command[2], "args": command[3:], "cwd": str(cwd), "env": env, "timeout": timeout}
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        reply = self._reply(timeout + 60)
        if reply.get("timed_out"):
            raise subprocess.TimeoutExpired(command, timeout, reply["stdout"], reply["stderr"])
        return subprocess.CompletedProcess(command, reply["returncode"], reply["stdout"], reply["stderr"])

    def _reply(self, timeout: float) -> dict:
        import selectors

        with selectors.DefaultSelector() as selector:
            selector.register(self._process.stdout, selectors.EVENT_READ)
            line = self._process.stdout.readline() if selector.select(timeout) else ""
        if not line:
            self._log.seek(0)
            raise RuntimeError(f"the stage server stopped or did not answer in {timeout:.0f} s:\n{self._log.read()[-3000:]}")
        return json.loads(line)

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()  # the server ends at the end of its input
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process.stdout.close()
        self._log.close()

    def __enter__(self) -> StageServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the server process ---


def _preload(code_root: Path) -> None:
    """Import every stage (and with them torch and the pipeline) and the `python -m pipeline` CLI."""
    import importlib

    for path in sorted((code_root / "stages").glob("*.py")):
        if path.stem != "__init__":
            importlib.import_module(f"stages.{path.stem}")
    importlib.import_module("pipeline.cli")


def _exit_status(stop: SystemExit) -> int:
    """The status the interpreter exits with for an uncaught SystemExit."""
    code = stop.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _finish(status: int) -> int:
    """What the interpreter does on its way out: join non-daemon threads, run atexit handlers, flush stdio."""
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001  (as the interpreter: a failed flush of stdout is status 120)
            status = 120 if stream is sys.stdout else status
    return status


def _child(request: dict, out_path: str, err_path: str, reply_fd: int) -> None:
    """Run the request's module as `python -m` would, in this forked child; never returns."""
    status = 1
    try:
        os.close(reply_fd)
        os.setpgid(0, 0)
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out_path, os.O_WRONLY), (2, err_path, os.O_WRONLY)):
            opened = os.open(path, flags)
            os.dup2(opened, fd)
            os.close(opened)
        sys.stdin = open(0, closefd=False)  # not the server's reader, which may hold the next requests
        os.chdir(request["cwd"])
        if request["env"] is not None:
            os.environ.clear()
            os.environ.update(request["env"])
        sys.argv = [request["module"], *request["args"]]  # run_module puts the module's file first
        sys.path.insert(0, request["cwd"])  # what `python -m` puts first
        import runpy

        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            status = 0
        except SystemExit as stop:
            status = _exit_status(stop)
        except BaseException:
            sys.excepthook(*sys.exc_info())
            status = 1
        status = _finish(status)
    except BaseException:  # the set-up itself failed (e.g. no such cwd): say so, exit 1
        import traceback

        traceback.print_exc()
        status = 1
    finally:
        os._exit(status)


def _run(request: dict, reply, folder: str) -> None:
    """One request: fork, wait (killing the child's process group at the request's timeout), reply."""
    out_path, err_path = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
    for path in (out_path, err_path):
        open(path, "w").close()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(request, out_path, err_path, reply.fileno())
    try:
        os.setpgid(pid, pid)  # also here: killpg must find the group even before the child set it
    except OSError:
        pass
    deadline, timed_out = time.monotonic() + request["timeout"], False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            timed_out = True
            os.killpg(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.005)
    result = {"returncode": os.waitstatus_to_exitcode(status), "timed_out": timed_out}
    for name, path in (("stdout", out_path), ("stderr", err_path)):
        with open(path, encoding="utf-8", errors="replace") as captured:
            result[name] = captured.read()
    reply.write(json.dumps(result) + "\n")
    reply.flush()


def serve(code_root: Path) -> None:
    """Answer one JSON line per request line on stdin until it ends. Replies go to a private copy of
    stdout; the real stdout goes to stderr, so that nothing printed while importing spoils them."""
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.path[0] = str(code_root)  # instead of tests/, this file's folder
    _preload(code_root)
    # not a TemporaryDirectory: its finalizer runs at exit, so in every child's atexit handlers too
    folder = tempfile.mkdtemp(prefix="stage-server-")
    reply.write(json.dumps({"ready": True}) + "\n")
    reply.flush()
    try:
        for line in sys.stdin:
            _run(json.loads(line), reply, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
