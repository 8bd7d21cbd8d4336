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
from typing import Any, Optional

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

__all__ = ["HANGUP_GRACE", "TerminalSpec", "TerminalShell", "serve_terminal_stream"]

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
        spec = self.spec
        master, slave = os.openpty()
        try:
            _set_size(master, cols, rows)
            env = {"TERM": "xterm-256color", "HOME": spec.home, "USER": spec.user, "LOGNAME": spec.user,
                   "SHELL": spec.shell, "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
                   "LANG": os.environ.get("LANG", "C.UTF-8")}
            switch = os.geteuid() == 0 and spec.uid != os.geteuid()
            self.process = subprocess.Popen(
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
        self._master = master
        os.set_blocking(master, False)
        self.stream.accept()
        self._watch_exit()
        self._resume_output()
        audit.info("terminal opened: session %s for %s (via the gateway), pid %d, user %s, shell %s, %dx%d",
                   self.session_id, self.client, self.process.pid, spec.user, spec.shell, cols, rows)

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
        # A pty hands out at most ~4 KiB per read: what is there now goes out as one
        # record (one frame, one WebSocket message) rather than one per read.
        parts: list[bytes] = []
        size = 0
        ended = False
        while size < READ_CHUNK:
            try:
                part = os.read(self._master, READ_CHUNK - size)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.EIO:  # EIO: every slave end closed (the shell is gone)
                    log.debug("terminal %s: pty read: %s", self.session_id, exc)
                part = b""
            if not part:
                ended = True
                break
            parts.append(part)
            size += len(part)
        if ended:
            self._pause_output()  # nothing more will come; the exit watcher ends the stream
        if not parts:
            return
        chunk = parts[0] if len(parts) == 1 else b"".join(parts)
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
            # Every job of the session, not only the shell's group: a background job is a
            # group of its own, and a shell does not always pass the hangup on (bash
            # does only when the signal finds it idle). Also when the shell itself is
            # gone already (the closed pty hung it up first): its jobs stay in its
            # session. nohup'd jobs ignore it, as they would over ssh.
            for group in _session_groups(process.pid):
                _signal_group(group, signal.SIGHUP)
                _signal_group(group, signal.SIGCONT)  # a stopped job must wake to die
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
        status = self.process.returncode if self.process is not None else None
        audit.info("terminal closed: session %s for %s, pid %s, user %s, after %.1fs: %s (exit status %s)",
                   self.session_id, self.client, self.pid, self.spec.user, time.monotonic() - self._started,
                   reason, status)


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
        audit.warning("terminal refused: session %s: this agent was not started with --terminal",
                      str(stream.metadata.get("session", "?"))[:64])
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
        audit.warning("terminal refused: session %s: the shell could not start: %s", shell.session_id, exc)
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
