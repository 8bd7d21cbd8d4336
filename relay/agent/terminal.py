"""The agent's web terminal: a shell on a pseudo-terminal, carried by one terminal
stream (stream protocol ``terminal``, relay.mux.terminal; docs/PROTOCOL.md section 17).

Off unless the agent is started with ``--terminal SHELL`` (and ``--terminal-user
NAME``): an agent without it refuses every terminal stream with NOT_ALLOWED. With it,
each stream the gateway opens starts one shell:

* on a fresh pseudo-terminal (``os.openpty``) of the size the metadata asks for, as
  the leader of a new session (``setsid``) whose controlling terminal is that pty, with
  ``TERM=xterm-256color``, in the user's home directory;
* as the named user when the agent runs as root and names another one (its uid, gid
  and supplementary groups; ``HOME``, ``USER``, ``LOGNAME`` and ``SHELL`` set to
  match); an agent that is not root can only run shells as itself (checked at start);
* DATA records are written to the pty, RESIZE records set its window size
  (TIOCSWINSZ: the kernel sends SIGWINCH to the foreground job); the pty's output goes
  back as DATA records, paced by the stream's flow control (a shell printing faster
  than the page reads blocks on its tty, as it would on a slow serial line).

Ends: when the gateway ends or resets the stream (the page was closed) every process
group of the shell's session gets SIGHUP (its jobs too, as a hung-up line would do),
then the shell's own group SIGKILL if the shell is still there after
:data:`HANGUP_GRACE` seconds. When the shell exits, what it printed last is sent, then
an EXIT record with its status, then FIN.

Every opening and closing is logged on the ``relay.audit`` logger (session id, pid,
user, shell, exit status), the gateway's tokens never (the agent does not see them).

:func:`serve_terminal_stream` serves the asyncio agent (:class:`TerminalShell`, on the
loop's readers), :func:`serve_terminal_stream_trio` the trio one
(:class:`TrioTerminalShell`, a task each way); starting the shell, hanging it up and
the audit lines are the same functions for both.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import pwd
import signal
import struct
import subprocess
import termios
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import trio

from relay.agent.policy import no_terminal
from relay.aio.stream import MuxStream
from relay.mux.errors import ErrorCode
from relay.mux.terminal import (
    TerminalData,
    TerminalDecoder,
    TerminalProtocolError,
    TerminalResize,
    encode_data,
    encode_exit,
    size_from_metadata,
)

if TYPE_CHECKING:
    from relay.trio import MuxStream as TrioMuxStream

__all__ = ["HANGUP_GRACE", "TerminalSpec", "TerminalShell", "TrioTerminalShell", "serve_terminal_stream",
           "serve_terminal_stream_trio"]

log = logging.getLogger("relay.agent.terminal")
audit = logging.getLogger("relay.audit")

#: Seconds a hung-up shell has to exit before its process group is killed.
HANGUP_GRACE = 2.0
#: Bytes read from the pty at once (one DATA record at most).
READ_CHUNK = 65535
#: Keystrokes waiting for the pty to take them, at most (a paste into a program that
#: does not read): past it the stream is not read until the pty drains.
INPUT_BUFFER = 256 * 1024


@dataclass(frozen=True)
class TerminalSpec:
    """What ``relay agent --terminal SHELL --terminal-user NAME`` serves."""

    #: Absolute path of the shell to run.
    shell: str
    #: The account it runs as.
    user: str
    uid: int
    gid: int
    home: str

    @classmethod
    def create(cls, shell: str, user: Optional[str] = None) -> "TerminalSpec":
        """Check ``shell`` and ``user`` now, at start, rather than on the first page
        opened; ValueError with a message saying what is wrong. ``user`` None: the
        agent's own user. Another user needs root (the switch is setuid)."""
        if not os.path.isabs(shell):
            raise ValueError(f"the terminal shell must be an absolute path, not {shell!r}")
        if not os.path.isfile(shell) or not os.access(shell, os.X_OK):
            raise ValueError(f"the terminal shell {shell} is not an executable file")
        me = pwd.getpwuid(os.geteuid())
        if user is None or user == me.pw_name:
            entry = me
        else:
            try:
                entry = pwd.getpwnam(user)
            except KeyError:
                raise ValueError(f"no such user {user!r} for the terminal") from None
            if os.geteuid() != 0 and entry.pw_uid != os.geteuid():
                raise ValueError(f"running shells as {user!r} needs root; this agent runs as {me.pw_name!r} "
                                 f"(leave --terminal-user out to run them as {me.pw_name!r})")
        return cls(shell, entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)

    def to_info(self) -> dict[str, str]:
        """What the agent's hello says about it (no secret: the shell and the user)."""
        return {"shell": self.shell, "user": self.user}


def _set_size(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _make_controlling_tty() -> None:  # pragma: no cover - runs in the child, before exec
    # After setsid (start_new_session) the child has no controlling terminal; stdin is
    # the pty's slave end: make it the controlling one, so job control, ^C and the
    # hangup on close work as in a login shell.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    # A shell starts with the signal dispositions a login gives it, not the agent's: an
    # agent run under nohup ignores SIGHUP, and a shell and jobs that inherited that
    # would outlive the page that hung them up.
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


class TerminalShell:
    """One shell on a pty, carried by one terminal stream (module docstring)."""

    def __init__(self, stream: MuxStream, spec: TerminalSpec) -> None:
        self._loop = asyncio.get_running_loop()
        self.stream = stream
        self.spec = spec
        self.session_id = str(stream.metadata.get("session", "?"))[:64]
        #: Who opened it, as the gateway saw them (their address), for the audit log.
        self.client = str(stream.metadata.get("client", "?"))[:100]
        self.process: Optional[subprocess.Popen[bytes]] = None
        self._master = -1
        self._reading = False
        self._input = bytearray()  # keystrokes the pty did not take yet
        self._input_room: Optional[asyncio.Event] = None
        self._exited = asyncio.Event()
        self._pidfd = -1
        self._ended = False
        self._hanging_up = False  # the page went away: the exit is not the shell's own
        self._started = time.monotonic()

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        """Start the shell (OSError if it cannot be) and accept the stream; the stream's
        reset if the gateway gave it up already (then no shell is started)."""
        if self.stream.exception is not None:
            # Checked here, with no wait until accept() below: a stream reset meanwhile
            # must not leave a shell nobody will ever close.
            raise self.stream.exception
        cols, rows = size_from_metadata(self.stream.metadata)
        self.process, master = _spawn(self.spec, cols, rows)
        self._master = master
        self.stream.accept()
        self._watch_exit()
        self._resume_output()
        _audit_opened(self.session_id, self.client, self.process.pid, self.spec, cols, rows)

    async def run(self) -> None:
        """Carry the stream until the shell has ended and the stream is finished."""
        decoder = TerminalDecoder()
        reason = "the page closed"
        try:
            while not self._ended:
                data = await self.stream.read(READ_CHUNK)
                if not data:
                    break  # the gateway's FIN: the page went away
                for event in decoder.feed(data):
                    if isinstance(event, TerminalData):
                        await self._write_input(event.data)
                    elif isinstance(event, TerminalResize):
                        if self._master >= 0:
                            _set_size(self._master, event.cols, event.rows)
        except TerminalProtocolError as exc:
            reason = f"protocol error: {exc}"
            self.stream.abort(ErrorCode.PROTOCOL_ERROR, str(exc))
        except ConnectionError as exc:  # reset: the page went away abruptly, or the session ended
            reason = f"the stream was reset ({exc})"
        if not self._ended:
            await self.hang_up(reason)
        await self.stream.wait_closed()

    # -- output: pty -> stream

    def _resume_output(self) -> None:
        if not self._reading and self._master >= 0:
            self._loop.add_reader(self._master, self._on_output)
            self._reading = True

    def _pause_output(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._master)
            self._reading = False

    def _on_output(self) -> None:
        chunk, ended = _read_available(self._master)
        if ended:
            self._pause_output()  # nothing more will come; the exit watcher ends the stream
        if not chunk:
            return
        if self.stream.is_closing():
            return
        try:
            self.stream.write(encode_data(chunk))
        except (ConnectionError, RuntimeError):
            self._pause_output()
            return
        if not self.stream.writable():  # the page reads slowly: let the shell block on its tty
            self._pause_output()
            task = self._loop.create_task(self._drain_then_resume())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _drain_then_resume(self) -> None:
        try:
            await self.stream.drain()
        except ConnectionError:
            return
        if not self._ended:
            self._resume_output()

    # -- input: stream -> pty

    async def _write_input(self, data: bytes) -> None:
        self._input += data
        self._flush_input()
        while len(self._input) > INPUT_BUFFER and not self._ended:
            self._input_room = asyncio.Event()
            await self._input_room.wait()

    def _flush_input(self) -> None:
        while self._input and self._master >= 0:
            try:
                n = os.write(self._master, self._input)
            except BlockingIOError:
                self._loop.add_writer(self._master, self._on_writable)
                return
            except OSError:
                self._input.clear()  # the shell is gone: nobody will read it
                break
            del self._input[:n]
        if self._input_room is not None:
            self._input_room.set()

    def _on_writable(self) -> None:
        self._loop.remove_writer(self._master)
        self._flush_input()

    # -- ends

    def _watch_exit(self) -> None:
        """Learn the shell's exit without a thread: a pidfd (Linux 5.3+) readable once
        it exits, else polling."""
        assert self.process is not None
        try:
            self._pidfd = os.pidfd_open(self.process.pid)
        except (AttributeError, OSError):
            self._loop.call_later(0.2, self._poll_exit)
            return
        self._loop.add_reader(self._pidfd, self._on_exit)

    def _poll_exit(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self._loop.call_later(0.2, self._poll_exit)
        else:
            self._on_exit()

    def _on_exit(self) -> None:
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        assert self.process is not None
        status = self.process.wait()  # reaped: it has exited (no wait in practice)
        self._exited.set()
        if self._ended or self._hanging_up:
            return
        # What it printed last is in the pty's buffer still: send it before the end.
        while self._master >= 0:
            try:
                chunk = os.read(self._master, READ_CHUNK)
            except OSError:
                break
            if not chunk:
                break
            if not self.stream.is_closing():
                self.stream.write(encode_data(chunk))
        if not self.stream.is_closing():
            self.stream.write(encode_exit(status))
            self.stream.write_eof()
        self._finish(f"the shell exited with status {status}")

    async def hang_up(self, reason: str) -> None:
        """The page went away: SIGHUP to the shell's process group, SIGKILL after
        :data:`HANGUP_GRACE` seconds if it is still there."""
        self._hanging_up = True
        process = self.process
        if process is not None:
            _hang_up_session(process.pid)
        if process is not None and process.poll() is None:
            try:
                async with asyncio.timeout(HANGUP_GRACE):
                    await self._exited.wait()
            except TimeoutError:
                _signal_group(process.pid, signal.SIGKILL)
                await self._exited.wait()
        self.stream.close()
        self._finish(reason)

    def kill_now(self, reason: str) -> None:
        """The agent is stopping (the task serving the stream was cancelled): no grace,
        the shell's process group is killed and reaped at once."""
        self._hanging_up = True
        process = self.process
        if process is not None and process.poll() is None:
            _signal_group(process.pid, signal.SIGKILL)
            try:
                process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass  # unkillable (uninterruptible sleep): the kernel reaps it later
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        self.stream.abort(ErrorCode.CANCEL, "the agent is stopping")
        self._finish(reason)

    def _finish(self, reason: str) -> None:
        if self._ended:
            return
        self._ended = True
        self._pause_output()
        if self._master >= 0:
            self._loop.remove_writer(self._master)
            os.close(self._master)
            self._master = -1
        if self._input_room is not None:
            self._input_room.set()
        _audit_closed(self.session_id, self.client, self.process, self.spec, self._started, reason)


def _spawn(spec: TerminalSpec, cols: int, rows: int) -> tuple["subprocess.Popen[bytes]", int]:
    """Start ``spec``'s shell on a fresh pty of ``cols`` x ``rows`` (module docstring):
    the process and the pty's master end (non-blocking). OSError or SubprocessError if
    it cannot start."""
    master, slave = os.openpty()
    try:
        _set_size(master, cols, rows)
        env = {"TERM": "xterm-256color", "HOME": spec.home, "USER": spec.user, "LOGNAME": spec.user,
               "SHELL": spec.shell, "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
               "LANG": os.environ.get("LANG", "C.UTF-8")}
        switch = os.geteuid() == 0 and spec.uid != os.geteuid()
        process = subprocess.Popen(
            [spec.shell], stdin=slave, stdout=slave, stderr=slave, env=env,
            cwd=spec.home if os.path.isdir(spec.home) else "/", start_new_session=True,
            preexec_fn=_make_controlling_tty, close_fds=True,
            user=spec.uid if switch else None, group=spec.gid if switch else None,
            extra_groups=os.getgrouplist(spec.user, spec.gid) if switch else None)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)  # the child holds it: the master sees EIO once every holder is gone
    os.set_blocking(master, False)
    return process, master


def _read_available(master: int) -> tuple[bytes, bool]:
    """What the pty has now, up to :data:`READ_CHUNK` (a pty hands out ~4 KiB a read:
    this goes out as one record), and True once it is closed (every slave end gone)."""
    parts: list[bytes] = []
    size = 0
    while size < READ_CHUNK:
        try:
            part = os.read(master, READ_CHUNK - size)
        except BlockingIOError:
            break
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: every slave end closed (the shell is gone)
                log.debug("terminal: pty read: %s", exc)
            part = b""
        if not part:
            return b"".join(parts), True
        parts.append(part)
        size += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts), False


def _hang_up_session(pid: int) -> None:
    """SIGHUP (and SIGCONT) to every process group of the shell's session. Every job,
    not only the shell's group: a background job is a group of its own, and a shell does
    not always pass the hangup on (bash does only when the signal finds it idle). Also
    when the shell itself is gone already (the closed pty hung it up first): its jobs
    stay in its session. nohup'd jobs ignore it, as they would over ssh."""
    for group in _session_groups(pid):
        _signal_group(group, signal.SIGHUP)
        _signal_group(group, signal.SIGCONT)  # a stopped job must wake to die


def _audit_refused(session_id: str, why: str) -> None:
    audit.warning("terminal refused: session %s: %s", session_id, why)


def _audit_opened(session_id: str, client: str, pid: int, spec: TerminalSpec, cols: int, rows: int) -> None:
    audit.info("terminal opened: session %s for %s (via the gateway), pid %d, user %s, shell %s, %dx%d",
               session_id, client, pid, spec.user, spec.shell, cols, rows)


def _audit_closed(session_id: str, client: str, process: Optional["subprocess.Popen[bytes]"],
                  spec: TerminalSpec, started: float, reason: str) -> None:
    audit.info("terminal closed: session %s for %s, pid %s, user %s, after %.1fs: %s (exit status %s)",
               session_id, client, process.pid if process is not None else None, spec.user,
               time.monotonic() - started, reason, process.returncode if process is not None else None)


def _session_groups(sid: int) -> list[int]:
    """The process groups of session ``sid`` (its leader's first), from /proc; just
    ``[sid]`` where there is no /proc."""
    groups = {sid: None}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return [sid]
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile, or not readable
        if len(fields) > 3 and int(fields[3]) == sid:  # state, ppid, pgrp, session
            groups.setdefault(int(fields[2]), None)
    return list(groups)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # gone already


async def serve_terminal_stream(stream: MuxStream, spec: Optional[TerminalSpec], agent_name: str,
                                shells: Optional[set[Any]] = None) -> None:
    """Serve one terminal stream: refused (NOT_ALLOWED) unless ``spec`` is set, else a
    shell until it or the page ends. ``shells``: a set the live shell is kept in."""
    if spec is None:
        _audit_refused(str(stream.metadata.get("session", "?"))[:64], "this agent was not started with --terminal")
        refusal = no_terminal(agent_name)
        stream.refuse(refusal.error_code, refusal.message)
        return
    shell = TerminalShell(stream, spec)
    try:
        shell.start()
    except ConnectionError as exc:  # reset before we answered: the page left already
        audit.info("terminal not started: session %s: the gateway gave it up (%s)", shell.session_id, exc)
        return
    except (OSError, subprocess.SubprocessError, TerminalProtocolError) as exc:
        _audit_refused(shell.session_id, f"the shell could not start: {exc}")
        stream.refuse(ErrorCode.CONNECT_FAILED, f"the terminal could not start: {exc}")
        return
    if shells is not None:
        shells.add(shell)
    try:
        await shell.run()
    finally:
        if not shell._ended:  # cancelled: the agent is stopping
            shell.kill_now("the agent stopped")
        if shells is not None:
            shells.discard(shell)


# ----------------------------------------------------------------------------- trio


class TrioTerminalShell:
    """:class:`TerminalShell` on trio: one task carries the pty's output to the stream
    (``send_all`` waits for window, so a page that reads slowly blocks the shell on its
    tty), one watches the shell's exit, and :meth:`run` carries the stream's records to
    the pty (not reading the stream while the pty does not take them)."""

    def __init__(self, stream: "TrioMuxStream", spec: TerminalSpec, process: "subprocess.Popen[bytes]",
                 master: int) -> None:
        self.stream = stream
        self.spec = spec
        self.process = process
        self.session_id = str(stream.metadata.get("session", "?"))[:64]
        self.client = str(stream.metadata.get("client", "?"))[:100]
        self._master = master
        self._exited = trio.Event()
        self._wait_scope: Optional[trio.CancelScope] = None  # the output task's wait for the pty
        self._ended = False
        self._hanging_up = False  # the page went away: the exit is not the shell's own
        self._started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.process.pid

    async def run(self) -> None:
        """Carry the stream until the shell has ended or the page went away (then hang
        up). Cancelled (the agent is stopping): the shell is killed at once."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_exit)
                nursery.start_soon(self._output, nursery.cancel_scope)
                reason = await self._input()
                # The page went away first: hang the shell up, then stop carrying output.
                await self.hang_up(reason)
                nursery.cancel_scope.cancel()
        finally:
            if not self._ended:
                self.kill_now("the agent stopped")

    # -- input: stream -> pty

    async def _input(self) -> str:
        """Carry records to the pty until the page goes; returns why it went."""
        decoder = TerminalDecoder()
        try:
            while data := await self.stream.receive_some(READ_CHUNK):
                for event in decoder.feed(data):
                    if isinstance(event, TerminalData):
                        await self._write_input(event.data)
                    elif isinstance(event, TerminalResize):
                        _set_size(self._master, event.cols, event.rows)
        except TerminalProtocolError as exc:
            self.stream.reset(ErrorCode.PROTOCOL_ERROR, str(exc))
            return f"protocol error: {exc}"
        except trio.BrokenResourceError as exc:  # reset: the page went away abruptly, or the session ended
            return f"the stream was reset ({exc})"
        return "the page closed"  # the gateway's FIN

    async def _write_input(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._master, view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._master)
                continue
            except OSError:
                return  # the shell is gone: nobody will read it
            view = view[n:]

    # -- output: pty -> stream, then the end

    async def _output(self, scope: trio.CancelScope) -> None:
        try:
            await self._carry_output(scope)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the stream was reset: the input side hangs the shell up

    async def _carry_output(self, scope: trio.CancelScope) -> None:
        closed = False
        while not closed and not self._exited.is_set():
            with trio.CancelScope() as self._wait_scope:  # cancelled by the exit watcher
                await trio.lowlevel.wait_readable(self._master)
            self._wait_scope = None
            chunk, closed = _read_available(self._master)
            if chunk:
                await self.stream.send_all(encode_data(chunk))
        await self._exited.wait()  # the pty closes first, or the shell exits first
        if self._hanging_up:
            return
        # What it printed last is in the pty's buffer still: send it before the end.
        while not closed:
            chunk, closed = _read_available(self._master)
            if not chunk:
                break
            await self.stream.send_all(encode_data(chunk))
        status = self.process.returncode
        await self.stream.send_all(encode_exit(status))
        await self.stream.send_eof()
        scope.cancel()  # the input task (first: the pty's fd closes next)
        self._finish(f"the shell exited with status {status}")

    async def _watch_exit(self) -> None:
        """Learn the shell's exit without a thread: a pidfd (Linux 5.3+) readable once
        it exits, else polling; then reap it."""
        try:
            pidfd = os.pidfd_open(self.process.pid)
        except (AttributeError, OSError):
            while self.process.poll() is None:
                await trio.sleep(0.2)
        else:
            try:
                await trio.lowlevel.wait_readable(pidfd)
            finally:
                os.close(pidfd)
        self.process.wait()  # reaped: it has exited (no wait in practice)
        self._exited.set()
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    # -- ends

    async def hang_up(self, reason: str) -> None:
        """The page went away: SIGHUP to every process group of the shell's session,
        SIGKILL after :data:`HANGUP_GRACE` seconds if the shell is still there."""
        self._hanging_up = True
        _hang_up_session(self.process.pid)
        with trio.move_on_after(HANGUP_GRACE):
            await self._exited.wait()
        if not self._exited.is_set():
            _signal_group(self.process.pid, signal.SIGKILL)
            await self._exited.wait()
        self._finish(reason)

    def kill_now(self, reason: str) -> None:
        """The agent is stopping: no grace, the shell's process group is killed and
        reaped at once."""
        self._hanging_up = True
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGKILL)
            try:
                self.process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass  # unkillable (uninterruptible sleep): the kernel reaps it later
        self.stream.reset(ErrorCode.CANCEL, "the agent is stopping")
        self._finish(reason)

    def _finish(self, reason: str) -> None:
        if self._ended:
            return
        self._ended = True
        if self._master >= 0:
            trio.lowlevel.notify_closing(self._master)
            os.close(self._master)
            self._master = -1
        _audit_closed(self.session_id, self.client, self.process, self.spec, self._started, reason)


async def serve_terminal_stream_trio(stream: "TrioMuxStream", spec: Optional[TerminalSpec], agent_name: str,
                                     shells: Optional[set[Any]] = None) -> None:
    """:func:`serve_terminal_stream` on trio (the session's stream handler): refused
    (NOT_ALLOWED) unless ``spec`` is set, else a shell until it or the page ends."""
    from relay.trio import StreamRefused

    session_id = str(stream.metadata.get("session", "?"))[:64]
    if spec is None:
        _audit_refused(session_id, "this agent was not started with --terminal")
        refusal = no_terminal(agent_name)
        raise StreamRefused(refusal.error_code, refusal.message)
    if stream.reset_error is not None:  # the gateway gave it up already: start no shell
        audit.info("terminal not started: session %s: the gateway gave it up (%s)", session_id, stream.reset_error)
        return
    try:
        cols, rows = size_from_metadata(stream.metadata)
        process, master = _spawn(spec, cols, rows)
    except (OSError, subprocess.SubprocessError, TerminalProtocolError) as exc:
        _audit_refused(session_id, f"the shell could not start: {exc}")
        raise StreamRefused(ErrorCode.CONNECT_FAILED, f"the terminal could not start: {exc}") from None
    shell = TrioTerminalShell(stream, spec, process, master)
    stream.accept()
    _audit_opened(session_id, shell.client, process.pid, spec, cols, rows)
    if shells is not None:
        shells.add(shell)
    try:
        await shell.run()
    finally:
        if shells is not None:
            shells.discard(shell)

