"""The HTTP entry point: find each request's adapter and forward it to an engine replica.

Generation requests go to a replica chosen by Ray Serve's multiplexed routing with the adapter
as model id (a replica that already holds it when one exists; base-model requests go anywhere).
The ingress keeps no adapter state; replicas and the catalog do. A request whose replica dies
before answering is retried on another one, so a replica crash costs latency, not errors.
"""

# No `from __future__ import annotations`: Ray rebuilds these route signatures and needs real types.

import asyncio
import json
import logging
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from s2ft_serve.errors import S2FTError
from s2ft_serve.server.deps import require_admin
from s2ft_serve.server.errors import body_too_large, domain_error_response

from s2ft_ray.bridge import ForwardedRequest, ResponseStart, error_start
from s2ft_ray.options import split_args
from s2ft_ray.routing import Route, route

log = logging.getLogger(__name__)

REPLICA_GONE = (RayActorError, ActorDiedError, ActorUnavailableError)
RETRY_BACKOFF_S = 0.2
HOP_HEADERS = {b"content-length", b"transfer-encoding", b"connection"}
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


# The ingress's own docs are off: `/docs` and `/openapi.json` reach a replica's full s2ft-serve API.
api = FastAPI(title="s2ft-serve on Ray Serve", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment
@serve.ingress(api)
class FleetIngress:
    """Routes by adapter; retries on dead replicas; adds the fleet view at `GET /fleet`."""

    def __init__(self, args: dict, replicas, catalog) -> None:
        self.settings, self.fleet = split_args(args)
        self.replicas = replicas
        self.catalog = catalog
        self.base_names: set[str] | None = None

    @api.get("/health", summary="Liveness of the ingress")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/fleet", summary="Catalog records, and each replica's adapters and applied epoch (admin)")
    async def fleet_view(self, request: Request) -> Response:
        try:
            require_admin(request, self.settings)  # the server's own admin rule, keys and loopback alike
        except S2FTError as exc:
            return domain_error_response(exc)
        return JSONResponse(await self.catalog.view.remote())

    @api.api_route("/{path:path}", methods=METHODS, include_in_schema=False)
    async def forward(self, request: Request, path: str) -> Response:
        try:
            body = await self._body(request)
        except S2FTError as exc:
            return domain_error_response(exc)
        req = ForwardedRequest(
            method=request.method, path=request.url.path, query=request.url.query.encode(),
            headers=[(k.lower(), v) for k, v in request.headers.raw], body=body,
            client=(request.client.host, request.client.port) if request.client else None)
        target = route(req.method, req.path, body, await self._base_names())
        start, chunks = await self._open(req, target)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.headers if k.lower() not in HOP_HEADERS}
        if (start.header("content-type") or "").startswith("text/event-stream"):
            return StreamingResponse(chunks, status_code=start.status, headers=headers)
        content = b"".join([chunk async for chunk in chunks])  # one chunk: read whole in _open
        if req.method == "GET" and req.path == "/v1/models" and start.status == 200:
            content = await self._fleet_models(content)
        return Response(content, status_code=start.status, headers=headers)

    async def _body(self, request: Request) -> bytes:
        """The request body, refused (413) past the server's --max-request-bytes as it arrives, as the
        single server does (QA: the ingress read and parsed any size before a replica refused it)."""
        limit = self.settings.max_request_bytes
        declared = request.headers.get("content-length", "")
        if limit and declared.isdigit() and int(declared) > limit:
            raise body_too_large(limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if limit and len(body) > limit:
                raise body_too_large(limit)
        return bytes(body)

    async def _open(self, req: ForwardedRequest, target: Route) -> tuple[ResponseStart, AsyncIterator[bytes]]:
        """Send `req` to a replica, retrying while replicas die before answering in full.

        A plain response is read whole inside the retry; an event stream is handed on after its
        first message. Admin changes are never retried: they may have run.
        """
        handle = self.replicas.options(stream=True, multiplexed_model_id=target.adapter or "")
        attempts = 1 + (0 if target.admin is not None else self.fleet.request_retries)
        for attempt in range(attempts):
            stream = handle.forward.remote(req, target.admin, target.read)
            try:
                start = await stream.__anext__()
                if (start.header("content-type") or "").startswith("text/event-stream"):
                    return start, self._rest(stream)
                return start, _once(b"".join([chunk async for chunk in stream]))
            except REPLICA_GONE as exc:
                log.warning("replica gone before answering (%s); attempt %d of %d", type(exc).__name__,
                            attempt + 1, attempts)
                await asyncio.sleep(RETRY_BACKOFF_S * (attempt + 1))
            except StopAsyncIteration:
                break
            except BackPressureError:
                start, body = error_start(429, "every replica is at capacity; retry later", "rate_limit_error")
                start.headers.append((b"retry-after", b"1"))
                return start, _once(body)
            except Exception as exc:  # a replica-side failure outside the app: an OpenAI-style 500, not Ray's text
                log.exception("replica failed on %s %s", req.method, req.path)
                start, body = error_start(500, f"the replica failed: {type(exc).__name__}", "internal_error")
                return start, _once(body)
        start, body = error_start(503, "no replica could answer the request; retry shortly", "service_unavailable")
        return start, _once(body)

    @staticmethod
    async def _rest(stream) -> AsyncIterator[bytes]:
        try:
            async for chunk in stream:
                yield chunk
        except REPLICA_GONE:  # mid-stream: the status is sent; end the events like the server does
            yield b'data: {"error": {"message": "the replica serving this stream stopped", ' \
                  b'"type": "service_unavailable", "param": null, "code": null}}\n\ndata: [DONE]\n\n'
        finally:
            stream.cancel()

    async def _base_names(self) -> set[str]:
        if self.base_names is None:
            described = await self.replicas.describe.remote()
            self.base_names = set(described["base_names"])
        return self.base_names

    async def _fleet_models(self, content: bytes) -> bytes:
        """`/v1/models` lists every adapter loaded anywhere in the fleet, not just one replica's."""
        listing = json.loads(content)
        view = await self.catalog.view.remote()
        names = set(view["records"])
        for replica in view["replicas"].values():
            if replica["live"]:
                names.update(replica["held"])
        cards = listing.get("data", [])
        base = cards[0] if cards else {}
        present = {card.get("id") for card in cards}
        for name in sorted(names - present):
            cards.append({**base, "id": name, "root": view["records"].get(name, {}).get("path"),
                          "parent": base.get("id")})
        return json.dumps(listing).encode()
