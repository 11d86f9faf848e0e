"""Dependencies every route takes: the engine, the settings, the metrics, and the two auth checks.

Engine access goes through `app.state`, never a module global, so the routers can be mounted in
another app (the Ray Serve deployment) that puts its own engine there.
"""

from __future__ import annotations

import hmac
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request

from s2ft_serve.engine.engine import Engine
from s2ft_serve.errors import AuthenticationError, EngineNotReadyError, PermissionDeniedError
from s2ft_serve.server.metrics import Metrics
from s2ft_serve.server.settings import ServerSettings, is_loopback_host


def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise EngineNotReadyError("the model is still loading; retry shortly", code="not_ready")
    return engine


def _bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(token: str | None, key: str | None) -> bool:
    """`token` as the header's bytes (Starlette decodes headers as Latin-1) against the key's UTF-8 bytes:
    a key such as "clé" matches what a UTF-8 client sends (QA: only Latin-1 bytes matched)."""
    return token is not None and key is not None and hmac.compare_digest(token.encode("latin-1"), key.encode())


def require_api_key(request: Request, settings: Annotated[ServerSettings, Depends(get_settings)]) -> None:
    """With an API key set, every /v1 route needs `Authorization: Bearer <key>` (the admin key works too)."""
    if settings.api_key is None:
        return
    token = _bearer_token(request)
    if not (_matches(token, settings.api_key) or _matches(token, settings.admin_key)):
        raise AuthenticationError("missing or invalid API key (send 'Authorization: Bearer <key>')",
                                  code="invalid_api_key")


def _hostname(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:  # `[` and other spellings no client sends: a foreign host
        return None


def _refuse_browsers(request: Request, settings: ServerSettings) -> None:
    """Keyless admin routes on loopback answer programs on this machine, not web pages its browser shows:
    a request through another host name (DNS rebinding) or sent from another site's page (its `Origin`)
    is refused (QA: a page could fuse, unfuse and reset the cache with a plain form, and after rebinding
    load adapters from any folder)."""
    host = request.headers.get("host")
    if host is not None:
        name = _hostname(f"//{host}")
        if not (is_loopback_host(name) or name == settings.host):
            raise PermissionDeniedError(f"admin routes without --admin-key answer loopback clients only, not a "
                                        f"request addressed to host {host!r}; set --admin-key", code="foreign_host")
    origin = request.headers.get("origin")
    if origin is not None and not is_loopback_host(_hostname(origin)):
        raise PermissionDeniedError(f"admin routes without --admin-key do not answer web pages (origin {origin!r}); "
                                    "set --admin-key", code="foreign_origin")


def require_admin(request: Request, settings: Annotated[ServerSettings, Depends(get_settings)]) -> None:
    """Admin routes need the admin key; with none set they are open on loopback only (403 elsewhere), to
    programs, not web pages (`_refuse_browsers`)."""
    token = _bearer_token(request)
    if settings.admin_key is None:
        if not settings.is_loopback:
            raise PermissionDeniedError(
                "admin routes are disabled: the server listens on a non-loopback address without --admin-key")
        _refuse_browsers(request, settings)
        require_api_key(request, settings)
        return
    if _matches(token, settings.admin_key):
        return
    if _matches(token, settings.api_key):
        raise PermissionDeniedError("this route needs the admin key", code="admin_key_required")
    raise AuthenticationError("missing or invalid admin key (send 'Authorization: Bearer <admin key>')",
                              code="invalid_api_key")


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
