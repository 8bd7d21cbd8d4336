"""OpenAPI 3 description of the Tunnels API (tunnels, shares, webhooks), merged into the
gateway's ``/api/v1/openapi.json``. Paths are relative to the document's server
``{gateway}/api/v1``, except the share links ``/s/{shareToken}/...``, whose path items
carry their own ``servers`` (the gateway's root). Kept next to
:mod:`relay.gateway.api.tunnels`; a test checks that every route registered there is
described here with the same methods.
"""
from __future__ import annotations

from typing import Any

from relay.gateway.api.shares import EXPIRY_CHOICES, HTTP_METHODS
from relay.gateway.api.webhooks import EVENTS

__all__ = ["add_tunnels_api"]

_ERROR = {"$ref": "#/components/responses/Error"}
_TEAM = {"name": "X-Team-ID", "in": "header", "required": False,
         "schema": {"type": "string", "format": "uuid"},
         "description": "Required with a user JWT; ignored with sk-/dk- credentials."}


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): _ERROR for code in (401, 403) + codes}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


_NULLABLE_STRING = {"type": "string", "nullable": True}

SCHEMAS: dict[str, Any] = {
    "Tunnel": {"type": "object", "properties": {
        "id": {"type": "string", "format": "uuid"},
        "name": {"type": "string"},
        "agent_id": {"type": "string", "format": "uuid"},
        "target": {"type": "string", "description": "host:port"},
        "target_host": {"type": "string"},
        "target_port": {"type": "integer"},
        "protocol": {"type": "string", "enum": ["tcp", "udp", "http", "https"]},
        "public": {"type": "boolean"},
        "public_url": {"type": "string", "description": "public tunnels: tcp://HOST:PORT (udp://) of the hub "
                                                        "port on the public hub host, in every answer; for "
                                                        "http/https, the public share link, in the create "
                                                        "answer only"},
        "hub_host": _NULLABLE_STRING,
        "hub_port": {"type": "integer", "nullable": True},
        "status": {"type": "string", "enum": ["active", "paused", "connecting", "error", "deleted"]},
        "error": _NULLABLE_STRING,
        "metadata": {"type": "object"},
        "connections": {"type": "integer"},
        "active_connections": {"type": "integer"},
        "last_error": _NULLABLE_STRING,
        "udp": {"type": "object", "description": "udp tunnels only: flow and datagram counters",
                "properties": {name: {"type": "integer"} for name in (
                    "flows", "active_flows", "datagrams_in", "datagrams_out", "bytes_in", "bytes_out",
                    "datagrams_dropped", "datagrams_refused")}},
        "created_at": {"type": "string"},
        "updated_at": {"type": "string"},
    }},
    "TunnelCreate": {"type": "object", "required": ["target", "agent_id"], "additionalProperties": False,
                     "properties": {
        "target": {"oneOf": [
            {"type": "string", "description": 'host:port or "[v6]:port"'},
            {"type": "object", "required": ["host", "port"], "properties": {
                "host": {"type": "string"}, "port": {"type": "integer", "minimum": 1, "maximum": 65535}}}]},
        "agent_id": {"type": "string", "format": "uuid"},
        "name": {"type": "string", "minLength": 1, "maxLength": 100, "nullable": True},
        "protocol": {"type": "string", "enum": ["auto", "tcp", "udp", "http", "https"], "default": "auto",
                     "description": "auto: https for 443, http for common web ports, udp for "
                                    "UDP service ports (53, 123, 514, 8125, 51820 ...), else tcp"},
        "public": {"type": "boolean", "default": False,
                   "description": "hub port on the gateway's public hub host (every interface by default) "
                                  "instead of its private one; http/https also get a public share link"},
        "hub_port": {"type": "integer", "minimum": 1024, "maximum": 65535, "nullable": True},
    }},
    "TunnelUpdate": {"type": "object", "additionalProperties": False, "minProperties": 1, "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 100},
        "status": {"type": "string", "enum": ["active", "paused"]},
        "metadata": {"type": "object", "description": "at most 16 KiB as JSON"},
    }},
    "Connect": {"type": "object", "required": ["agent_id"], "additionalProperties": False, "properties": {
        "agent_id": {"type": "string", "format": "uuid"},
        "local_port": {"type": "integer", "minimum": 1, "maximum": 65535, "nullable": True},
    }},
    "Connection": {"type": "object", "properties": {
        "tunnel_id": {"type": "string"}, "agent_id": {"type": "string"},
        "local_host": {"type": "string"}, "local_port": {"type": "integer"},
        "protocol": {"type": "string"}, "connection_string": {"type": "string"},
        "hub": {"type": "object"}, "tunnel_status": {"type": "string"},
    }},
    "Binding": {"type": "object", "properties": {
        "agent_id": {"type": "string"}, "local_host": {"type": "string"}, "local_port": {"type": "integer"},
        "agent_online": {"type": "boolean"}, "connection_string": {"type": "string"},
        "created_at": {"type": "string"},
    }},
    "Share": {"type": "object", "properties": {
        "id": {"type": "string", "format": "uuid"},
        "tunnel_id": {"type": "string", "format": "uuid"},
        "name": {"type": "string"},
        "description": {"type": "string"},
        "token_prefix": {"type": "string"},
        "expires_at": _NULLABLE_STRING,
        "expired": {"type": "boolean"},
        "allowed_methods": {"type": "array", "items": {"type": "string"}, "nullable": True},
        "rate_limit": {"type": "integer", "nullable": True},
        "created_at": {"type": "string"},
        "shareUrl": {"type": "string", "description": "the link to send (seed 002: save it); only in "
                                                     "the answer to the create call"},
        "share_url": {"type": "string", "description": "the same as shareUrl (kept for earlier clients)"},
    }},
    "ShareCreate": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 100},
        "description": {"type": "string", "maxLength": 500, "nullable": True},
        "expires_in": {"type": "string", "enum": list(EXPIRY_CHOICES), "default": "24h"},
        "allowed_methods": {"type": "array", "minItems": 1, "nullable": True,
                            "items": {"type": "string", "enum": list(HTTP_METHODS)}},
        "rate_limit": {"type": "integer", "minimum": 1, "maximum": 1000, "nullable": True},
    }},
    "Webhook": {"type": "object", "properties": {
        "id": {"type": "string", "format": "uuid"},
        "url": {"type": "string"},
        "events": {"type": "array", "items": {"type": "string", "enum": list(EVENTS)}},
        "created_at": {"type": "string"},
        "secret": {"type": "string", "description": "only in the answer to the create call"},
    }},
    "WebhookCreate": {"type": "object", "required": ["url"], "additionalProperties": False, "properties": {
        "url": {"type": "string", "maxLength": 2048, "description": "http:// or https://"},
        "events": {"type": "array", "minItems": 1, "items": {"type": "string", "enum": list(EVENTS)}},
    }},
}


def _paths() -> dict[str, Any]:
    tid, sid, wid = _path_param("tunnelId"), _path_param("shareId"), _path_param("webhookId")
    no_content = {"description": "Deleted"}
    return {
        "/tunnels": {
            "post": {"summary": "Create a tunnel", "parameters": [_TEAM], "requestBody": _body(_ref("TunnelCreate")),
                     "responses": {"201": _json(_ref("Tunnel"), "Created"), **_errors(400, 404, 409)}},
            "get": {"summary": "List the team's tunnels", "parameters": [_TEAM],
                    "responses": {"200": _json({"type": "object", "properties": {
                        "tunnels": {"type": "array", "items": _ref("Tunnel")}}}, "Tunnels"), **_errors(400)}},
        },
        "/tunnels/{tunnelId}": {
            "get": {"summary": "Get a tunnel", "parameters": [tid, _TEAM],
                    "responses": {"200": _json(_ref("Tunnel"), "Tunnel"), **_errors(400, 404)}},
            "patch": {"summary": "Update name, status (active/paused) or metadata", "parameters": [tid, _TEAM],
                      "requestBody": _body(_ref("TunnelUpdate")),
                      "responses": {"200": _json(_ref("Tunnel"), "Updated"), **_errors(400, 404)}},
            "delete": {"summary": "Delete a tunnel and its shares", "parameters": [tid, _TEAM],
                       "responses": {"204": no_content, **_errors(400, 404)}},
        },
        "/tunnels/{tunnelId}/connect": {
            "post": {"summary": "Have a second agent bind the tunnel locally", "parameters": [tid, _TEAM],
                     "requestBody": _body(_ref("Connect")),
                     "responses": {"200": _json(_ref("Connection"), "Connection"),
                                   **_errors(400, 404, 409, 502, 504)}},
        },
        "/tunnels/{tunnelId}/bindings": {
            "get": {"summary": "The agents that bound the tunnel locally (connect)", "parameters": [tid, _TEAM],
                    "responses": {"200": _json({"type": "object", "properties": {
                        "bindings": {"type": "array", "items": _ref("Binding")}}}, "Bindings"),
                        **_errors(400, 404)}},
        },
        "/tunnels/{tunnelId}/bindings/{agentId}": {
            "delete": {"summary": "Remove an agent's binding (it stops listening)",
                       "parameters": [tid, _path_param("agentId"), _TEAM],
                       "responses": {"204": no_content, **_errors(400, 404)}},
        },
        "/tunnels/{tunnelId}/shares": {
            "post": {"summary": "Create a share link", "parameters": [tid, _TEAM],
                     "requestBody": _body(_ref("ShareCreate")),
                     "responses": {"201": _json(_ref("Share"), "Created (shareUrl shown once)"),
                                   **_errors(400, 404)}},
            "get": {"summary": "List a tunnel's shares", "parameters": [tid, _TEAM],
                    "responses": {"200": _json({"type": "object", "properties": {
                        "shares": {"type": "array", "items": _ref("Share")}}}, "Shares"), **_errors(400, 404)}},
        },
        "/tunnels/{tunnelId}/shares/{shareId}": {
            "get": {"summary": "Get a share", "parameters": [tid, sid, _TEAM],
                    "responses": {"200": _json(_ref("Share"), "Share"), **_errors(400, 404)}},
            "delete": {"summary": "Delete a share", "parameters": [tid, sid, _TEAM],
                       "responses": {"204": no_content, **_errors(400, 404)}},
        },
        "/webhooks": {
            "post": {"summary": "Register a webhook (tunnel.created, tunnel.deleted)", "parameters": [_TEAM],
                     "requestBody": _body(_ref("WebhookCreate")),
                     "responses": {"201": _json(_ref("Webhook"), "Created (secret shown once)"), **_errors(400)}},
            "get": {"summary": "List the team's webhooks", "parameters": [_TEAM],
                    "responses": {"200": _json({"type": "object", "properties": {
                        "webhooks": {"type": "array", "items": _ref("Webhook")}}}, "Webhooks"), **_errors(400)}},
        },
        "/webhooks/{webhookId}": {
            "get": {"summary": "Get a webhook", "parameters": [wid, _TEAM],
                    "responses": {"200": _json(_ref("Webhook"), "Webhook"), **_errors(400, 404)}},
            "delete": {"summary": "Delete a webhook", "parameters": [wid, _TEAM],
                       "responses": {"204": no_content, **_errors(400, 404)}},
        },
    }


def _share_paths(root: str) -> dict[str, Any]:
    """The share links ``/s/{shareToken}[/...]`` (relay.gateway.http.share_proxy). They live at
    the gateway's root, not under ``/api/v1``: each path item says so with its own
    ``servers``. No Authorization: the token in the URL is the credential."""
    token = {**_path_param("shareToken"), "description": "The share link's token (from share_url).",
             "example": "no-such-share-token"}
    rest = {**_path_param("path"), "description": "Forwarded to the tunnel's target as is (may contain '/'); "
                                                 "the query too."}
    errors = {"404": _json(_ref("Error"), "Unknown share token"),
              "410": _json(_ref("Error"), "The share has expired"),
              "405": _json(_ref("Error"), "Method not in the share's allowed_methods (Allow lists them)"),
              "429": _json(_ref("Error"), "Over the share's rate limit (Retry-After says when to retry)"),
              "502": _json(_ref("Error"), "The agent could not reach the tunnel's target"),
              "503": _json(_ref("Error"), "The tunnel is paused or its agent is offline")}
    methods = ("get", "post", "put", "patch", "delete", "options")
    servers = [{"url": root, "description": "share links are served at the gateway's root"}]
    return {
        "/s/{shareToken}": {
            "servers": servers, "parameters": [token],
            **{m: {"summary": "Share link without the trailing slash: redirected to /s/{shareToken}/",
                   "security": [], "responses": {
                       "308": {"description": "Redirect to the same URL with a trailing slash (query kept)",
                               "headers": {"Location": {"schema": {"type": "string"}}}},
                       **{k: v for k, v in errors.items() if k in ("404", "410")}}}
               for m in methods}},
        "/s/{shareToken}/{path}": {
            "servers": servers, "parameters": [token, rest],
            **{m: {"summary": "A share link: the request is checked (expiry, allowed methods, rate limit) "
                              "and proxied to the shared http tunnel's target, streaming both ways "
                              "(WebSocket upgrades included)",
                   "security": [], "responses": {**errors,
                                                 "default": {"description": "The tunnel target's own response"}}}
               for m in methods}},
    }


def add_tunnels_api(document: dict[str, Any]) -> dict[str, Any]:
    """Add the Tunnels API's paths and schemas to an OpenAPI document; returns it."""
    servers = document.get("servers") or [{"url": ""}]
    root = servers[0]["url"].removesuffix("/api/v1")
    document.setdefault("paths", {}).update({**_paths(), **_share_paths(root)})
    document.setdefault("components", {}).setdefault("schemas", {}).update(SCHEMAS)
    return document
