"""`POST /tokenize` and `POST /detokenize` (vLLM's routes): what a prompt or a chat becomes in
tokens, and back. The tokenizer is the base model's, shared by every adapter."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import Field, model_validator

from s2ft_serve.server.deps import EngineDep, SettingsDep, require_api_key
from s2ft_serve.server.generation import base_names, chat_prompt
from s2ft_serve.server.protocol import (
    ChatMessage, ChatTemplateFields, ErrorResponse, RequestModel, ResponseModel, Tool,
)
from s2ft_serve.server.tools import template_tools

router = APIRouter(tags=["Tokens"], dependencies=[Depends(require_api_key)])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404)}


class TokenizeRequest(ChatTemplateFields):
    model: str | None = Field(None, description="the base model or an adapter (they share one tokenizer)")
    prompt: str | None = Field(None, description="text, tokenized as /v1/completions does")
    messages: list[ChatMessage] | None = Field(None, min_length=1,
                                               description="a chat, rendered as /v1/chat/completions does")
    tools: list[Tool] | None = Field(None, max_length=128, description="with messages: the tools, as chat "
                                     "completions passes them to the chat template")
    add_special_tokens: bool | None = Field(None, description="add the tokenizer's special tokens (e.g. BOS): by "
                                            "default yes for a prompt, no for messages (vLLM's defaults)")

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        if self.tools is not None and self.messages is None:
            raise ValueError("'tools' goes with 'messages'")
        return self


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(ResponseModel):
    prompt: str


def check_model(engine: EngineDep, settings: SettingsDep, model: str | None) -> None:
    """404 for a name that is neither the base nor a loaded or loadable adapter, as generation would."""
    if model is not None and model not in base_names(engine, settings):
        engine.check_known(model)


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS,
             summary="The token ids of a prompt or a chat")
def tokenize(body: TokenizeRequest, engine: EngineDep, settings: SettingsDep) -> TokenizeResponse:
    check_model(engine, settings, body.model)
    if body.messages is not None:
        tokens = chat_prompt(engine, body, body.messages, template_tools(body.tools))
    else:
        engine.check_text_fits(len(body.prompt))  # QA: a 10 MB prompt was tokenized (2 GB) to be answered
        tokens = engine.tokenize(body.prompt, add_special_tokens=body.add_special_tokens is not False)
    return TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS, summary="The text of token ids")
def detokenize(body: DetokenizeRequest, engine: EngineDep, settings: SettingsDep) -> DetokenizeResponse:
    check_model(engine, settings, body.model)
    engine.check_token_ids(body.tokens, "tokens")
    return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))
