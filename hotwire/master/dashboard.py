"""The master's read-only web dashboard (``streamctl master --dashboard HOST:PORT``).

A small HTTP/1.1 server on the master's own event loop (asyncio streams: no
thread, so every read of the master's state happens on the loop, between two of
its steps). One JSON endpoint per view, each fed by the functions ``streamctl``
uses through the gRPC API (:meth:`Master.app_status`, :meth:`Master.history`,
:meth:`Master.workers`, :meth:`Master.version_models` with
:func:`hotwire.master.diff.diff`), and a Server-Sent Events stream (``/events``)
that pushes the whole picture once a second and at each phase of a transition:

- ``GET /`` the page; ``/static/app.js`` and ``/static/style.css`` its assets,
  shipped in ``hotwire/master/dashboard_static`` (no CDN, no internet);
- ``GET /api/apps``: every app, its version and state;
- ``GET /api/apps/NAME``: its PEs with rates and instances per worker, its graph
  laid out in layers (sources left, sinks right) with the last upgrade's change
  set drawn on it, its version history, its last transition phase by phase, and
  the last dry run's preview (``streamctl upgrade app.py --dry-run``);
- ``GET /api/apps/NAME/diff?from=A&to=B``: the change set between two stored
  versions, on the graph; ``GET /api/apps/NAME/history``; ``GET /api/apps/NAME/preview``;
- ``GET /api/workers``: workers, liveness, slots and instances;
- ``GET /events``: ``event: state`` with ``{"apps", "workers", "details"}``.

Security follows the master's: with TLS (DATA_DIR/tls) it serves HTTPS with the
master's certificate and every request needs an unrevoked token of role viewer
or admin, as ``Authorization: Bearer TOKEN``, or ``?token=TOKEN`` once (the
answer sets an HttpOnly cookie and, for the page, redirects to the URL without
it). A malformed or refused request gets a 4xx answer and a line of text; the
master's loop never sees an exception from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import grpc
import networkx as nx

from hotwire.master.access import Denied
from hotwire.master.diff import ChangeSet, diff, relabel, split_stream_name
from hotwire.master.engine import Refused
from hotwire.model import LogicalModel

log = logging.getLogger(__name__)

STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
COOKIE = "hotwire_dashboard"
MAX_HEAD = 16 * 1024  # request line and headers
READ_TIMEOUT_S = 10.0
MAX_STREAMS = 32  # concurrent /events clients
TICK_S = 1.0  # an /events client gets the picture at least this often
REASONS = {
    200: "OK",
    303: "See Other",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_HTTP_OF_GRPC = {
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
}
# Node statuses on the graph, the first that applies (a PE may be changed and rescaled).
STATUSES = ("added", "removed", "changed", "renamed", "rescaled")
NODE_W, NODE_H, GAP_X, GAP_Y, MARGIN = 160, 58, 70, 28, 24


def parse_address(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` (port 0: any free one) -> (host, port); ValueError if malformed."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        msg = f"--dashboard {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:8080 (port 0: any free)"
        raise ValueError(msg)
    return host.strip("[]"), int(port)


class HttpError(Exception):
    def __init__(self, status: int, text: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(text)
        self.status = status
        self.headers = headers


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    cookies: dict[str, str] = field(default_factory=dict)

    def arg(self, name: str) -> str:
        values = self.query.get(name)
        return values[-1] if values else ""


async def read_request(reader: asyncio.StreamReader) -> Request:
    """One request's head; :class:`HttpError` (4xx) if it is not a well-formed GET."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise HttpError(431, "the request's head is longer than 16 KiB") from None
    except asyncio.IncompleteReadError:
        raise ConnectionResetError("the client went before its request ended") from None
    try:
        text = head.decode("latin-1")
        line, *rest = text.split("\r\n")
        method, target, version = line.split(" ")
    except ValueError:
        raise HttpError(400, "malformed request line: expected 'GET /path HTTP/1.1'") from None
    if not version.startswith("HTTP/1."):
        raise HttpError(400, f"unsupported protocol {version[:20]!r}: HTTP/1.0 or 1.1")
    if method != "GET":
        raise HttpError(
            405, f"method {method[:20]!r}: the dashboard is read-only (GET)", (("Allow", "GET"),)
        )
    if not target.startswith("/"):
        raise HttpError(400, "the request target must be a path starting with '/'")
    if len(target) > 4096:
        raise HttpError(414, "the request target is longer than 4096 characters")
    headers: dict[str, str] = {}
    for h in rest:
        if not h:
            continue
        name, sep, value = h.partition(":")
        if not sep or not name.strip() or name != name.strip():
            raise HttpError(400, f"malformed header line {h[:40]!r}")
        headers[name.lower()] = value.strip()
    parts = urllib.parse.urlsplit(target)
    try:
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, errors="strict")
        path = urllib.parse.unquote(parts.path, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "the request target is not valid UTF-8 once decoded") from None
    cookies: dict[str, str] = {}
    for item in headers.get("cookie", "").split(";"):
        k, sep, v = item.strip().partition("=")
        if sep:
            cookies[k] = v
    return Request(method, path, query, headers, cookies)


def _response(
    status: int, body: bytes, ctype: str, headers: tuple[tuple[str, str], ...] = ()
) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
        f"Content-Type: {ctype}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
        "Connection: close",
        *(f"{k}: {v}" for k, v in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), default=str).encode()


def message_dict(msg: Any) -> dict[str, Any]:
    """A protobuf message as plain JSON values (int64 stays a number, unlike json_format)."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        value = getattr(msg, f.name)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            out[f.name] = {
                k: message_dict(v) if hasattr(v, "DESCRIPTOR") else v for k, v in value.items()
            }
        elif f.message_type is not None:
            if f.is_repeated:
                out[f.name] = [message_dict(v) for v in value]
            else:
                out[f.name] = message_dict(value)
        elif f.is_repeated:
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


# ---------------------------------------------------------------------------
# The graph: layers from the models' networkx graphs, the change set on it
# ---------------------------------------------------------------------------


def graph_view(models: list[LogicalModel], change: ChangeSet | None) -> dict[str, Any]:
    """Nodes and edges of ``models`` (the old one first: a PE or stream only it has
    is drawn as removed, under its new name if it was renamed), each with its status
    in ``change``, laid out in layers: sources left, sinks right, every PE one layer
    right of its furthest input."""
    g = nx.DiGraph()
    renames = change.renames if change is not None else {}
    for i, model in enumerate(models):
        if i == 0 and renames and len(models) > 1:
            model = relabel(model, renames)
        for spec in model.pes:
            g.add_node(spec.name, spec=spec)
        for st in model.streams:
            g.add_edge(st.src, st.dst, spec=st)
    layer = _layers(g)
    last = max(layer.values(), default=0)
    for n in g.nodes:
        if g.out_degree(n) == 0 and g.in_degree(n) > 0:
            layer[n] = last  # sinks on the right
    # A stream that spans several layers passes through a slot of its own in each
    # layer between (a "\0" name: no PE's), so that it runs beside the PEs there.
    h = nx.DiGraph()
    h.add_nodes_from(g.nodes)
    via: dict[tuple[str, str], list[str]] = {}
    for src, dst in g.edges:
        chain = [f"\0{src}->{dst}#{k}" for k in range(layer[src] + 1, layer[dst])]
        for k, d in enumerate(chain):
            layer[d] = layer[src] + 1 + k
        via[src, dst] = chain
        nx.add_path(h, [src, *chain, dst])
    columns: dict[int, list[str]] = {}
    for n in sorted(h.nodes, key=lambda n: (layer[n], n)):
        columns.setdefault(layer[n], []).append(n)
    _order(h, columns)
    tall = max((len(c) for c in columns.values()), default=1)
    height = MARGIN * 2 + tall * NODE_H + (tall - 1) * GAP_Y
    pos: dict[str, tuple[int, int]] = {}
    for col, names in columns.items():
        used = len(names) * NODE_H + (len(names) - 1) * GAP_Y
        top = (height - used) // 2
        for k, n in enumerate(names):
            pos[n] = (MARGIN + col * (NODE_W + GAP_X), top + k * (NODE_H + GAP_Y))
    sets: dict[str, set[str]] = {s: set() for s in STATUSES}
    streams: dict[str, set[str]] = {"added": set(), "removed": set(), "changed": set()}
    if change is not None:
        sets["added"] = set(change.pes_added)
        sets["removed"] = set(change.pes_removed)
        sets["changed"] = set(change.pes_changed)
        sets["renamed"] = set(renames.values())
        sets["rescaled"] = set(change.pes_rescaled)
        for key, stream_names in (
            ("added", change.streams_added),
            ("removed", change.streams_removed),
            ("changed", change.streams_changed),
        ):
            for name in stream_names:
                try:
                    streams[key].add("->".join(split_stream_name(name, *models)))
                except ValueError:
                    continue
    new_model = models[-1]
    nodes = []
    for n in g.nodes:
        spec = g.nodes[n]["spec"]
        tags = [s for s in STATUSES if n in sets[s]]
        before = next((o for o, new in renames.items() if new == n), "")
        nodes.append(
            {
                "name": n,
                "kind": spec.kind,
                "parallelism": spec.parallelism,
                "layer": layer[n],
                "x": pos[n][0],
                "y": pos[n][1],
                "status": tags[0] if tags else "same",
                "tags": tags,
                "renamed_from": before,
                "in_new": new_model.graph.has_node(n),
            }
        )
    edges = []
    for src, dst in g.edges:
        key = f"{src}->{dst}"
        status = next((s for s in ("added", "removed", "changed") if key in streams[s]), "same")
        if status == "same" and ("removed" in {_node_status(nodes, src), _node_status(nodes, dst)}):
            status = "removed"
        edges.append(
            {
                "src": src,
                "dst": dst,
                "partition": g.edges[src, dst]["spec"].partition,
                "status": status,
                # the left ends of the slots it passes through (its y: their middle)
                "via": [[pos[d][0], pos[d][1] + NODE_H // 2] for d in via[src, dst]],
            }
        )
    width = MARGIN * 2 + (last + 1) * NODE_W + last * GAP_X if g.nodes else 0
    return {
        "nodes": nodes,
        "edges": edges,
        "width": width,
        "height": height,
        "node_w": NODE_W,
        "node_h": NODE_H,
    }


def _node_status(nodes: list[dict[str, Any]], name: str) -> str:
    return next((str(n["status"]) for n in nodes if n["name"] == name), "")


def _layers(g: nx.DiGraph) -> dict[str, int]:
    """Longest path from a source, per node (a union of two versions may have a
    cycle: then the edges that close one are left out of the layering)."""
    dag = g
    if not nx.is_directed_acyclic_graph(g):
        dag = nx.DiGraph()
        dag.add_nodes_from(g.nodes)
        for u, v in g.edges:
            dag.add_edge(u, v)
            if not nx.is_directed_acyclic_graph(dag):
                dag.remove_edge(u, v)
    layer: dict[str, int] = {}
    for n in nx.topological_sort(dag):
        layer[n] = max((layer[p] + 1 for p in dag.predecessors(n)), default=0)
    return layer


def _order(g: nx.DiGraph, columns: dict[int, list[str]]) -> None:
    """Order each layer by the mean position of its inputs (then outputs), in place,
    so that streams cross less."""
    index: dict[str, float] = {}
    for col in sorted(columns):
        for k, n in enumerate(columns[col]):
            index[n] = k
    for neighbours in (g.predecessors, g.successors):
        cols = sorted(columns) if neighbours == g.predecessors else sorted(columns, reverse=True)
        for col in cols:
            names = columns[col]

            def bary(n: str, nb: Any = neighbours) -> float:
                near = [index[p] for p in nb(n) if p in index]
                return sum(near) / len(near) if near else index[n]

            names.sort(key=lambda n: (bary(n), n))
            for k, n in enumerate(names):
                index[n] = k


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------


class Dashboard:
    """Serves the dashboard of ``master`` (a :class:`hotwire.master.service.Master`)."""

    def __init__(self, master: Any):
        self.m = master
        self.address = ""
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._context: ssl.SSLContext | None = None
        self.tls = master.tls is not None
        self._conns: set[asyncio.Task[Any]] = set()
        self._streams = 0
        self._tick = asyncio.Event()
        self._snap: tuple[float, bytes] | None = None
        self._snap_lock = asyncio.Lock()
        self._diffs: OrderedDict[tuple[str, int, int], dict[str, Any]] = OrderedDict()
        self._history: dict[str, tuple[Any, list[dict[str, Any]]]] = {}
        self._previews: dict[str, tuple[float, dict[str, Any]]] = {}

    async def start(self, addr: str) -> str:
        host, port = parse_address(addr)
        context = None
        if self.m.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(str(self.m.tls.cert), str(self.m.tls.key))
        self._context = context
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(sockaddr)
                sock.listen(64)
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
        except OSError as e:
            msg = f"--dashboard {addr}: cannot listen: {e.strerror or e}"
            raise OSError(msg) from e
        self._sock = sock
        self.address = f"{host}:{sock.getsockname()[1]}"
        self._accepting = asyncio.get_running_loop().create_task(self._accept(sock))
        self.m.engine.on_progress = self._wake
        scheme = "https" if context is not None else "http"
        log.info("master: dashboard at %s://%s/", scheme, self.address)
        return self.address

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as e:  # out of descriptors, say: the next one may do
                log.warning("dashboard: accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._connection(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _connection(self, conn: socket.socket) -> None:
        """Streams over ``conn``; with TLS, a client that does not start with a TLS
        handshake (plain HTTP) is answered in plain text that the page is HTTPS only."""
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        try:
            context = self._context
            if context is not None:
                first = await asyncio.wait_for(_peek(conn), READ_TIMEOUT_S)
                if not first:
                    conn.close()
                    return
                if first != b"\x16":  # not a TLS handshake record
                    context = None
            reader = asyncio.StreamReader(limit=MAX_HEAD)
            protocol = asyncio.StreamReaderProtocol(reader)
            transport, _ = await asyncio.wait_for(
                loop.connect_accepted_socket(lambda: protocol, conn, ssl=context),
                READ_TIMEOUT_S,
            )
        except (OSError, TimeoutError, ssl.SSLError):
            conn.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        if self._context is not None and context is None:
            await self._serve(reader, writer, plain_on_tls=True)
        else:
            await self._serve(reader, writer)

    def _wake(self, app: str = "") -> None:
        """Something changed (a transition's phase): push the picture to every stream now."""
        tick, self._tick = self._tick, asyncio.Event()
        self._snap = None
        tick.set()

    # -- one connection: one request -----------------------------------------
    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, plain_on_tls: bool = False
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            try:
                req = await asyncio.wait_for(read_request(reader), READ_TIMEOUT_S)
                if plain_on_tls:
                    raise HttpError(
                        400, f"this dashboard serves HTTPS only: https://{self.address}/"
                    )
                await self._handle(req, writer)
            except HttpError as e:
                body = (str(e) + "\n").encode()
                writer.write(_response(e.status, body, "text/plain; charset=utf-8", e.headers))
                await writer.drain()
        except (TimeoutError, ConnectionError, ssl.SSLError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("dashboard: a request failed")
            with contextlib.suppress(Exception):
                writer.write(_response(500, b"internal error\n", "text/plain; charset=utf-8"))
                await writer.drain()
        finally:
            if task is not None:
                self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)

    def _authorize(self, req: Request) -> tuple[tuple[str, str], ...]:
        """Raise 401/403 unless the request carries a usable token (when the master has
        tokens); the headers that keep a token given as ``?token=`` in a cookie."""
        access = self.m.access
        if access is None:
            return ()
        auth = req.headers.get("authorization", "")
        given = req.arg("token")
        token = given or req.cookies.get(COOKIE, "")
        if auth:
            scheme, _, value = auth.partition(" ")
            token = value.strip() if scheme.lower() == "bearer" else ""
            if not token:
                raise HttpError(401, "the Authorization header is not a bearer token", _CHALLENGE)
        if not token:
            raise HttpError(
                401,
                "no token: send 'Authorization: Bearer TOKEN' or open /?token=TOKEN once "
                "(a viewer or admin token: streamctl token create --role viewer)",
                _CHALLENGE,
            )
        try:
            t = access.authenticate([("authorization", f"Bearer {token}")])
        except Denied as e:
            raise HttpError(401, str(e), _CHALLENGE) from None
        if t.role not in ("viewer", "admin"):
            raise HttpError(403, f"token {t.id} has role {t.role!r}: viewer or admin needed")
        if not given:
            return ()
        flags = "; Secure" if self.tls else ""
        return (("Set-Cookie", f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict{flags}"),)

    async def _handle(self, req: Request, writer: asyncio.StreamWriter) -> None:
        cookie = self._authorize(req)
        if req.path in STATIC:
            if cookie and req.arg("token"):  # keep the token out of the address bar
                raise HttpError(303, "see /", (*cookie, ("Location", req.path)))
            name, ctype = STATIC[req.path]
            body = (resources.files("hotwire.master") / "dashboard_static" / name).read_bytes()
            writer.write(_response(200, body, ctype, cookie))
            await writer.drain()
            return
        if req.path == "/events":
            await self._events(req, writer, cookie)
            return
        try:
            value = await self._api(req)
        except Refused as e:
            status = _HTTP_OF_GRPC.get(e.code, 409)
            writer.write(_response(status, _json({"error": str(e)}), "application/json", cookie))
            await writer.drain()
            return
        writer.write(_response(200, _json(value), "application/json", cookie))
        await writer.drain()

    async def _api(self, req: Request) -> Any:
        parts = req.path.split("/")
        if req.path == "/api/apps":
            return {"apps": self.apps()}
        if req.path == "/api/workers":
            return {"workers": self.workers()}
        if len(parts) in (4, 5) and parts[:3] == ["", "api", "apps"] and parts[3]:
            app = parts[3]
            what = parts[4] if len(parts) == 5 else ""
            if what == "":
                return await self.app(app)
            if what == "history":
                return {"app": app, "history": await self.history(app)}
            if what == "preview":
                self._app_state(app)
                preview = await self.preview(app)
                if preview is None:
                    raise Refused(
                        grpc.StatusCode.NOT_FOUND,
                        f"app {app!r} has no dry run since its version; run "
                        f"'streamctl upgrade app.py --dry-run'",
                    )
                return preview
            if what == "diff":
                v1, v2 = _version_arg(req, "from"), _version_arg(req, "to")
                return await self.diff(app, v1, v2)
        raise HttpError(
            404,
            f"no such page {req.path[:100]!r}: /, /events, /api/apps, /api/apps/NAME"
            "[/history|/diff?from=A&to=B|/preview], /api/workers",
        )

    # -- views (on the master's loop) ----------------------------------------
    def _app_state(self, app: str) -> Any:
        st = self.m.apps.get(app)
        if st is None:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"no app named {app!r}")
        return st

    def apps(self) -> list[dict[str, Any]]:
        out = []
        for a in self.m.app_status("").apps:
            out.append(
                {
                    "app": a.app,
                    "version": a.version,
                    "state": a.state,
                    "pes": len(a.pes),
                    "instances": sum(len(p.instances) for p in a.pes),
                    "recoveries": a.recoveries,
                }
            )
        return out

    def workers(self) -> list[dict[str, Any]]:
        return [message_dict(w) for w in self.m.workers().workers]

    async def history(self, app: str) -> list[dict[str, Any]]:
        st = self._app_state(app)
        key = (st.version, st.state, len(self.m.engine.canary_log))
        cached = self._history.get(app)
        if cached is not None and cached[0] == key:
            return cached[1]
        reply = await self.m.history(app)
        rows = []
        for v in reply.versions:
            row = message_dict(v)
            row["changes"] = json.loads(row.pop("changes_json") or "{}")
            rows.append(row)
        self._history[app] = (key, rows)
        return rows

    async def diff(self, app: str, v1: int, v2: int) -> dict[str, Any]:
        """The change set from stored version ``v1`` to ``v2`` on the union of their graphs."""
        key = (app, v1, v2)
        if key in self._diffs:
            self._diffs.move_to_end(key)
            return self._diffs[key]
        models = await self.m.version_models(app, v1, v2)
        change = diff(models[0], models[1])
        view = {
            "app": app,
            "from_version": v1,
            "to_version": v2,
            "changes": change.to_dict(),
            "change_lines": change.describe(),
            "graph": graph_view(models, change),
        }
        self._diffs[key] = view
        while len(self._diffs) > 64:
            self._diffs.popitem(last=False)
        return view

    async def preview(self, app: str) -> dict[str, Any] | None:
        """The last dry run of ``app`` if it was made against its running version."""
        st = self._app_state(app)
        p = self.m.previews.get(app)
        if p is None or p["from_version"] != st.version or st.state != "running":
            return None
        cached = self._previews.get(app)
        if cached is not None and cached[0] == p["created"]:
            return cached[1]
        new = LogicalModel.from_dict(p["model"])
        view = {
            **{k: v for k, v in p.items() if k != "model"},
            "graph": graph_view([st.model, new], ChangeSet.from_dict(p["changes"])),
        }
        self._previews[app] = (p["created"], view)
        return view

    async def app(self, app: str) -> dict[str, Any]:
        st = self._app_state(app)
        (a,) = self.m.app_status(app).apps
        pes: dict[str, Any] = {}
        for p in a.pes:
            per_worker: dict[str, int] = {}
            for i in p.instances:
                per_worker[i.worker] = per_worker.get(i.worker, 0) + 1
            pes[p.name] = {
                "kind": p.kind,
                "parallelism": p.parallelism,
                "gen": p.gen,
                "rate": round(sum(i.rate_in for i in p.instances), 1),
                "records_in": sum(i.records_in for i in p.instances),
                "records_out": sum(i.records_out for i in p.instances),
                "errors": sum(i.errors for i in p.instances),
                "failed": p.failed,
                "workers": per_worker,
                "canary_share": p.canary_share,
            }
        if st.version > 1:
            last = await self.diff(app, st.version - 1, st.version)
        else:
            last = {
                "app": app,
                "from_version": 0,
                "to_version": st.version,
                "changes": None,
                "change_lines": [],
                "graph": graph_view([st.model], None),
            }
        history = await self.history(app)
        progress = self.m.engine.progress.get(app)
        return {
            "app": app,
            "version": a.version,
            "state": a.state,
            "last_checkpoint": a.last_checkpoint,
            "recoveries": a.recoveries,
            "last_recovery": a.last_recovery,
            "canary": json.loads(a.canary_json) if a.canary_json else None,
            "pes": pes,
            "diff": last,
            "plan": (history[-1]["changes"].get("plan") if history else None),
            "history": history,
            "progress": progress.to_dict() if progress is not None else None,
            "preview": await self.preview(app),
        }

    async def snapshot(self) -> bytes:
        """The whole picture for /events, computed once for every stream (at most
        every 0.2 s)."""
        async with self._snap_lock:
            now = time.monotonic()
            if self._snap is not None and now - self._snap[0] < 0.2:
                return self._snap[1]
            apps = self.apps()
            details = {}
            for a in apps[:50]:
                with contextlib.suppress(Refused):
                    details[a["app"]] = await self.app(a["app"])
            data = _json(
                {"time": time.time(), "apps": apps, "workers": self.workers(), "details": details}
            )
            self._snap = (time.monotonic(), data)
            return data

    async def _events(
        self, req: Request, writer: asyncio.StreamWriter, cookie: tuple[tuple[str, str], ...]
    ) -> None:
        if self._streams >= MAX_STREAMS:
            raise HttpError(503, f"{MAX_STREAMS} event streams are open; try again later")
        self._streams += 1
        try:
            head = [
                "HTTP/1.1 200 OK",
                "Content-Type: text/event-stream",
                "Cache-Control: no-store",
                "X-Accel-Buffering: no",
                *(f"{k}: {v}" for k, v in cookie),
            ]
            writer.write(("\r\n".join(head) + "\r\n\r\nretry: 1000\n\n").encode("latin-1"))
            await writer.drain()
            last = b""
            while True:
                tick = self._tick
                self._authorize(req)  # a revoked token ends the stream
                data = await self.snapshot()
                if data != last:
                    writer.write(b"event: state\ndata: " + data + b"\n\n")
                    last = data
                else:
                    writer.write(b": idle\n\n")
                await asyncio.wait_for(writer.drain(), 10)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(tick.wait(), TICK_S)
        except HttpError:
            return  # the token went: the stream ends
        finally:
            self._streams -= 1


_CHALLENGE = (("WWW-Authenticate", 'Bearer realm="hotwire"'),)


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _peek(conn: socket.socket) -> bytes:
    """The first byte ``conn`` received, left in its buffer (b"": closed)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return conn.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            ready = loop.create_future()
            loop.add_reader(conn.fileno(), _set_once, ready)
            try:
                await ready
            finally:
                loop.remove_reader(conn.fileno())


def _version_arg(req: Request, name: str) -> int:
    value = req.arg(name)
    if not value.isdigit() or not 0 < int(value) < 2**31:
        raise HttpError(400, f"?{name}= must be a version number (1, 2, ...), not {value[:20]!r}")
    return int(value)
