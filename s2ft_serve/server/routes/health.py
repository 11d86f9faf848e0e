"""Operations: `GET /health` (the process answers), `GET /ready` (the model is loaded), `GET /metrics`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from s2ft_serve.errors import EngineNotReadyError
from s2ft_serve.server.deps import MetricsDep
from s2ft_serve.server.protocol import ErrorResponse, HealthResponse, ReadyResponse

router = APIRouter(tags=["Operations"])
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/health", response_model=HealthResponse, summary="Liveness: the process answers")
def health() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get("/ready", response_model=ReadyResponse, responses={503: {"model": ErrorResponse}},
            summary="Readiness: the model and the preloaded adapters are loaded")
def ready(request: Request) -> ReadyResponse:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        failure = getattr(request.app.state, "startup_error", None)
        raise EngineNotReadyError(f"startup failed: {failure}" if failure else "the model is still loading",
                                  code="not_ready")
    return ReadyResponse(status="ready", model=engine.model_name)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {PROMETHEUS_TYPE: {}}}})
def metrics(request: Request, registry: MetricsDep) -> Response:
    engine = getattr(request.app.state, "engine", None)
    if engine is not None:
        registry.refresh(engine.stats())
    return Response(registry.render(), media_type=PROMETHEUS_TYPE)
