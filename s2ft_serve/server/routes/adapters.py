"""Admin API: load, list, describe, unload, fuse, unfuse and merge adapters, plus vLLM's aliases
(`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`) with vLLM's bodies, and vLLM's
`/reset_prefix_cache`.

Handlers are plain functions, so FastAPI runs them in its thread pool: loading reads files and
fusing waits for a step boundary, and neither may block the event loop.
"""

from __future__ import annotations

import time
from typing import Callable

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from s2ft_serve.engine.engine import Engine
from s2ft_serve.engine.request import AdapterInfo
from s2ft_serve.errors import ConflictError
from s2ft_serve.server.deps import EngineDep, MetricsDep, SettingsDep, require_admin
from s2ft_serve.server.generation import base_names
from s2ft_serve.server.metrics import Metrics
from s2ft_serve.server.protocol import (
    AdapterCard, AdapterDeleted, AdapterList, ErrorResponse, LoadAdapterRequest, MergeRequest, VllmLoadLoraRequest,
    VllmUnloadLoraRequest,
)
from s2ft_serve.server.settings import ServerSettings

router = APIRouter(tags=["Adapters (admin)"], dependencies=[Depends(require_admin)])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 422, 503)}


def card(info: AdapterInfo) -> AdapterCard:
    return AdapterCard(id=info.name, path=info.path, nbytes=info.nbytes, parameters=info.parameters,
                       modules=info.modules, per_layer={str(k): v for k, v in info.per_layer.items()},
                       config=info.config, resident=info.resident, fused=info.fused,
                       requests_served=info.requests_served, base_model=info.base_model)


def check_name(engine: Engine, settings: ServerSettings, name: str) -> None:
    if name in base_names(engine, settings):
        raise ConflictError(f"'{name}' is the base model's name", param="name")


def load(engine: Engine, settings: ServerSettings, metrics: Metrics, name: str, path: str,
         replace: bool) -> AdapterInfo:
    check_name(engine, settings, name)
    started = time.perf_counter()
    info = engine.load_adapter(name, path, replace=replace)  # the engine confines paths to --adapter-root
    metrics.adapter_load.observe(time.perf_counter() - started)
    return info


@router.post("/v1/adapters", status_code=201, response_model=AdapterCard, responses=ERRORS,
             summary="Load an adapter folder under a name (`replace: true` swaps an existing one)")
def load_adapter(body: LoadAdapterRequest, engine: EngineDep, settings: SettingsDep,
                 metrics: MetricsDep) -> AdapterCard:
    return card(load(engine, settings, metrics, body.name, body.path, body.replace))


@router.get("/v1/adapters", response_model=AdapterList, responses=ERRORS, summary="List the loaded adapters")
def list_adapters(engine: EngineDep) -> AdapterList:
    return AdapterList(data=[card(info) for info in engine.list_adapters()])


@router.post("/v1/adapters/merge", status_code=201, response_model=AdapterCard, responses=ERRORS,
             summary="Merge adapters into a new one (weighted sum over the union of their columns)")
def merge_adapters(body: MergeRequest, engine: EngineDep, settings: SettingsDep) -> AdapterCard:
    check_name(engine, settings, body.name)
    return card(engine.merge(body.name, [(s.name, s.weight) for s in body.sources]))


@router.get("/v1/adapters/{name}", response_model=AdapterCard, responses=ERRORS, summary="Describe one adapter")
def get_adapter(name: str, engine: EngineDep) -> AdapterCard:
    return card(engine.get_adapter(name))


@router.delete("/v1/adapters/{name}", response_model=AdapterDeleted, responses=ERRORS,
               summary="Unload an adapter (requests in flight finish; new ones get 404)")
def delete_adapter(name: str, engine: EngineDep) -> AdapterDeleted:
    engine.remove_adapter(name)
    return AdapterDeleted(id=name)


def timed_fusion(op: str, fn: Callable[[str], AdapterInfo], name: str, metrics: Metrics) -> AdapterCard:
    started = time.perf_counter()
    info = fn(name)
    metrics.adapter_fuse.labels(op=op).observe(time.perf_counter() - started)
    return card(info)


@router.post("/v1/adapters/{name}/fuse", response_model=AdapterCard, responses=ERRORS,
             summary="Fuse an adapter into the base weights")
def fuse_adapter(name: str, engine: EngineDep, metrics: MetricsDep) -> AdapterCard:
    return timed_fusion("fuse", engine.fuse, name, metrics)


@router.post("/v1/adapters/{name}/unfuse", response_model=AdapterCard, responses=ERRORS,
             summary="Restore the base weights from a fused adapter")
def unfuse_adapter(name: str, engine: EngineDep, metrics: MetricsDep) -> AdapterCard:
    return timed_fusion("unfuse", engine.unfuse, name, metrics)


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=ERRORS,
             summary="vLLM alias of POST /v1/adapters")
def vllm_load(body: VllmLoadLoraRequest, engine: EngineDep, settings: SettingsDep, metrics: MetricsDep) -> str:
    load(engine, settings, metrics, body.lora_name, body.lora_path, body.load_inplace)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=ERRORS,
             summary="vLLM alias of DELETE /v1/adapters/{name}")
def vllm_unload(body: VllmUnloadLoraRequest, engine: EngineDep) -> str:
    engine.remove_adapter(body.lora_name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."


@router.post("/reset_prefix_cache", response_class=PlainTextResponse, responses=ERRORS,
             summary="Drop every cached prompt prefix (vLLM's route)")
def reset_prefix_cache(engine: EngineDep) -> str:
    engine.reset_prefix_cache()
    return "Success: prefix cache reset."
