"""Agent-side tasks (seed 001) and stream policies: the embedding API of both agents.

Every agent (:class:`~relay.agent.client.Agent` on asyncio,
:class:`~relay.agent.trio_client.TrioAgent` on trio) has ``agent.tasks``
(:class:`AgentTasks`), the handlers by task kind. Register one with the decorator or
:meth:`AgentTasks.register`::

    @agent.tasks.handler("resize")
    async def resize(task):                 # a coroutine: its return value is the result
        await task.progress({"percent": 50})
        return {"ok": True}

    @agent.tasks.handler("lines")
    async def lines(task):                  # an async generator: each yield is an output
        for line in task.input["lines"]:
            yield line

A handler gets a :class:`TaskContext` (``task_id``, ``kind``, ``input``,
``await progress(value)``, ``await output(value)``, ``await sleep(seconds)`` on the
agent's loop, and ``result``, which an async generator may set). A plain (non-async)
function works too: it runs in the loop, so keep it short. An exception becomes the
task's error (its message); a task whose connection to the gateway ends is cancelled,
and so is one the gateway cancels (the control message ``{"type": "task.cancel",
"task_id"}``, sent when someone calls
``POST /api/v1/tasks/{id}/cancel``): the handler sees its loop's cancellation where it
awaits (``asyncio.CancelledError`` on the asyncio agent, ``trio.Cancelled`` on the trio
one), so ``try/finally`` cleans up. Nothing is reported after a cancel: the gateway has
ended the task already. A handler that awaits only ``task.progress``, ``task.output``
and ``task.sleep`` runs on either agent.

This module decides everything about a task (which handler, what is reported, in what
order, with what error) and imports no event loop: each agent only starts
:meth:`AgentTasks.run` as a task of its loop, registers it under the task id
(:meth:`AgentTasks.started`) so a cancel reaches it, and cancels it when its connection
ends.

The CLI agent registers :meth:`AgentTasks.register_builtins`: ``echo`` (the result is the
input), ``sleep`` (``{"seconds": s}``, at most 60, one progress event per second) and
``count`` (``{"to": n, "delay": s}``: outputs 1..n, n at most 1000).

``agent.allow_stream`` is a list of ``fn(metadata) -> bool | str | None`` checked before
the agent's own allowlist: ``False`` or a string refuses the stream with ``NOT_ALLOWED``
(the string is the reason the gateway's client sees).
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Optional, Protocol

__all__ = ["AgentTasks", "LoopTime", "TaskContext", "stream_denied"]

log = logging.getLogger("relay.agent.tasks")

TaskHandler = Callable[["TaskContext"], Any]


class _Session(Protocol):
    """What a task needs of its session (a MuxSession or a TrioMuxSession)."""

    @property
    def is_closed(self) -> bool: ...

    def send_control(self, message: Any) -> None: ...


class _Cancellable(Protocol):
    """A running task as its loop holds it (an asyncio.Task, a trio.CancelScope)."""

    def cancel(self) -> Any: ...


@dataclass(frozen=True)
class LoopTime:
    """The agent loop's sleep and clock, which tasks use (asyncio's or trio's)."""

    sleep: Callable[[float], Awaitable[Any]]
    now: Callable[[], float]


def stream_denied(policies: list[Callable[[Any], Any]], metadata: Any) -> Optional[str]:
    """None if every policy allows a stream with ``metadata``, else the reason."""
    for policy in policies:
        try:
            verdict = policy(metadata)
        except Exception:  # fail closed
            log.exception("allow_stream policy failed; refusing the stream")
            return "stream policy failed"
        if verdict is False:
            return "denied by the agent's stream policy"
        if isinstance(verdict, str):
            return verdict or "denied by the agent's stream policy"
    return None


class TaskContext:
    """What a handler sees of its task, and how it reports back."""

    def __init__(self, session: _Session, task_id: str, kind: str, task_input: Any, time: LoopTime) -> None:
        self._session = session
        self._time = time
        self.task_id = task_id
        self.kind = kind
        self.input = task_input
        #: The result reported when an async-generator handler ends (a coroutine's
        #: return value takes its place).
        self.result: Any = None

    def _send(self, message: dict[str, Any]) -> None:
        if not self._session.is_closed:  # gone: the gateway has failed the task already
            self._session.send_control({**message, "task_id": self.task_id})

    async def progress(self, value: Any) -> None:
        """Report progress (any msgpack/JSON value: a percentage, a stage name ...)."""
        self._send({"type": "task.progress", "progress": value})
        await self._time.sleep(0)  # let the session flush between reports

    async def output(self, value: Any) -> None:
        """Report a partial output."""
        self._send({"type": "task.output", "output": value})
        await self._time.sleep(0)

    async def sleep(self, seconds: float) -> None:
        """Sleep on the agent's loop (asyncio or trio): a cancel arrives here too."""
        await self._time.sleep(seconds)


class AgentTasks:
    """Task handlers by kind, and the tasks running now."""

    def __init__(self) -> None:
        self.handlers: dict[str, TaskHandler] = {}
        #: Running tasks by task id, as their loop holds them (to cancel one when the
        #: gateway asks).
        self._by_id: dict[str, _Cancellable] = {}

    def register(self, kind: str, handler: TaskHandler) -> None:
        """Run ``handler`` for tasks of ``kind`` (replacing any earlier one)."""
        self.handlers[kind] = handler

    def handler(self, kind: str) -> Callable[[TaskHandler], TaskHandler]:
        """Decorator form of :meth:`register`."""
        def decorate(fn: TaskHandler) -> TaskHandler:
            self.register(kind, fn)
            return fn
        return decorate

    def register_builtins(self) -> None:
        """``echo``, ``sleep`` and ``count`` (see the module docstring)."""
        self.register("echo", _echo)
        self.register("sleep", _sleep)
        self.register("count", _count)

    def context(self, session: _Session, message: dict[str, Any], time: LoopTime) -> TaskContext:
        """The context of a ``{"type": "task", ...}`` control message from ``session``."""
        return TaskContext(session, str(message.get("task_id")), str(message.get("kind")),
                           message.get("input"), time)

    def started(self, task_id: str, running: _Cancellable) -> None:
        """The agent runs task ``task_id`` as ``running`` (cancelled by :meth:`cancel`)."""
        self._by_id[task_id] = running

    def finished(self, task_id: str, running: _Cancellable) -> None:
        """``running`` (task ``task_id``) has ended."""
        if self._by_id.get(task_id) is running:
            del self._by_id[task_id]

    def cancel(self, task_id: str) -> bool:
        """Cancel the running task ``task_id`` (a ``task.cancel`` from the gateway);
        False if none runs."""
        running = self._by_id.get(task_id)
        if running is None:
            return False
        log.info("task %s cancelled by the gateway", task_id)
        running.cancel()
        return True

    def cancel_all(self) -> None:
        """Cancel every running task."""
        for running in list(self._by_id.values()):
            running.cancel()

    async def run(self, ctx: TaskContext) -> None:
        """Run the handler of ``ctx``'s kind and report its outputs and its end. The
        loop's cancellation (a BaseException on both loops) passes through unreported."""
        handler = self.handlers.get(ctx.kind)
        if handler is None:
            known = ", ".join(sorted(self.handlers)) or "none"
            ctx._send({"type": "task.error", "error": f"no handler for task kind {ctx.kind!r} (known: {known})"})
            return
        try:
            result = handler(ctx)
            if inspect.isasyncgen(result):
                async for item in result:
                    await ctx.output(item)
                result = ctx.result
            elif inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            log.info("task %s (%s) failed: %s", ctx.task_id, ctx.kind, exc)
            ctx._send({"type": "task.error", "error": str(exc) or type(exc).__name__})
            return
        ctx._send({"type": "task.result", "result": result})


# ----------------------------------------------------------------------------- built-ins


async def _echo(task: TaskContext) -> Any:
    return task.input


def _number(value: Any, name: str, low: float, high: float, default: float) -> float:
    value = default if value is None else value
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be a number from {low:g} to {high:g}")
    return float(value)


async def _sleep(task: TaskContext) -> Any:
    args = task.input if isinstance(task.input, dict) else {}
    seconds = _number(args.get("seconds"), "seconds", 0, 60, 1)
    end = task._time.now() + seconds
    while (left := end - task._time.now()) > 0:
        await task.progress({"remaining": round(left, 3)})
        await task.sleep(min(1.0, left))
    return {"slept": seconds}


async def _count(task: TaskContext) -> Any:
    args = task.input if isinstance(task.input, dict) else {}
    to = int(_number(args.get("to"), "to", 0, 1000, 3))
    delay = _number(args.get("delay"), "delay", 0, 10, 0)
    for i in range(1, to + 1):
        await task.progress({"done": i - 1, "total": to})
        await task.output(i)
        if delay:
            await task.sleep(delay)
    return {"count": to}
