"""Agent-side tasks (seed 001) and stream policies: the embedding API of the agent.

Every :class:`~relay.agent.client.Agent` has ``agent.tasks`` (:class:`AgentTasks`), the
handlers by task kind. Register one with the decorator or :meth:`AgentTasks.register`::

    @agent.tasks.handler("resize")
    async def resize(task):                 # a coroutine: its return value is the result
        await task.progress({"percent": 50})
        return {"ok": True}

    @agent.tasks.handler("lines")
    async def lines(task):                  # an async generator: each yield is an output
        for line in task.input["lines"]:
            yield line

A handler gets a :class:`TaskContext` (``task_id``, ``kind``, ``input``,
``await progress(value)``, ``await output(value)``, and ``result``, which an async
generator may set). A plain (non-async) function works too: it runs in the loop, so
keep it short. An exception becomes the task's error (its message); a task whose
connection to the gateway ends is cancelled, and so is one the gateway cancels (the
control message ``{"type": "task.cancel", "task_id"}``, sent when someone calls
``POST /api/v1/tasks/{id}/cancel``): the handler sees ``asyncio.CancelledError`` where it
awaits, so ``try/finally`` (or ``except asyncio.CancelledError: ...; raise``) cleans up.
Nothing is reported after a cancel: the gateway has ended the task already.

The CLI agent registers :meth:`AgentTasks.register_builtins`: ``echo`` (the result is the
input), ``sleep`` (``{"seconds": s}``, at most 60, one progress event per second) and
``count`` (``{"to": n, "delay": s}``: outputs 1..n, n at most 1000).

``agent.allow_stream`` is a list of ``fn(metadata) -> bool | str | None`` checked before
the agent's own allowlist: ``False`` or a string refuses the stream with ``NOT_ALLOWED``
(the string is the reason the gateway's client sees).
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any, Optional

from relay.aio import MuxSession

__all__ = ["AgentTasks", "TaskContext", "stream_denied"]

log = logging.getLogger("relay.agent.tasks")

TaskHandler = Callable[["TaskContext"], Any]


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

    def __init__(self, session: MuxSession, task_id: str, kind: str, task_input: Any) -> None:
        self._session = session
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
        await asyncio.sleep(0)  # let the session flush between reports

    async def output(self, value: Any) -> None:
        """Report a partial output."""
        self._send({"type": "task.output", "output": value})
        await asyncio.sleep(0)


class AgentTasks:
    """Task handlers by kind, and the tasks running now."""

    def __init__(self) -> None:
        self.handlers: dict[str, TaskHandler] = {}
        self._running: set[asyncio.Task[None]] = set()
        #: Running tasks by task id (to cancel one when the gateway asks).
        self._by_id: dict[str, asyncio.Task[None]] = {}

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

    def on_control(self, session: MuxSession, message: dict[str, Any]) -> None:
        """A ``{"type": "task", ...}`` control message from the gateway on ``session``."""
        ctx = TaskContext(session, str(message.get("task_id")), str(message.get("kind")),
                          message.get("input"))
        task = asyncio.get_running_loop().create_task(self._run(ctx))
        self._running.add(task)
        self._by_id[ctx.task_id] = task
        task.add_done_callback(self._running.discard)
        task.add_done_callback(lambda _: self._by_id.pop(ctx.task_id, None))
        # The task belongs to this connection: when it ends, nobody awaits the answer.
        watcher = asyncio.ensure_future(session.wait_closed())
        watcher.add_done_callback(lambda _: task.cancel())
        task.add_done_callback(lambda _: watcher.cancel())

    def cancel(self, task_id: str) -> bool:
        """Cancel the running task ``task_id`` (a ``task.cancel`` from the gateway);
        False if none runs."""
        task = self._by_id.get(task_id)
        if task is None or task.done():
            return False
        log.info("task %s cancelled by the gateway", task_id)
        task.cancel()
        return True

    async def _run(self, ctx: TaskContext) -> None:
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
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("task %s (%s) failed: %s", ctx.task_id, ctx.kind, exc)
            ctx._send({"type": "task.error", "error": str(exc) or type(exc).__name__})
            return
        ctx._send({"type": "task.result", "result": result})

    def cancel_all(self) -> None:
        for task in list(self._running):
            task.cancel()


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
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0:
        await task.progress({"remaining": round(left, 3)})
        await asyncio.sleep(min(1.0, left))
    return {"slept": seconds}


async def _count(task: TaskContext) -> Any:
    args = task.input if isinstance(task.input, dict) else {}
    to = int(_number(args.get("to"), "to", 0, 1000, 3))
    delay = _number(args.get("delay"), "delay", 0, 10, 0)
    for i in range(1, to + 1):
        await task.progress({"done": i - 1, "total": to})
        await task.output(i)
        if delay:
            await asyncio.sleep(delay)
    return {"count": to}
