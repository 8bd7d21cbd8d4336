"""Tasks (seed 001): the gateway hands work to an idle agent and streams its progress back.

Endpoints (auth as the other runtime endpoints: ``sk-``, ``dk-`` or a user JWT):

* ``POST /api/v1/tasks`` with ``{"kind": str, "input": any JSON, "labels": [str, ...],
  "expose": {"port": int, "protocol": "http" | "tcp"}}`` (``expose`` optional, see
  "Task-bound tunnels") -> 202 ``{"task_id", "status": "queued" | "dispatched",
  "agent_id"}``. 400 for a bad body, 503 ``queue_full`` when the team already has
  :data:`QUEUE_LIMIT` tasks waiting.
* ``GET /api/v1/tasks[?status=running,queued]`` -> ``{"tasks": [task, ...]}``: the
  team's tasks (those this gateway holds, and the store's rows of the others: finished
  ones are kept :data:`FINISHED_TTL` seconds), oldest first, only the given statuses.
* ``GET /api/v1/tasks/{task_id}`` -> the task: ``status`` (``queued``, ``dispatched``,
  ``running``, ``succeeded``, ``failed``, ``cancelled``), ``agent_id``, ``progress`` (the
  latest), ``outputs`` (partial outputs so far), ``result``, ``error``, ``tunnel`` (its
  task-bound tunnel, without the admin token). Another team's task: 404.
* ``POST /api/v1/tasks/{task_id}/cancel`` -> the task, now ``cancelled``. A queued task
  leaves its queue; a dispatched or running one is cancelled on its agent (the control
  message ``{"type": "task.cancel", "task_id"}``: the stock agent cancels the handler's
  asyncio task, so the handler sees ``asyncio.CancelledError`` where it waits) and its
  agent is free for the next task at once. The final event is ``error`` with
  ``{"error": "task cancelled", "cancelled": true}``. 409 ``task_finished`` if it had
  ended. In a fleet, any gateway cancels any task (see below); 409 ``task_elsewhere``
  if the gateway that accepted it cannot be reached.
* ``GET /api/v1/tasks/{task_id}/events`` -> ``text/event-stream`` (Server-Sent Events)
  from the beginning of the task: ``event: status|progress|output|result|error``,
  ``id:`` the event's sequence number, ``data:`` its JSON. It ends (the server closes)
  after the ``result`` or ``error`` event. ``Last-Event-ID`` resumes after that event.

Dispatch: an agent of the task's team is eligible when it is connected, its status is
``idle`` (``busy``, ``tunnel``, ``unhealthy`` and ``offline`` agents never get new tasks)
and its labels are a superset of the task's. The agent that waited longest since its last
task gets it; the gateway marks it ``busy`` and sends the control message
``{"type": "task", "task_id", "kind", "input"}``. A task with no eligible agent waits in
its team's queue (FIFO; a task whose labels no idle agent has does not hold back the
others) and is dispatched when an agent becomes idle or connects.

The agent answers with control messages ``{"type": "task.progress", "task_id",
"progress"}``, ``{"type": "task.output", "task_id", "output"}`` and finally
``{"type": "task.result", "task_id", "result"}`` or ``{"type": "task.error", "task_id",
"error"}``; then the gateway sets it idle again (``tunnel`` if a tunnel is open). An agent
that disconnects mid-task fails it with ``"agent disconnected"``.

In a fleet, a task no agent held here can take is offered to the other gateways that
hold agents of its team (with labels covering it, as far as their hellos tell), one at a
time, as a ``task`` control request (relay.gateway.fleet.control). The holder dispatches
it to one of its own idle agents exactly as above (:meth:`TaskManager.serve_peer`), or
declines; it then passes the agent's task messages back on the request's stream, and
the gateway the task was submitted to records them as for a local agent: the task, its
events, its row and its SSE stay with the gateway that accepted it. A task every
gateway declined waits in the queue and is offered again after :data:`OFFER_RETRY`
seconds (or at once when an agent here becomes idle). The stream to the holder breaking
before the final message (the holder died, the peer session dropped) fails the task
with ``"agent disconnected"``. ``GET /api/v1/tasks/{id}`` at any other gateway answers
from the store; its ``/events`` there follow the store's row until the task ends. The
rows name the gateway that accepted them (``owner`` ``gateway/{gateway id}``), so a
gateway restarting recovers only its own tasks (give it a stable ``--gateway-id`` to get
its queued tasks back).

Task-bound tunnels (seed 001: "a workflow can ask the agent to expose a service while a
task is running ... when the task ends, the tunnel closes"): a task with ``expose``
gets, once dispatched, a tunnel session (seed 000) on its agent to ``127.0.0.1:port``,
``http`` (default) or ``tcp``. Its ``tunnel`` event carries the seed 000 answer
(``session_id``, ``tunnel_url``, ``admin_token``, ``tunnel_protocol``, ``hub_port`` for
tcp), so whoever follows the task reaches the service. The ``tunnel_url`` "can be
safely shared" and the ``admin_token`` "must be kept secret" (seed 000), and a task's
events go "back to the client that submitted the task" (seed 001): the admin_token is
in the event only for the caller that submitted the task (the same ``sk-``/``dk-`` key,
or the same user of a JWT) and for the team's management callers (``sk-`` keys, users),
who may close any session and open their own on any agent anyway. Any other runtime
caller of the team (another ``dk-`` key) gets the event without it: the token would let
it close, and open a terminal on, a session it did not open. ``GET /api/v1/tasks/{id}``
never carries it. The session has no TTL or idle
timeout of its own and does not put the agent in status ``tunnel``: it is closed when the
task ends in any way (result, error, cancelled, agent disconnected), live connections
cut. If the port cannot be exposed (the agent's allowlist refuses it, a loop into the
gateway) the task fails with the reason and is cancelled on the agent. ``expose`` is kept
in the task's row, so a task queued again after a restart still gets its tunnel; a
task-bound session left open by a gateway that stopped is closed at the next start (in a
fleet: by the gateway that accepted the task, when it fails the tasks it ran). In a
fleet a task with ``expose`` is offered to the other gateways like any other; the
gateway that accepted it opens the session for the agent held elsewhere, and its URL
and hub port work at every gateway (relay.gateway.agents.tunnel_sessions).

Cancelling in a fleet: a task run by another gateway's agent ends here at once and its
control stream to that gateway is reset; that gateway then sends ``task.cancel`` to the
agent (whose handler sees the cancellation as with one gateway) and frees it
(:meth:`TaskManager.serve_peer`). A gateway asked to cancel a task it did not accept
sends a ``cancel`` control request to the one that did (the row names it), which
cancels it as above and answers the task (:meth:`TaskManager.serve_cancel`).

Each task is also a row of the store (relay.gateway.store ``tasks``): written before the
202 (so an acknowledged task is never lost), then on every change of status and with its
result or error (in order, never waited for by the agent's messages). A restart of the
gateway queues its queued tasks again and fails the ones an agent was running ("the
gateway restarted while the task ran": the agent's side of them ended with the
connection); ``GET /api/v1/tasks/{id}`` answers from the store a task the gateway no
longer holds in memory (its events are then only the status and the final one).

Events live in memory only: at most :data:`MAX_EVENTS` events and
:data:`MAX_TASK_BYTES` of them per task (``events_dropped`` counts the rest), finished tasks are
kept :data:`FINISHED_TTL` seconds (in the store too), and at most :data:`MAX_TASKS` tasks in
all (the oldest finished ones go first).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from relay.gateway.agents.registry import ConnectedAgent, StoreWrites
from relay.gateway.auth import Principal
from relay.gateway.fleet.control import ControlReply
from relay.gateway.http.server import HttpError, Request, Response, Router, json_response
from relay.gateway.store import TASK_STATUSES, TaskRecord

if TYPE_CHECKING:
    from relay.gateway.app import Gateway
    from relay.gateway.fleet.control import ControlCall

__all__ = ["TASK_OWNER", "Task", "TaskManager"]

log = logging.getLogger("relay.gateway.api.tasks")

#: Tasks waiting for an agent, per team; one more is answered 503.
QUEUE_LIMIT = 100
#: Events kept per task (progress beyond this is dropped; the final event never is).
MAX_EVENTS = 1000
#: Encoded bytes of events kept per task (later progress and outputs are dropped; the
#: final event never is): a chatty agent cannot make the gateway hold gigabytes.
MAX_TASK_BYTES = 4 * 1024 * 1024
#: Finished tasks are forgotten this long after they end.
FINISHED_TTL = 600.0
#: Tasks kept in memory in all.
MAX_TASKS = 10_000
#: Largest task input (JSON-encoded): it travels in one mux control message.
MAX_INPUT = 256 * 1024
MAX_KIND = 100
MAX_LABELS = 64
MAX_LABEL = 100
#: An SSE comment is sent after this much silence, so idle proxies keep the stream.
SSE_KEEPALIVE = 15.0
#: The owner of this gateway's task rows (a restart recovers only its own).
TASK_OWNER = "gateway"
#: The error of a task an agent was running when its gateway stopped.
RESTARTED = "the gateway restarted while the task ran"
#: In a fleet: a task every other gateway declined is offered again after this long.
OFFER_RETRY = 1.0
#: How long a gateway offered a task may take to say whether it dispatched it.
OFFER_TIMEOUT = 10.0
#: How often the events of a task held by another gateway of a fleet re-read its row.
ROW_POLL = 0.5

FINAL = ("succeeded", "failed", "cancelled")
#: Protocols a task may expose its port with (seed 000 sessions, udp aside).
EXPOSE_PROTOCOLS = ("http", "tcp")
_AGENT_EVENTS = {"task.progress": "progress", "task.output": "output",
                 "task.result": "result", "task.error": "error"}


@dataclass(eq=False)
class Task:
    """One task and everything that happened to it."""

    task_id: str
    team_id: str
    kind: str
    input: Any
    labels: list[str]
    status: str = "queued"
    agent_id: Optional[str] = None
    created_at: float = field(default_factory=time.time)
    finished_at: Optional[float] = None
    progress: Any = None
    outputs: list[Any] = field(default_factory=list)
    result: Any = None
    error: Optional[str] = None
    events: list[dict[str, Any]] = field(default_factory=list)
    events_dropped: int = 0
    #: Encoded bytes of the events kept.
    size: int = 0
    #: The agent connection it was handed to (a reconnect is another connection).
    session: Any = None
    #: Set (and replaced) whenever an event is added: SSE writers wait on it.
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: At the gateway holding the agent, for a task another gateway of a fleet owns:
    #: passes the agent's task messages on to that gateway (module docstring).
    relay: Optional[Callable[[dict[str, Any]], None]] = None
    #: Being offered to the other gateways of a fleet (not dispatched here meanwhile),
    #: and when the last offer round ended with no taker.
    offering: bool = False
    declined_at: float = 0.0
    #: Known only from the store's row (another gateway holds the task).
    from_row: bool = False
    #: ``{"port", "protocol"}`` to expose while the task runs, or None.
    expose: Optional[dict[str, Any]] = None
    #: Its task-bound tunnel session once open (the seed 000 answer, admin token included).
    tunnel: Optional[dict[str, Any]] = None
    #: Who submitted it (:func:`submitter`), None for a task recorded before this was kept.
    submitted_by: Optional[str] = None

    @property
    def finished(self) -> bool:
        return self.status in FINAL

    def may_administer(self, principal: Principal) -> bool:
        """May ``principal`` see the secrets of this task's events (its tunnel's
        admin_token)? Its submitter and the team's management callers (module docstring)."""
        return principal.can_manage or (self.submitted_by is not None and self.submitted_by == submitter(principal))

    def add_event(self, kind: str, secret: tuple[str, ...] = (), **data: Any) -> bool:
        """Record an event (encoded once, as SSE sends it, and once more without the
        ``secret`` fields for the callers that may not see them); False if over the bounds."""
        encoded = json.dumps({"type": kind, **data})
        public = json.dumps({"type": kind, **{k: v for k, v in data.items() if k not in secret}}) if secret else None
        final = kind in ("result", "error")
        if not final and (len(self.events) >= MAX_EVENTS or self.size + len(encoded) > MAX_TASK_BYTES):
            self.events_dropped += 1
            return False
        self.size += len(encoded) + (len(public) if public is not None else 0)
        event = {"seq": len(self.events) + 1, "type": kind, "data": encoded}
        if public is not None:
            event["public"] = public
        self.events.append(event)
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()
        return True

    def describe(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "kind": self.kind, "labels": self.labels,
                "status": self.status, "agent_id": self.agent_id,
                "created_at": self.created_at, "finished_at": self.finished_at,
                "progress": self.progress, "outputs": self.outputs,
                "result": self.result, "error": self.error,
                "events": len(self.events), "events_dropped": self.events_dropped,
                "expose": self.expose,
                "tunnel": {k: v for k, v in self.tunnel.items() if k != "admin_token"} if self.tunnel else None}


def submitter(principal: Principal) -> str:
    """Who a caller is, as a task records its submitter: ``KIND:SUBJECT`` (the
    credential id of an ``sk-``/``dk-`` key, a user's JWT ``sub``)."""
    return f"{principal.kind}:{principal.subject}"


def _validate_expose(value: Any) -> Optional[dict[str, Any]]:
    """``expose`` of a task body: None, or ``{"port": 1..65535, "protocol": http|tcp}``."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"port", "protocol"}:
        raise HttpError(400, "invalid_expose", 'expose must be an object {"port": N, "protocol": "http" | "tcp"}')
    port = value.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise HttpError(400, "invalid_expose", "expose.port must be an integer from 1 to 65535")
    protocol = value.get("protocol") or "http"
    if protocol not in EXPOSE_PROTOCOLS:
        raise HttpError(400, "invalid_expose", f"expose.protocol must be one of {', '.join(EXPOSE_PROTOCOLS)}")
    return {"port": port, "protocol": protocol}


def _validate(request: Request) -> tuple[str, Any, list[str], Optional[dict[str, Any]]]:
    body = request.json()
    if not isinstance(body, dict):
        raise HttpError(400, "invalid_request", "request body must be a JSON object")
    unknown = sorted(set(body) - {"kind", "input", "labels", "expose"})
    if unknown:
        raise HttpError(400, "unknown_field", f"unknown field {unknown[0]!r}; allowed: expose, input, kind, labels")
    kind = body.get("kind")
    if not isinstance(kind, str) or not kind.strip() or len(kind) > MAX_KIND or not kind.isprintable():
        raise HttpError(400, "invalid_kind", f"kind must be a string of 1 to {MAX_KIND} printable characters")
    labels = body.get("labels", [])
    if labels is None:
        labels = []
    if (not isinstance(labels, list) or len(labels) > MAX_LABELS
            or not all(isinstance(x, str) and x and len(x) <= MAX_LABEL for x in labels)):
        raise HttpError(400, "invalid_labels",
                        f"labels must be a list of at most {MAX_LABELS} non-empty strings")
    task_input = body.get("input")
    if len(json.dumps(task_input)) > MAX_INPUT:
        raise HttpError(400, "input_too_large", f"input must encode to at most {MAX_INPUT} bytes of JSON")
    return kind.strip(), task_input, sorted(set(labels)), _validate_expose(body.get("expose"))


class TaskManager:
    """Task routes, queues and dispatch of one gateway (see the module docstring)."""

    def __init__(self, gateway: "Gateway") -> None:
        self.gw = gateway
        self._tasks: dict[str, Task] = {}
        self._queues: dict[str, deque[Task]] = {}
        self._running: dict[str, Task] = {}  # by agent id
        self._last_task: dict[str, float] = {}  # agent id -> when it last got a task
        self._streams: set[asyncio.Transport] = set()  # open SSE responses
        self._dispatching = False
        #: Names this gateway's task rows in the store.
        self.owner = TASK_OWNER
        self._writes = StoreWrites()  # the rows' changes, in order
        self._pruned_at = 0.0
        # In a fleet: offers to other gateways in progress, and a later offer round per team.
        self._offers: set[asyncio.Task] = set()
        self._retries: dict[str, asyncio.TimerHandle] = {}
        self._background: set[asyncio.Task[Any]] = set()  # tunnels opening and closing
        gateway.hooks.on_agent_connected.append(self._agent_connected)
        gateway.hooks.on_agent_disconnected.append(self._agent_disconnected)
        gateway.registry.status_listeners.append(self._status_changed)

    def by_status(self) -> dict[str, int]:
        """How many known tasks are in each status now (queued, running, ...)."""
        counts: dict[str, int] = {}
        for task in self._tasks.values():
            counts[task.status] = counts.get(task.status, 0) + 1
        return counts

    def register(self, router: Router) -> None:
        router.add("POST", "/api/v1/tasks", self._submit)
        router.add("GET", "/api/v1/tasks", self._list)
        router.add("GET", "/api/v1/tasks/{task_id}", self._get)
        router.add("POST", "/api/v1/tasks/{task_id}/cancel", self._cancel)
        router.add("GET", "/api/v1/tasks/{task_id}/events", self._events)

    async def start(self) -> None:
        """Recover this gateway's tasks a previous run left unfinished (module docstring)."""
        store = self.gw.store
        for record in await store.list_tasks(None, ("queued", "dispatched", "running"), owner=self.owner):
            if record.status != "queued":
                await store.update_task(record.team_id, record.id, status="failed", error=RESTARTED,
                                        finished_at=time.time())
                if record.expose is not None and self.gw.fleet is not None:
                    # Alone, the restart closed every task's session (tunnel_sessions.restore);
                    # in a fleet only this gateway's tasks ended, so only their sessions close.
                    await self._close_sessions_of(record.team_id, record.id)
                continue
            task = Task(record.id, record.team_id, record.kind, record.input, list(record.labels),
                        created_at=record.created_at, expose=record.expose, submitted_by=record.submitted_by)
            task.add_event("status", status="queued")
            self._tasks[task.task_id] = task
            self._queues.setdefault(task.team_id, deque()).append(task)
            log.info("task %s (%s) queued again after a restart", task.task_id, task.kind)

    def close(self) -> None:
        """End the open event streams and offers (the gateway is stopping)."""
        for transport in list(self._streams):
            transport.close()
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()
        for task in list(self._offers):
            task.cancel()

    async def flush(self) -> None:
        """Wait until every change of a task is in the store."""
        await self._writes.flush()

    def _record(self, task: Task, **changes: Any) -> None:
        store = self.gw.store
        self._writes.submit(lambda: store.update_task(task.team_id, task.task_id, **changes), "a task's state")

    def openapi(self, document: dict[str, Any]) -> dict[str, Any]:
        """``document`` (the gateway's OpenAPI) with the task endpoints added."""
        error = {"$ref": "#/components/responses/Error"}
        task_id = {"name": "taskId", "in": "path", "required": True, "schema": {"type": "string"}}
        task = {"type": "object", "properties": {
            "task_id": {"type": "string"}, "kind": {"type": "string"},
            "labels": {"type": "array", "items": {"type": "string"}},
            "status": {"type": "string", "enum": ["queued", "dispatched", "running", *FINAL]},
            "agent_id": {"type": "string", "nullable": True}, "progress": {}, "outputs": {"type": "array", "items": {}},
            "result": {}, "error": {"type": "string", "nullable": True},
            "created_at": {"type": "number"}, "finished_at": {"type": "number", "nullable": True},
            "expose": {"type": "object", "nullable": True, "properties": {
                "port": {"type": "integer"}, "protocol": {"type": "string", "enum": list(EXPOSE_PROTOCOLS)}}},
            "tunnel": {"type": "object", "nullable": True,
                       "description": "the task-bound tunnel session once open (its admin_token only in the "
                                      "task's tunnel event)",
                       "properties": {"session_id": {"type": "string"}, "tunnel_url": {"type": "string"},
                                      "tunnel_protocol": {"type": "string"}, "hub_port": {"type": "integer"}}}}}
        document["components"]["schemas"]["Task"] = task
        document["paths"].update({
            "/tasks": {"get": {
                "summary": "The team's tasks, oldest first (finished ones for a while)",
                "parameters": [{"name": "status", "in": "query", "required": False,
                                "description": "comma-separated statuses to list",
                                "schema": {"type": "string"}}],
                "responses": {"200": {"description": "Tasks", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"tasks": {"type": "array", "items": {
                        "$ref": "#/components/schemas/Task"}}}}}}},
                    "400": error, "401": error, "403": error}}, "post": {
                "summary": "Submit a task to an idle agent of the team whose labels cover the task's",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["kind"], "properties": {
                        "kind": {"type": "string", "maxLength": MAX_KIND}, "input": {},
                        "labels": {"type": "array", "items": {"type": "string"}, "maxItems": MAX_LABELS},
                        "expose": {"type": "object", "nullable": True, "additionalProperties": False,
                                   "required": ["port"],
                                   "description": "a port of the agent's host to tunnel while the task runs "
                                                  "(its URL comes as the task's tunnel event, with the "
                                                  "admin_token for the submitter and management callers "
                                                  "only; it closes when the task ends)",
                                   "properties": {"port": {"type": "integer", "minimum": 1, "maximum": 65535},
                                                  "protocol": {"type": "string", "enum": list(EXPOSE_PROTOCOLS),
                                                               "default": "http"}}}}}}}},
                "responses": {"202": {"description": "Accepted", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {
                        "task_id": {"type": "string"}, "status": {"type": "string", "enum": ["queued", "dispatched"]},
                        "agent_id": {"type": "string", "nullable": True}}}}}},
                    "400": error, "401": error, "403": error, "503": error}}},
            "/tasks/{taskId}": {"get": {"summary": "A task's status, progress, outputs and result",
                                        "parameters": [task_id], "responses": {
                                            "200": {"description": "Task", "content": {"application/json": {
                                                "schema": {"$ref": "#/components/schemas/Task"}}}},
                                            "401": error, "404": error}}},
            "/tasks/{taskId}/cancel": {"post": {
                "summary": "Cancel a queued or running task (its agent's handler is cancelled, its tunnel closed)",
                "parameters": [task_id], "responses": {
                    "200": {"description": "The task, cancelled", "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/Task"}}}},
                    "401": error, "403": error, "404": error, "409": error}}},
            "/tasks/{taskId}/events": {"get": {
                "summary": "The task's events from the start as Server-Sent Events (status, progress, output, "
                           "then result or error); Last-Event-ID resumes",
                "description": "A task-bound tunnel's tunnel event carries session_id, tunnel_url, "
                               "tunnel_protocol (hub_port for tcp, terminal_url where the agent serves one) "
                               "to every runtime caller of the team, and its admin_token only to the caller "
                               "that submitted the task (the same key, or the same user) and to management "
                               "callers (sk- keys, users); another dk- key gets the event without it.",
                "parameters": [task_id], "responses": {
                    "200": {"description": "text/event-stream", "content": {"text/event-stream": {
                        # Each event (as SSE-aware tools such as schemathesis validate it).
                        "schema": {"type": "object", "required": ["data"], "properties": {
                            "id": {"type": "string"}, "event": {"type": "string"},
                            "data": {"type": "string"}}}}}}, "401": error, "404": error}}},
        })
        return document

    def get(self, team_id: str, task_id: str) -> Optional[Task]:
        """The team's task (another team's: None)."""
        task = self._tasks.get(task_id)
        return task if task is not None and task.team_id == team_id else None

    # ------------------------------------------------------------------ API

    async def _principal(self, request: Request) -> Any:
        principal = await self.gw.auth.authenticate(request.header("authorization"), request.header("x-team-id"))
        return principal.require_runtime()

    async def _task(self, request: Request, principal: Any = None) -> Task:
        principal = principal or await self._principal(request)
        task = self.get(principal.team_id, request.params["task_id"])
        if task is None:  # not in memory (a restart, or forgotten): the store's row
            record = await self.gw.store.get_task(principal.team_id, request.params["task_id"])
            task = _from_record(record) if record is not None else None
        if task is None:  # unknown or another team's: the same 404
            raise HttpError(404, "task_not_found", f"no task {request.params['task_id']} in this team")
        return task

    async def _submit(self, request: Request) -> Response:
        principal = await self._principal(request)
        kind, task_input, labels, expose = _validate(request)
        self._expire()
        queue = self._queues.setdefault(principal.team_id, deque())
        if len(queue) >= QUEUE_LIMIT:
            raise HttpError(503, "queue_full", f"the team already has {QUEUE_LIMIT} tasks waiting for an agent",
                            {"Retry-After": "5"})
        task = Task(str(uuid.uuid4()), principal.team_id, kind, task_input, labels, expose=expose,
                    submitted_by=submitter(principal))
        await self.gw.store.create_task(task.team_id, task.task_id, kind, task_input, labels, owner=self.owner,
                                        expose=expose, submitted_by=task.submitted_by)
        task.add_event("status", status="queued")
        self._tasks[task.task_id] = task
        queue.append(task)
        self.gw.traffic.count("tasks", "submitted")
        self._dispatch(principal.team_id)
        log.info("task %s (%s) %s%s", task.task_id, kind, task.status,
                 f" to agent {task.agent_id}" if task.agent_id else "")
        return json_response({"task_id": task.task_id, "status": task.status,
                              "agent_id": task.agent_id}, 202)

    async def _get(self, request: Request) -> Response:
        return json_response((await self._task(request)).describe())

    async def _list(self, request: Request) -> Response:
        principal = await self._principal(request)
        wanted: Optional[list[str]] = None
        raw = request.query_value("status")
        if raw:
            wanted = [s.strip() for s in raw.split(",") if s.strip()]
            bad = [s for s in wanted if s not in TASK_STATUSES]
            if bad or not wanted:
                raise HttpError(400, "invalid_status",
                                f"status must be a comma-separated list of {', '.join(TASK_STATUSES)}")
        tasks: dict[str, dict[str, Any]] = {}
        for record in await self.gw.store.list_tasks(principal.team_id, wanted):
            tasks[record.id] = _from_record(record).describe()
        for task in self._tasks.values():  # this gateway's own: their live state wins over the row
            if task.team_id != principal.team_id:
                continue
            if wanted is None or task.status in wanted:
                tasks[task.task_id] = task.describe()
            else:  # the row may lag behind (its write is queued)
                tasks.pop(task.task_id, None)
        ordered = sorted(tasks.values(), key=lambda t: (t["created_at"], t["task_id"]))
        return json_response({"tasks": ordered})

    async def _cancel(self, request: Request) -> Response:
        principal = await self._principal(request)
        task = await self._task(request, principal)
        if task.finished:
            raise HttpError(409, "task_finished", f"task {task.task_id} already ended ({task.status})")
        if self.get(principal.team_id, task.task_id) is not task:  # known only from the store
            return json_response(await self._cancel_elsewhere(principal.team_id, task))
        self.cancel(task)
        return json_response(task.describe())

    async def _cancel_elsewhere(self, team_id: str, task: Task) -> dict[str, Any]:
        """Cancel a task another gateway of the fleet owns: a ``cancel`` control request
        to that gateway (its row names it), which cancels it as its own API would;
        returns the task as it answers. 409 ``task_elsewhere`` if it cannot be reached."""
        fleet = self.gw.fleet
        record = await self.gw.store.get_task(team_id, task.task_id)
        owner = record.owner if record is not None else ""
        gateway_id = owner.split("/", 1)[1] if owner.startswith(f"{TASK_OWNER}/") else ""
        unreachable = HttpError(409, "task_elsewhere", f"task {task.task_id} is run by another gateway of the "
                                                       f"fleet ({gateway_id or 'unknown'}), which cannot be reached")
        if fleet is None or not gateway_id or gateway_id == fleet.gateway_id:
            raise unreachable
        try:
            reply = await fleet.control.request(gateway_id, "cancel", team_id, {"task_id": task.task_id})
            try:
                answer = await reply.next(OFFER_TIMEOUT)
            finally:
                reply.close()
        except (ConnectionError, TimeoutError, ValueError) as exc:
            log.info("cannot cancel task %s at gateway %s: %s", task.task_id, gateway_id, exc)
            raise unreachable from None
        if isinstance(answer, dict) and isinstance(answer.get("task"), dict):
            return answer["task"]
        error = answer.get("error") if isinstance(answer, dict) else None
        if error == "task_finished":
            raise HttpError(409, "task_finished", f"task {task.task_id} already ended")
        if error == "task_not_found":
            raise HttpError(404, "task_not_found", f"no task {task.task_id} in this team")
        raise unreachable

    async def serve_cancel(self, call: "ControlCall") -> None:
        """A ``cancel`` control request: another gateway of the fleet was asked to cancel
        one of this gateway's tasks (:meth:`_cancel_elsewhere`)."""
        body = call.body
        task_id = body.get("task_id") if isinstance(body, dict) else None
        task = self.get(call.team_id, task_id) if isinstance(task_id, str) else None
        if task is None:  # unknown here, or another team's: the same answer
            call.send({"error": "task_not_found"})
        elif task.finished:
            call.send({"error": "task_finished"})
        else:
            self.cancel(task)
            log.info("task %s cancelled through another gateway", task.task_id)
            call.send({"task": task.describe()})

    def cancel(self, task: Task) -> None:
        """Cancel ``task`` (queued, dispatched or running): see the module docstring."""
        self._stop(task, "cancelled", "task cancelled", cancelled=True)

    def _stop(self, task: Task, status: str, error: str, **event: Any) -> None:
        """End an unfinished task from the gateway's side: out of its queue, or cancelled
        on its agent (which is free at once), with ``status`` and ``error``."""
        queue = self._queues.get(task.team_id)
        if queue is not None and task in queue:
            queue.remove(task)
        agent = self.gw.registry.get(task.team_id, task.agent_id) if task.agent_id else None
        running = task.agent_id is not None and self._running.get(task.agent_id) is task
        if isinstance(task.session, ControlReply):  # run by an agent another gateway holds:
            task.session.close()  # the reset makes that gateway cancel it there (serve_peer)
        elif running and task.session is not None and not task.session.is_closed:
            try:
                task.session.send_control({"type": "task.cancel", "task_id": task.task_id})
            except Exception as exc:  # gone meanwhile: its handler ended with the connection
                log.info("cannot send the cancel of task %s: %s", task.task_id, exc)
        task.error = error
        self._finish(task, status, error=error, **event)
        if running and agent is not None and agent.session is task.session:
            self._release(agent)

    async def _events(self, request: Request) -> None:
        """Server-Sent Events from the first event (or after ``Last-Event-ID``) to the end;
        cut if the credential that asked is revoked meanwhile."""
        principal = await self._principal(request)
        task = await self._task(request, principal)
        which = "data" if task.may_administer(principal) else "public"
        try:
            position = max(0, int(request.header("last-event-id") or 0))
        except ValueError:
            position = 0
        transport, _ = request.take_over()
        self.gw.revocations.hold(principal, transport)
        client = _SseClient()
        transport.set_protocol(client)
        client.connection_made(transport)
        transport.resume_reading()  # only to notice the client going away
        self._streams.add(transport)
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                        b"Cache-Control: no-cache\r\nConnection: close\r\nServer: relay\r\n\r\n")
        quiet_since = asyncio.get_running_loop().time()
        try:
            while not client.closed.done():
                changed = task.changed
                # Events are numbered 1.. and kept whole, so a position is an index.
                for event in task.events[position:]:
                    data = event.get(which, event["data"])  # "public": without the secret fields
                    transport.write(f"id: {event['seq']}\nevent: {event['type']}\ndata: {data}\n\n".encode())
                    position = event["seq"]
                if task.finished and position >= len(task.events):
                    break
                await client.drain()
                waiter = asyncio.ensure_future(changed.wait())
                either: set[asyncio.Future[Any]] = {waiter, client.closed}
                done, _ = await asyncio.wait(either, timeout=ROW_POLL if task.from_row else SSE_KEEPALIVE,
                                             return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if not task.from_row:
                    if not done:
                        transport.write(b": keepalive\n\n")
                    continue
                # Held by another gateway of a fleet: follow its row, polled.
                await self._follow_row(task, principal.team_id)
                now = asyncio.get_running_loop().time()
                if position < len(task.events):
                    quiet_since = now
                elif now - quiet_since >= SSE_KEEPALIVE:
                    transport.write(b": keepalive\n\n")
                    quiet_since = now
        finally:
            self._streams.discard(transport)
            transport.close()
        return None

    async def _follow_row(self, task: Task, team_id: str) -> None:
        """Events for a task known only from its row: its status and final event as the
        gateway holding it records them."""
        try:
            record = await self.gw.store.get_task(team_id, task.task_id)
        except Exception as exc:  # a busy database: the next poll
            log.debug("cannot read task %s: %s", task.task_id, exc)
            return
        if record is None or record.status == task.status:
            return
        task.status, task.agent_id = record.status, record.agent_id
        task.result, task.error, task.finished_at = record.result, record.error, record.finished_at
        if record.status == "succeeded":
            task.add_event("result", result=record.result)
        elif record.status == "failed":
            task.add_event("error", error=record.error)
        else:
            task.add_event("status", status=record.status, agent_id=record.agent_id)

    # ------------------------------------------------------------------ dispatch

    def _eligible(self, task: Task) -> Optional[ConnectedAgent]:
        wanted = set(task.labels)
        candidates = [a for a in self.gw.registry.connected()
                      if a.team_id == task.team_id and a.status == "idle" and not a.session.is_closed
                      and a.agent_id not in self._running and wanted <= set(a.labels)]
        if not candidates:
            return None
        return min(candidates, key=lambda a: (self._last_task.get(a.agent_id, 0.0), a.name))

    def _dispatch(self, team_id: str) -> None:
        """Hand the team's queued tasks to eligible agents, oldest task first."""
        if self._dispatching:  # marking an agent busy calls back here
            return
        self._dispatching = True
        try:
            queue = self._queues.get(team_id)
            for task in list(queue or ()):
                if task.offering:  # another gateway may be taking it right now
                    continue
                agent = self._eligible(task)
                if agent is None:
                    continue
                try:
                    agent.session.send_control({"type": "task", "task_id": task.task_id,
                                                "kind": task.kind, "input": task.input})
                except Exception as exc:  # the session just closed: try the next one later
                    log.info("cannot hand task %s to agent %s: %s", task.task_id, agent.agent_id, exc)
                    continue
                assert queue is not None
                queue.remove(task)
                task.status, task.agent_id, task.session = "dispatched", agent.agent_id, agent.session
                task.add_event("status", status="dispatched", agent_id=agent.agent_id)
                self._record(task, status="dispatched", agent_id=agent.agent_id)
                self._running[agent.agent_id] = task
                self._last_task[agent.agent_id] = time.monotonic()
                self.gw.registry.set_status(agent.team_id, agent.agent_id, "busy")
                if task.expose is not None:
                    self._background_task(self._open_tunnel(task, agent))
            self._offer_elsewhere(team_id)
        finally:
            self._dispatching = False

    # ------------------------------------------------------------------ fleet

    def agent_elsewhere(self, team_id: str) -> None:
        """An agent of the team appeared on another gateway of the fleet: its queued
        tasks are offered (again) now."""
        queue = self._queues.get(team_id)
        for task in queue or ():
            task.declined_at = 0.0
        self._dispatch(team_id)

    def _offer_elsewhere(self, team_id: str) -> None:
        """Offer the team's tasks no agent here took to the other gateways of a fleet
        (module docstring); a task declined everywhere is offered again later."""
        fleet = self.gw.fleet
        queue = self._queues.get(team_id)
        if fleet is None or not queue:
            return
        now = time.monotonic()
        later = False
        for task in queue:
            if task.offering:
                continue
            if now - task.declined_at < OFFER_RETRY:
                later = True
                continue
            gateways = fleet.registry.gateways_for(team_id, task.labels)
            if not gateways:
                continue
            task.offering = True
            offer = asyncio.get_running_loop().create_task(self._offer(task, gateways))
            self._offers.add(offer)
            offer.add_done_callback(self._offers.discard)
        if later and team_id not in self._retries:
            def again() -> None:
                self._retries.pop(team_id, None)
                self._dispatch(team_id)

            self._retries[team_id] = asyncio.get_running_loop().call_later(OFFER_RETRY, again)

    async def _offer(self, task: Task, gateways: list[str]) -> None:
        """Offer ``task`` to ``gateways`` in turn until one dispatches it; then record
        what its agent reports until the task ends."""
        fleet = self.gw.fleet
        assert fleet is not None
        body = {"task_id": task.task_id, "kind": task.kind, "input": task.input, "labels": task.labels}
        try:
            for gateway_id in gateways:
                if task.status != "queued":
                    return
                try:
                    reply = await fleet.control.request(gateway_id, "task", task.team_id, body)
                except (ConnectionError, ValueError) as exc:
                    log.info("cannot offer task %s to gateway %s: %s", task.task_id, gateway_id, exc)
                    continue
                try:
                    answer = await reply.next(OFFER_TIMEOUT)
                except (ConnectionError, TimeoutError, ValueError) as exc:
                    log.info("gateway %s did not answer the offer of task %s: %s", gateway_id, task.task_id, exc)
                    answer = None
                agent_id = answer.get("agent_id") if isinstance(answer, dict) and answer.get("t") == "dispatched" \
                    else None
                if not isinstance(agent_id, str):
                    reply.close()
                    continue
                queue = self._queues.get(task.team_id)
                if queue is not None and task in queue:
                    queue.remove(task)
                task.offering = False
                task.status, task.agent_id, task.session = "dispatched", agent_id, reply
                task.add_event("status", status="dispatched", agent_id=agent_id)
                self._record(task, status="dispatched", agent_id=agent_id)
                log.info("task %s (%s) dispatched to agent %s on gateway %s", task.task_id, task.kind,
                         agent_id, gateway_id)
                if task.expose is not None:  # opened here, for the agent held there
                    remote = self.gw.registry.get(task.team_id, agent_id)
                    if remote is None:
                        self._stop(task, "failed", "agent disconnected")
                    else:
                        self._background_task(self._open_tunnel(task, remote))
                await self._follow(task, reply)
                return
            task.declined_at = time.monotonic()
        finally:
            task.offering = False
        self._dispatch(task.team_id)  # schedules the next round (or a local agent is idle now)

    async def _follow(self, task: Task, reply: "ControlReply") -> None:
        """Record the task messages the holder passes on, until the final one."""
        try:
            while not task.finished:
                frame = await reply.next()
                if frame is None:
                    break
                message = frame.get("message") if isinstance(frame, dict) and frame.get("t") == "event" else None
                if isinstance(message, dict):
                    self._apply(task, message)
        except (ConnectionError, ValueError) as exc:
            log.info("task %s: the connection to the gateway holding its agent ended: %s", task.task_id, exc)
        finally:
            reply.close()
            if not task.finished:
                task.error = "agent disconnected"
                self._finish(task, "failed", error=task.error)
            self._dispatch(task.team_id)  # the next queued task may go there now

    async def serve_peer(self, call: "ControlCall") -> None:
        """A ``task`` control request: another gateway of the fleet offers one of its
        tasks to this gateway's idle agents of the team (module docstring)."""
        body = call.body
        if not isinstance(body, dict) or not isinstance(body.get("task_id"), str) \
                or not isinstance(body.get("kind"), str) or not isinstance(body.get("labels"), list) \
                or not all(isinstance(x, str) for x in body["labels"]):
            call.send({"t": "declined", "error": "malformed task offer"})
            return
        task = Task(body["task_id"], call.team_id, body["kind"], body.get("input"), list(body["labels"]))
        agent = self._eligible(task)
        if agent is None:
            call.send({"t": "declined"})
            return
        try:
            agent.session.send_control({"type": "task", "task_id": task.task_id, "kind": task.kind,
                                        "input": task.input})
        except Exception as exc:  # the session just closed
            call.send({"t": "declined", "error": str(exc)})
            return
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def relay(message: dict[str, Any]) -> None:
            final = message.get("type") in ("task.result", "task.error")
            if not final and not call.writable():
                return  # the owner is a send queue behind: progress is dropped, never the end
            call.send({"t": "event", "message": message})
            if final and not ended.done():
                ended.set_result(None)

        task.relay = relay
        task.status, task.agent_id, task.session = "dispatched", agent.agent_id, agent.session
        self._running[agent.agent_id] = task
        self._last_task[agent.agent_id] = time.monotonic()
        self.gw.registry.set_status(agent.team_id, agent.agent_id, "busy")
        call.send({"t": "dispatched", "agent_id": agent.agent_id})
        log.info("task %s (%s) of another gateway dispatched to agent %s", task.task_id, task.kind, agent.agent_id)
        gone = asyncio.ensure_future(call.stream.wait_closed())  # finished early: the requester reset it
        try:
            await asyncio.wait({ended, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if ended.done() or self._running.get(agent.agent_id) is not task:
            return
        # The gateway that owns the task cancelled it (or went away): cancel it on the
        # agent, whose handler sees it as it would for a task of this gateway.
        del self._running[agent.agent_id]
        if not agent.session.is_closed:
            try:
                agent.session.send_control({"type": "task.cancel", "task_id": task.task_id})
            except Exception as exc:  # gone meanwhile: its handler ended with the connection
                log.info("cannot send the cancel of task %s: %s", task.task_id, exc)
        log.info("task %s of another gateway cancelled on agent %s (%s)", task.task_id, agent.agent_id,
                 call.stream.exception or "its gateway went away")
        self._release(agent)

    def _finish(self, task: Task, status: str, **event: Any) -> None:
        self.gw.traffic.count("tasks", status)
        task.status = status
        task.finished_at = time.time()
        task.add_event("result" if status == "succeeded" else "error", **event)
        self._record(task, status=status, result=task.result, error=task.error, finished_at=task.finished_at)
        if task.agent_id is not None and self._running.get(task.agent_id) is task:
            del self._running[task.agent_id]
        if task.tunnel is not None:  # the task's tunnel ends with it
            self._background_task(self._close_tunnel(task))
        log.info("task %s %s", task.task_id, status)

    # ------------------------------------------------------------------ task-bound tunnels

    def _background_task(self, coroutine: Any) -> None:
        job = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    async def _open_tunnel(self, task: Task, agent: ConnectedAgent) -> None:
        """Open the session ``task.expose`` asks for on the task's agent; its answer is
        the task's ``tunnel`` event. A refusal fails (and cancels) the task."""
        assert task.expose is not None
        tunnels = self.gw.tunnels
        port, protocol = task.expose["port"], task.expose["protocol"]
        refusal = tunnels.target_refusal(task.team_id, agent.agent_id, "127.0.0.1", port) \
            if tunnels is not None else (503, "not_started", "the gateway is stopping")
        result: Optional[dict[str, Any]] = None
        if refusal is None and tunnels is not None:
            try:
                result = await tunnels.open(task.team_id, agent.agent_id, port, protocol, task_id=task.task_id)
            except Exception as exc:  # the store failed: the task cannot have its tunnel
                refusal = (503, "store_unavailable", str(exc))
        if result is None:
            assert refusal is not None
            if not task.finished:
                log.warning("task %s cannot expose port %d: %s", task.task_id, port, refusal[2])
                self._stop(task, "failed", f"cannot expose port {port}: {refusal[2]}")
            return
        task.tunnel = result
        if task.finished:  # it ended while the session opened
            self._background_task(self._close_tunnel(task))
            return
        task.add_event("tunnel", secret=("admin_token",), **result)
        log.info("task %s exposes port %d: %s tunnel %s", task.task_id, port, protocol, result["session_id"])

    async def _close_sessions_of(self, team_id: str, task_id: str) -> None:
        for row in await self.gw.store.list_tunnel_sessions(team_id):
            if isinstance(row.metadata, dict) and row.metadata.get("task_id") == task_id:
                await self.gw._close_sessions(team_id, row.agent_id, row.session_id)

    async def _close_tunnel(self, task: Task) -> None:
        tunnel, agent_id = task.tunnel, task.agent_id
        if tunnel is None or agent_id is None:
            return
        try:
            closed = await self.gw._close_sessions(task.team_id, agent_id, tunnel["session_id"])
        except Exception as exc:  # the next start closes task-bound sessions (tunnel_sessions.restore)
            log.warning("cannot close the tunnel of task %s: %s", task.task_id, exc)
            return
        if closed:
            log.info("task %s ended: its tunnel %s closed", task.task_id, tunnel["session_id"])

    def _release(self, agent: ConnectedAgent) -> None:
        """The agent finished its task: idle again (or ``tunnel``), and maybe the next one."""
        if agent.status == "busy" and not agent.session.is_closed:
            self.gw.rest(agent)  # idle (or tunnel) a moment later; becoming idle dispatches
        self._dispatch(agent.team_id)

    def on_control(self, agent: ConnectedAgent, message: dict[str, Any]) -> bool:
        """A control message from ``agent``; True if it was about a task (handled here)."""
        kind = _AGENT_EVENTS.get(message.get("type", ""))
        if kind is None:
            return False
        task = self._running.get(agent.agent_id)
        if task is None or task.task_id != message.get("task_id") or task.session is not agent.session:
            return True  # late, or not this agent's task: ignored
        if task.relay is not None:  # another gateway's task: its messages go there
            task.relay(message)
            if kind in ("result", "error"):
                del self._running[agent.agent_id]
                self._release(agent)
            return True
        self._apply(task, message)
        if task.finished:
            self._release(agent)
        return True

    def _apply(self, task: Task, message: dict[str, Any]) -> None:
        """Record a task message of the task's agent (held here or elsewhere)."""
        kind = _AGENT_EVENTS.get(message.get("type", ""))
        if kind is None or task.finished or message.get("task_id") != task.task_id:
            return
        if kind in ("progress", "output") and task.status != "running":
            task.status = "running"
            self._record(task, status="running")
        if kind == "progress":
            task.progress = message.get("progress")
            task.add_event("progress", progress=task.progress)
        elif kind == "output":
            output = message.get("output")
            if task.add_event("output", output=output):  # kept only within the bounds
                task.outputs.append(output)
        elif kind == "result":
            task.result = message.get("result")
            self._finish(task, "succeeded", result=task.result)
        else:
            error = message.get("error")
            task.error = str(error)[:2000] if error is not None else "task failed"
            self._finish(task, "failed", error=task.error)

    def _agent_connected(self, agent: ConnectedAgent) -> None:
        self._dispatch(agent.team_id)

    def _agent_disconnected(self, agent: ConnectedAgent) -> None:
        task = self._running.get(agent.agent_id)
        if task is not None and task.session is agent.session and task.relay is not None:
            del self._running[agent.agent_id]
            task.relay({"type": "task.error", "task_id": task.task_id, "error": "agent disconnected"})
        elif task is not None and task.session is agent.session:
            task.error = "agent disconnected"
            self._finish(task, "failed", error=task.error)

    def _status_changed(self, agent: ConnectedAgent) -> None:
        if agent.status == "idle":
            self._dispatch(agent.team_id)

    def _expire(self) -> None:
        """Forget finished tasks past their TTL (their rows too, once a minute at most),
        and the oldest ones past MAX_TASKS."""
        now = time.time()
        if now - self._pruned_at > 60:
            self._pruned_at = now
            store = self.gw.store
            self._writes.submit(lambda: store.delete_finished_tasks(now - FINISHED_TTL), "finished tasks")
        for task_id, task in list(self._tasks.items()):
            if task.finished_at is not None and now - task.finished_at > FINISHED_TTL:
                del self._tasks[task_id]
        if len(self._tasks) >= MAX_TASKS:
            finished = sorted((t for t in self._tasks.values() if t.finished), key=lambda t: t.finished_at or 0)
            for task in finished[:len(self._tasks) - MAX_TASKS + 1]:
                del self._tasks[task.task_id]
        if len(self._tasks) >= MAX_TASKS:
            raise HttpError(503, "too_many_tasks", "too many tasks in progress; try again later",
                            {"Retry-After": "5"})


def _from_record(record: TaskRecord) -> Task:
    """A task known only from its store row: its status, result or error, and as events
    its status and, once it ended, the final event."""
    task = Task(record.id, record.team_id, record.kind, record.input, list(record.labels),
                status=record.status, agent_id=record.agent_id, created_at=record.created_at,
                finished_at=record.finished_at, result=record.result, error=record.error, expose=record.expose,
                submitted_by=record.submitted_by)
    task.from_row = not task.finished
    task.add_event("status", status=record.status, agent_id=record.agent_id)
    if record.status == "succeeded":
        task.add_event("result", result=record.result)
    elif record.status in ("failed", "cancelled"):
        task.add_event("error", error=record.error)
    return task


class _SseClient(asyncio.Protocol):
    """Protocol of an SSE response's connection: notices the client leaving and honours
    the transport's flow control (a slow reader pauses the writer, never grows a buffer
    past the transport's high-water mark)."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._resumed: Optional[asyncio.Future[None]] = None

    def connection_made(self, transport: Any) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        pass  # nothing is expected from the client

    def eof_received(self) -> bool:
        return True  # keep writing after the client's half-close

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self.resume_writing()

    def pause_writing(self) -> None:
        if self._resumed is None:
            self._resumed = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)
        self._resumed = None

    async def drain(self) -> None:
        if self._resumed is not None:
            await self._resumed
