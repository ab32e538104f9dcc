"""Runs many short Python programs that start alike, each in a process of its own, paying for the start once.

Starting an interpreter that imports torch, transformers or vLLM costs seconds of CPU, most of a short
case's time. `run_cases` starts one interpreter, runs the common imports (the prelude) there, then forks one
child per case, one at a time: each case still has its own process (exit status, stdout, stderr,
environment, module state; nothing a case does reaches the next), it only begins where the prelude left off.
Whatever a case reads at run time (environment variables, arguments, which plugins load) is read in the
child, so a prelude must only import, never read the cases' settings.

Cases run one after another, never side by side: on a slow or busy machine they take longer and still pass.
HANG_GUARD_S bounds the whole run, to stop a hung process, never to judge speed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HANG_GUARD_S = 30 * 60  # for every subprocess the tests start: a hang guard, not a speed check

_RUNNER = r"""
import json, os, sys, traceback
spec = json.load(sys.stdin)
exec(compile(spec["prelude"], "<prelude>", "exec"), {"__name__": "__prelude__"})
program = compile(spec["program"], "<program>", "exec")
status = {}
for name, (args, env) in spec["cases"].items():
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        for fd, path in ((0, os.devnull), (1, f"{spec['dir']}/{name}.out"), (2, f"{spec['dir']}/{name}.err")):
            os.dup2(os.open(path, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        sys.argv = ["-c", *args]
        code = 0
        try:
            exec(program, {"__name__": "__main__"})
        except SystemExit as exit_:  # as the interpreter turns SystemExit into an exit status
            if isinstance(exit_.code, int):
                code = exit_.code
            elif exit_.code is not None:
                print(exit_.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code & 0xFF)  # not sys.exit: the exit handlers are the runner's
    status[name] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(status))
"""


def run_cases(prelude: str, program: str, cases: dict[str, tuple[list[str], dict[str, str | None]]],
              env: dict[str, str] | None = None, cwd=None) -> dict[str, subprocess.CompletedProcess]:
    """name -> (arguments, environment changes: None removes a variable) for `program` (as for `python -c
    program *arguments`) after `prelude`; returns name -> CompletedProcess (returncode, stdout, stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"prelude": prelude, "program": program, "dir": tmp, "cases": cases}
        # A session of its own, so that a hang guard's kill reaches the case's child too.
        runner = subprocess.Popen([sys.executable, "-c", _RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env, cwd=cwd, start_new_session=True)
        try:
            out, err = runner.communicate(json.dumps(spec), timeout=HANG_GUARD_S)
        except BaseException:  # the hang guard, or an interrupted test run: stop the runner and its case
            with contextlib.suppress(ProcessLookupError):
                os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
            raise
        assert runner.returncode == 0, f"the case runner failed:\n{err}"
        status = json.loads(out.splitlines()[-1])
        return {name: subprocess.CompletedProcess(
            [sys.executable, "-c", program, *cases[name][0]], status[name],
            Path(tmp, f"{name}.out").read_text(), Path(tmp, f"{name}.err").read_text()) for name in cases}
