"""`GET /v1/models`: the base model and every loaded adapter, each adapter's `parent` the base (vLLM's shape)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from s2ft_serve.engine.engine import Engine
from s2ft_serve.errors import AdapterNotFoundError
from s2ft_serve.server.deps import EngineDep, SettingsDep, require_api_key
from s2ft_serve.server.generation import base_names
from s2ft_serve.server.protocol import ErrorResponse, ModelCard, ModelList

router = APIRouter(tags=["OpenAI"], dependencies=[Depends(require_api_key)])


def model_cards(engine: Engine, created: int) -> list[ModelCard]:
    base = ModelCard(id=engine.model_name, created=created, root=engine.config.model or engine.model_name,
                     max_model_len=engine.max_model_len)
    adapters = [ModelCard(id=info.name, created=created, root=info.path, parent=engine.model_name,
                          max_model_len=engine.max_model_len) for info in engine.list_adapters()]
    return [base, *adapters]


@router.get("/v1/models", response_model=ModelList, summary="List the base model and the loaded adapters")
def list_models(request: Request, engine: EngineDep) -> ModelList:
    return ModelList(data=model_cards(engine, request.app.state.created))


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}},
            summary="Describe one model (the base, or an adapter)")
def get_model(model: str, request: Request, engine: EngineDep, settings: SettingsDep) -> ModelCard:
    # `:path`: a base model served from a folder is named by its path, slashes and all (QA: retrieve()
    # of the id /v1/models lists was a 404)
    cards = model_cards(engine, request.app.state.created)
    if model in base_names(engine, settings):
        return cards[0]
    for card in cards[1:]:
        if card.id == model:
            return card
    raise AdapterNotFoundError(model)
