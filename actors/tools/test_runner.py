"""Run a project's tests (pytest, or jest when the project has it) in a subprocess and return structured results.

Results come from the runners' machine-readable reports (JUnit XML, jest's JSON), never from scraping the console,
so an agent gets counts and each failure's name, message and traceback. Every run is bounded by a timeout: on
expiry the process group gets SIGINT (pytest then still writes its report of what ran) and, after a grace period,
SIGKILL. Problems that stop a run (collection errors, no tests, a missing runner) come back as a report too; a run
killed from outside (``RunKilledError``) gives no report at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import structlog
from pydantic import BaseModel

log = structlog.get_logger(__name__)

OUTPUT_TAIL_CHARS = 8000
GRACE_S = 3.0
# The tests are model-written code whose failure messages end up in events: they get only what a run needs (finding
# the interpreter and npx, a home, a locale, a temp dir), never the service's keys, tokens or DATABASE_URL, nor an
# outer test run's PYTEST_* options.
_CHILD_ENV = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP", "VIRTUAL_ENV", "PYTHONPATH"}
)
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ERROR_LINE = re.compile(r"^\w*(Error|Exception)\b")
_INTERRUPTED_AT = re.compile(r"^(\S+:\d+): KeyboardInterrupt$", re.MULTILINE)
# Starts a command with SIGINT at its default. A process started in the background by a non-interactive shell
# (a CI job, say) ignores SIGINT, and an ignored signal stays ignored across exec, so the timeout's SIGINT would
# do nothing and pytest, killed after the grace period, would write no report. On Linux the command is also killed
# when the process that started it dies (PR_SET_PDEATHSIG, kept across exec): a role actor killed mid-run left
# its pytest running on, the run's timeout gone with the actor. If that process is gone already, it never starts.
# Tests are batch work beside the message path: they run ``NICE_STEPS`` below the process that starts them (a role
# actor runs at nice 0, as every actor does: cluster/bootstrap.py, RAY_ENV).
NICE_STEPS = 10
_CHILD_STUB = f"""
import ctypes, os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
os.nice({NICE_STEPS})
if sys.platform == "linux":
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    if os.getppid() != int(sys.argv[1]):
        sys.exit("the process that started this command is gone")
os.execvp(sys.argv[2], sys.argv[2:])
"""


# Every process of a run carries its runner's identity in this variable (pid and start time: a pid alone may be
# reused). PR_SET_PDEATHSIG ends the run's own process when its runner dies, but not what the tests started in the
# background (it is not inherited across fork), and the group kill at the end of a run never comes when the runner
# was SIGKILLed: the role started in its place, and every run, find those by this mark and end them (``kill_orphans``).
_OWNER_VAR = "AGENTHUB_TEST_RUN_OWNER"


def _started(pid: int) -> str | None:
    """When ``pid`` started, in clock ticks since boot (``/proc/PID/stat``, field 22); None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_mark() -> str:
    return f"{os.getpid()}:{_started(os.getpid())}"


def _owner_of(environ: bytes) -> str | None:
    """The run owner named in a process's ``/proc/PID/environ``, if it carries one."""
    key = f"\0{_OWNER_VAR}=".encode()
    at = (b"\0" + environ).find(key)
    if at < 0:
        return None
    value = environ[at + len(key) - 1 :].split(b"\0", 1)[0]
    return value.decode("ascii", "replace")


def kill_orphans() -> list[int]:
    """SIGKILL every process of a test run whose runner is gone (Linux; elsewhere nothing to read): what a killed
    role's tests left running. A process that cleared its environment, or another user's, is not seen."""
    if sys.platform != "linux":
        return []
    alive: dict[str, bool] = {}
    killed: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            owner = _owner_of(Path(entry.path, "environ").read_bytes())
        except OSError:  # gone, or not ours to read
            continue
        if owner is None:
            continue
        if owner not in alive:
            pid, _, started = owner.partition(":")
            alive[owner] = pid.isdigit() and _started(int(pid)) == started
        if not alive[owner]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    if killed:
        log.warning("test_run.orphans_killed", pids=killed)
    return killed


def as_child(cmd: Sequence[str]) -> list[str]:
    """``cmd`` started with SIGINT at its default, as a terminal's Ctrl-C finds it, and bound to this process's
    life (see ``_CHILD_STUB``)."""
    return [sys.executable, "-c", _CHILD_STUB, str(os.getpid()), *cmd]


_PY_MARKERS = ("pyproject.toml", "setup.py", "setup.cfg", "pytest.ini", "tox.ini", "conftest.py")


class RunKilledError(RuntimeError):
    """The run ended by a SIGKILL this runner did not send: its verdict is unknown, so there is no report.

    Ray kills an actor's child processes before the actor's own process exits (``ray.kill``, a node draining), and
    the actor's code runs on for a moment: a run read as "no tests ran" was recorded as a failed attempt by a role
    being killed, and the role started again in its place made the next attempt (the chaos soak saw it as the same
    files written twice by one step). The OOM killer ends a run the same way. Raised, it is a failure of the
    machine, not of the code under test: the step is tried again, or dies with its process."""


class TestFailure(BaseModel):
    __test__ = False  # not a pytest test class

    name: str
    classname: str
    message: str
    traceback: str
    kind: Literal["failure", "error"] = "failure"


class TestReport(BaseModel):
    __test__ = False

    runner: str = "pytest"
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    count: int = 0
    duration_s: float = 0.0
    timed_out: bool = False
    exit_code: int | None = None
    failures: list[TestFailure] = []
    output_tail: str = ""
    problem: str | None = None  # why the run could not give a plain pass/fail verdict, in words

    @property
    def ok(self) -> bool:
        return self.count > 0 and self.failed == 0 and self.errors == 0 and not self.timed_out


class _Run(BaseModel):
    exit_code: int | None
    timed_out: bool
    output: str
    duration_s: float


def _child_env() -> dict[str, str]:
    """An allowlist of the service's environment (``LC_*`` too), minus any name that looks like a secret."""
    env = {
        k: v for k, v in os.environ.items() if (k in _CHILD_ENV or k.startswith("LC_")) and not _SECRET_NAME.search(k)
    }
    env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", CI="true", NO_COLOR="1", FORCE_COLOR="0")
    return env


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _with_run(report: TestReport, run: _Run, timeout_s: float) -> None:
    """What the runner saw, whatever the report parsed says: duration, exit code, output; a timeout is the
    report's problem."""
    report.duration_s = run.duration_s
    report.timed_out = run.timed_out
    report.exit_code = run.exit_code
    report.output_tail = run.output
    if run.timed_out:
        report.problem = f"timed out after {timeout_s:g}s; the run was interrupted"


async def _run(cmd: Sequence[str], cwd: Path, timeout_s: float, env: dict[str, str]) -> _Run:
    """Run ``cmd`` in its own session and process group; on timeout SIGINT the group, then SIGKILL it after a grace
    period. Whatever is left in the group when the run ends is killed, and first what runs of dead runners left."""
    await asyncio.to_thread(kill_orphans)
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *as_child(cmd),
        cwd=cwd,
        env={**env, _OWNER_VAR: _owner_mark()},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    tail = bytearray()

    async def drain() -> None:
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            tail.extend(chunk)
            del tail[: max(0, len(tail) - 4 * OUTPUT_TAIL_CHARS)]

    reader = asyncio.create_task(drain())
    timed_out = False
    try:
        await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        timed_out = True
        _signal_group(proc.pid, signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), GRACE_S)
        except TimeoutError:
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
    finally:
        # Always: the runner may be done, but what the tests started in the background (a server, a ``sleep``)
        # is still in the group (the child leads its own session, so the group is only the run's processes).
        # When cancelled, this also stops the tests themselves.
        _signal_group(proc.pid, signal.SIGKILL)
        # A grandchild that left the group could hold the pipe open; do not wait on it forever.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reader), 2.0)
        reader.cancel()
    output = _ANSI.sub("", tail.decode("utf-8", "replace"))[-OUTPUT_TAIL_CHARS:]
    duration = time.monotonic() - start
    if proc.returncode == -signal.SIGKILL and not timed_out:
        raise RunKilledError(f"the test run was killed (SIGKILL) from outside after {duration:.1f}s")
    return _Run(exit_code=proc.returncode, timed_out=timed_out, output=output, duration_s=duration)


# ---- pytest ----


def parse_junit_xml(path: Path) -> TestReport:
    """Counts and failures from a JUnit XML file (pytest's xunit2 layout; also plain ``<testsuite>`` roots)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
    report = TestReport()
    collection_errors = 0
    for suite in suites:
        for case in suite.iter("testcase"):
            name, classname = case.get("name"), case.get("classname", "")
            if name is None:  # the test that was running when pytest was interrupted: it has no result
                continue
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    message = child.get("message", "")
                    if child.tag == "error" and message.startswith("collection failure"):
                        collection_errors += 1
                    outcome = "failed" if child.tag == "failure" or outcome == "failed" else "error"
                    report.failures.append(
                        TestFailure(
                            name=name,
                            classname=classname,
                            message=message,
                            traceback=(child.text or "").strip(),
                            kind="failure" if child.tag == "failure" else "error",
                        )
                    )
                elif child.tag == "skipped" and outcome == "passed":
                    outcome = "skipped"
            if outcome == "passed":
                report.passed += 1
            elif outcome == "failed":
                report.failed += 1
            elif outcome == "error":
                report.errors += 1
            else:
                report.skipped += 1
    # A module that fails to import is an error, but no test ran: it does not count as a test.
    report.count = report.passed + report.failed + report.errors + report.skipped - collection_errors
    if collection_errors:
        report.problem = f"{collection_errors} collection error(s): tests could not be imported"
    return report


async def run_pytest(
    root: Path,
    args: list[str] | None = None,
    timeout_s: float = 120,
    *,
    python: str | None = None,
) -> TestReport:
    """Run pytest in ``root`` with a hard timeout and return the parsed JUnit report."""
    with tempfile.TemporaryDirectory(prefix="agenthub-pytest-") as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [python or sys.executable, "-m", "pytest", "-q", f"--junitxml={xml}", "-p", "no:cacheprovider"]
        cmd += ["-o", "junit_family=xunit2", *(args or [])]
        run = await _run(cmd, Path(root), timeout_s, _child_env())
        return _pytest_report(xml, run, Path(root), timeout_s)


def _pytest_report(xml: Path, run: _Run, root: Path, timeout_s: float) -> TestReport:
    """The JUnit counts plus what the process itself said: timeout, nothing collected, pytest's own errors."""
    if xml.exists() and xml.stat().st_size > 0:
        try:
            report = parse_junit_xml(xml)
        except ET.ParseError as e:
            report = TestReport(problem=f"unreadable JUnit XML from pytest: {e}")
    else:
        report = TestReport(problem=f"pytest wrote no JUnit report (exit code {run.exit_code})")
    report.runner = "pytest"
    _with_run(report, run, timeout_s)
    if run.timed_out:
        if where := _INTERRUPTED_AT.findall(run.output):
            report.problem += f" at {where[-1].removeprefix(f'{root.resolve()}{os.sep}')}"
    elif run.exit_code == 5 or (report.count == 0 and report.problem is None):
        report.problem = "no tests were collected"
    elif run.exit_code in (2, 3, 4) and report.problem is None:
        meaning = {2: "interrupted", 3: "internal error", 4: "usage error"}[run.exit_code]
        report.problem = f"pytest {meaning} (exit code {run.exit_code})"
    return report


# ---- jest ----


def jest_available(root: Path) -> bool:
    return shutil.which("node") is not None and (Path(root) / "node_modules" / ".bin" / "jest").exists()


def _first_line(text: str) -> str:
    """The line that says what went wrong: the first ``...Error`` line, else the first non-empty one."""
    lines = [line.strip().lstrip("● ").strip() for line in text.splitlines() if line.strip()]
    return next((line for line in lines if _ERROR_LINE.search(line)), lines[0] if lines else "")


def parse_jest_json(data: dict[str, object], root: Path | None = None) -> TestReport:
    """Counts and failures from ``jest --json`` output."""

    def num(key: str) -> int:
        value = data.get(key, 0)
        return value if isinstance(value, int) else 0

    report = TestReport(
        runner="jest",
        passed=num("numPassedTests"),
        failed=num("numFailedTests"),
        skipped=num("numPendingTests") + num("numTodoTests"),
        count=num("numTotalTests"),
    )
    results = data.get("testResults")
    for suite in results if isinstance(results, list) else []:
        if not isinstance(suite, dict):
            continue
        file = str(suite.get("name", ""))
        if root is not None:
            with contextlib.suppress(ValueError):
                file = Path(file).relative_to(Path(root).resolve()).as_posix()
        assertions = suite.get("assertionResults") or []
        for a in assertions if isinstance(assertions, list) else []:
            if isinstance(a, dict) and a.get("status") == "failed":
                messages = _ANSI.sub("", "\n\n".join(str(m) for m in a.get("failureMessages") or []))
                report.failures.append(
                    TestFailure(
                        name=str(a.get("fullName") or a.get("title", "")),
                        classname=file,
                        message=_first_line(messages),
                        traceback=messages.strip(),
                    )
                )
        # A suite that failed without a failed test did not run at all (syntax error, failing import).
        suite_message = _ANSI.sub("", str(suite.get("message") or ""))
        failed_tests = [a for a in assertions if isinstance(a, dict) and a.get("status") == "failed"]
        if suite.get("status") == "failed" and not failed_tests:
            report.errors += 1
            report.failures.append(
                TestFailure(
                    name=file,
                    classname=file,
                    message=_first_line(suite_message) or "test suite failed to run",
                    traceback=suite_message.strip(),
                    kind="error",
                )
            )
    if report.errors:
        report.problem = f"{report.errors} test suite(s) failed to run"
    return report


async def run_jest(root: Path, timeout_s: float = 120, args: list[str] | None = None) -> TestReport:
    """Run the project's own jest (``npx --no-install``) and return the parsed JSON report."""
    root = Path(root)
    if not jest_available(root) or shutil.which("npx") is None:
        missing = "node" if shutil.which("node") is None else "npx" if shutil.which("npx") is None else "jest"
        return TestReport(runner="jest", problem=f"jest cannot run here: {missing} not found")
    with tempfile.TemporaryDirectory(prefix="agenthub-jest-") as tmp:
        out = Path(tmp) / "jest.json"
        cmd = ["npx", "--no-install", "jest", "--ci", "--json", f"--outputFile={out}", "--watchman=false"]
        run = await _run([*cmd, *(args or [])], root, timeout_s, _child_env())
        try:
            report = parse_jest_json(json.loads(out.read_text(encoding="utf-8")), root)
        except (OSError, ValueError) as e:
            report = TestReport(runner="jest", problem=f"jest wrote no readable JSON report: {e}")
    _with_run(report, run, timeout_s)
    if not run.timed_out and report.count == 0 and report.problem is None:
        report.problem = "no tests were found"
    return report


# ---- choosing ----


def _is_python_project(root: Path) -> bool:
    if any((root / marker).exists() for marker in _PY_MARKERS):
        return True
    return any(True for _ in root.glob("test*.py")) or any(True for _ in root.glob("tests/**/*.py"))


def merge_reports(reports: Sequence[TestReport]) -> TestReport:
    """One verdict over several runners (a project with both Python and JavaScript tests)."""
    problems = [f"{r.runner}: {r.problem}" for r in reports if r.problem]
    codes = [r.exit_code for r in reports]
    return TestReport(
        runner="+".join(r.runner for r in reports),
        passed=sum(r.passed for r in reports),
        failed=sum(r.failed for r in reports),
        errors=sum(r.errors for r in reports),
        skipped=sum(r.skipped for r in reports),
        count=sum(r.count for r in reports),
        duration_s=sum(r.duration_s for r in reports),
        timed_out=any(r.timed_out for r in reports),
        exit_code=None if None in codes else max(c for c in codes if c is not None),
        failures=[f for r in reports for f in r.failures],
        output_tail="\n".join(r.output_tail for r in reports)[-OUTPUT_TAIL_CHARS:],
        problem="; ".join(problems) or None,
    )


async def run_tests(root: Path, timeout_s: float = 120) -> TestReport:
    """pytest for Python projects, jest where package.json and an installed jest exist, both for mixed projects.

    ``timeout_s`` bounds the whole call, not each runner.
    """
    root = Path(root)
    use_jest = (root / "package.json").exists() and jest_available(root)
    use_pytest = _is_python_project(root) or not use_jest
    deadline = time.monotonic() + timeout_s
    reports: list[TestReport] = []
    if use_pytest:
        reports.append(await run_pytest(root, timeout_s=timeout_s))
    if use_jest:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            reports.append(TestReport(runner="jest", timed_out=True, problem="no time left after pytest"))
        else:
            reports.append(await run_jest(root, timeout_s=remaining))
    return reports[0] if len(reports) == 1 else merge_reports(reports)
