"""Child processes run together in the foreground: started in order (the next once the
previous says it is ready), their output interleaved line by line under their names, the
first SIGINT/SIGTERM forwarded to each and waited for up to a grace period before SIGKILL by
PID (a second signal skips the wait), and all of them stopped when one exits on its own."""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import FrameType
from typing import IO, Any

from rich.console import Console
from rich.text import Text

STYLES = ("cyan", "magenta", "green", "yellow", "blue")
#: Structured fields shown first, in this order, when a child logs JSON lines.
_HEAD = ("timestamp", "level", "event")


def render_line(line: str) -> str:
    """A structlog JSON line as ``HH:MM:SS level event key=value ...``; other lines as is."""
    stripped = line.strip()
    if not stripped.startswith("{"):
        return line.rstrip("\r\n")
    try:
        obj = json.loads(stripped)
    except ValueError:
        return line.rstrip("\r\n")
    if not isinstance(obj, dict) or "event" not in obj:
        return line.rstrip("\r\n")
    stamp = str(obj.get("timestamp", ""))
    with contextlib.suppress(ValueError):
        stamp = datetime.fromisoformat(stamp.replace("Z", "+00:00")).strftime("%H:%M:%S")
    parts = [stamp, f"{obj.get('level', '')!s:<7}", str(obj["event"])]
    for key, value in obj.items():
        if key in _HEAD:
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        parts.append(f"{key}={text}")
    return " ".join(p for p in parts if p)


def describe_exit(code: int) -> str:
    """``exit code N``, or ``signal NAME`` for a process a signal ended."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


@dataclass
class ChildSpec:
    name: str
    argv: list[str]
    #: Its environment; ``None``: this process's.
    env: Mapping[str, str] | None = None
    #: Polled after the start; the next child starts once it holds.
    ready: Callable[[], bool] | None = None


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes]
    style: str
    reader: threading.Thread | None = None


@dataclass
class _Exited:
    name: str
    code: int


@dataclass
class _Signalled:
    signum: int


@dataclass
class _NotReady:
    name: str


_Event = _Exited | _Signalled | _NotReady


@dataclass
class Supervisor:
    specs: Sequence[ChildSpec]
    grace_s: float = 10.0
    #: How long a child with a readiness check may take to become ready.
    ready_timeout_s: float = 120.0
    out: IO[str] | None = None
    _events: queue.SimpleQueue[_Event] = field(default_factory=queue.SimpleQueue)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _children: list[_Child] = field(default_factory=list)

    def _console(self) -> Console:
        return Console(file=self.out, soft_wrap=True, highlight=False)

    def say(self, name: str, message: str, style: str = "bold") -> None:
        width = max([len(c.spec.name) for c in self._children] + [len(name), 5])
        with self._lock:
            self._console().print(Text.assemble((f"{name:<{width}} | ", style), message))

    def show(self, text: str) -> None:
        """Print ``text`` as it is (no name column, no markup), between whole lines of the
        children's output."""
        with self._lock:
            self._console().print(text, markup=False, highlight=False)

    def _pump(self, child: _Child) -> None:
        assert child.proc.stdout is not None
        for raw in child.proc.stdout:
            self.say(child.spec.name, render_line(raw.decode("utf-8", "replace")), child.style)
        code = child.proc.wait()
        self._events.put(_Exited(child.spec.name, code))

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        def handler(signum: int, frame: FrameType | None) -> None:
            self._events.put(_Signalled(signum))  # SimpleQueue.put is safe in a handler

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def run(self) -> int:
        """Start the children and supervise them; 0 after a requested stop, 1 when a child
        failed to start, did not become ready or exited on its own."""
        with self._signals():
            for i, spec in enumerate(self.specs):
                try:
                    self._start(spec, STYLES[i % len(STYLES)])
                except OSError as err:
                    self.say("up", f"cannot start {spec.name}: {err.strerror}", "bold red")
                    self._stop(signal.SIGTERM)
                    return 1
                if spec.ready is not None:
                    early = self._await_ready(spec, spec.ready)
                    if early is not None:
                        return self._finish(early)
            return self._finish(self._events.get())

    def _await_ready(self, spec: ChildSpec, ready: Callable[[], bool]) -> _Event | None:
        """``None`` once ``ready()`` holds; else what happened first."""
        deadline = time.monotonic() + self.ready_timeout_s
        while not ready():
            if time.monotonic() > deadline:
                return _NotReady(spec.name)
            with contextlib.suppress(queue.Empty):
                return self._events.get(timeout=0.2)
        return None

    def _finish(self, event: _Event) -> int:
        """Stop every child after ``event``; the exit code it calls for."""
        match event:
            case _Signalled(signum):
                self.say("up", f"{signal.Signals(signum).name}: stopping", "bold")
                self._stop(signum)
                return 0
            case _Exited(name, code):
                self.say("up", f"{name} ended ({describe_exit(code)}); stopping", "bold red")
            case _NotReady(name):
                self.say(
                    "up", f"{name} not ready after {self.ready_timeout_s:g} s; stopping", "bold red"
                )
        self._stop(signal.SIGTERM)
        return 1

    def _start(self, spec: ChildSpec, style: str) -> None:
        proc = subprocess.Popen(
            spec.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(spec.env) if spec.env is not None else None,
            # Own session: a terminal's Ctrl-C reaches only us, and we forward it.
            start_new_session=True,
        )
        child = _Child(spec, proc, style)
        self._children.append(child)
        self.say(spec.name, f"started (pid {proc.pid}): {' '.join(spec.argv)}", style)
        child.reader = threading.Thread(target=self._pump, args=(child,), name=spec.name)
        child.reader.daemon = True
        child.reader.start()

    def _stop(self, signum: int) -> None:
        for child in self._children:
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signum)
        deadline = time.monotonic() + self.grace_s
        for child in self._children:
            self._wait(child, deadline)
        for child in self._children:
            if child.reader is not None:
                child.reader.join(5)
        for child in self._children:
            if child.proc.stdout is not None:
                child.proc.stdout.close()

    def _wait(self, child: _Child, deadline: float) -> None:
        while child.proc.poll() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._signalled_again():
                self.say(child.spec.name, "did not stop in time: SIGKILL", "bold red")
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                child.proc.wait()
                return
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(min(remaining, 0.1))
        self.say(child.spec.name, f"stopped ({describe_exit(child.proc.returncode)})", child.style)

    def _signalled_again(self) -> bool:
        while True:
            try:
                event: Any = self._events.get_nowait()
            except queue.Empty:
                return False
            if isinstance(event, _Signalled):
                return True
