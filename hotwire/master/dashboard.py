"""The master's read-only web dashboard (``streamctl master --dashboard HOST:PORT``).

A small HTTP/1.1 server on the master's own event loop
(:class:`hotwire.httpd.LoopServer`: no thread, so every read of the master's
state happens on the loop, between two of its steps). One JSON endpoint per
view, each fed by the functions ``streamctl`` uses through the gRPC API
(:meth:`Master.app_status`, :meth:`Master.history`, :meth:`Master.workers`,
:meth:`Master.version_models` with :func:`hotwire.master.diff.diff`), and a
Server-Sent Events stream (``/events``) that pushes the whole picture once a
second and at each phase of a transition:

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
import ssl
import time
from collections import OrderedDict
from importlib import resources
from typing import Any

import grpc
import networkx as nx

from hotwire.httpd import HttpError, LoopServer, Request, response
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
MAX_STREAMS = 32  # concurrent /events clients
TICK_S = 1.0  # an /events client gets the picture at least this often
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
        self.tls = master.tls is not None
        self.server: LoopServer | None = None
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
        self.server = LoopServer(
            self._handle,
            context=context,
            refused="the dashboard is read-only (GET)",
            https_only="this dashboard serves HTTPS only: https://{address}/",
            name="dashboard",
        )
        try:
            address = await self.server.start(host, port)
        except OSError as e:
            msg = f"--dashboard {addr}: cannot listen: {e.strerror or e}"
            raise OSError(msg) from e
        self.m.engine.on_progress = self._wake
        log.info("master: dashboard at %s://%s/", self.server.scheme, address)
        return address

    @property
    def address(self) -> str:
        return self.server.address if self.server is not None else ""

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    def _wake(self, app: str = "") -> None:
        """Something changed (a transition's phase): push the picture to every stream now."""
        tick, self._tick = self._tick, asyncio.Event()
        self._snap = None
        tick.set()

    # -- one request -------------------------------------------------------------
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
            writer.write(response(200, body, ctype, cookie))
            await writer.drain()
            return
        if req.path == "/events":
            await self._events(req, writer, cookie)
            return
        try:
            value = await self._api(req)
        except Refused as e:
            status = _HTTP_OF_GRPC.get(e.code, 409)
            writer.write(response(status, _json({"error": str(e)}), "application/json", cookie))
            await writer.drain()
            return
        writer.write(response(200, _json(value), "application/json", cookie))
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


def _version_arg(req: Request, name: str) -> int:
    value = req.arg(name)
    if not value.isdigit() or not 0 < int(value) < 2**31:
        raise HttpError(400, f"?{name}= must be a version number (1, 2, ...), not {value[:20]!r}")
    return int(value)
