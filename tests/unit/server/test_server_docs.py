"""`/docs` and `/openapi.json`: every route listed, request bodies with examples."""

from __future__ import annotations

from s2ft_serve.server import protocol

ROUTES = {
    ("post", "/v1/completions"), ("post", "/v1/chat/completions"), ("get", "/v1/models"),
    ("get", "/v1/models/{model}"), ("post", "/v1/adapters"), ("get", "/v1/adapters"),
    ("get", "/v1/adapters/{name}"), ("delete", "/v1/adapters/{name}"), ("post", "/v1/adapters/{name}/fuse"),
    ("post", "/v1/adapters/{name}/unfuse"), ("post", "/v1/adapters/merge"), ("post", "/v1/load_lora_adapter"),
    ("post", "/v1/unload_lora_adapter"), ("get", "/health"), ("get", "/ready"), ("get", "/metrics"),
}


async def test_openapi_lists_every_route_with_body_examples(client):
    assert (await client.get("/docs")).status_code == 200
    spec = (await client.get("/openapi.json")).json()
    listed = {(method, path) for path, item in spec["paths"].items() for method in item}
    assert ROUTES <= listed
    schemas = spec["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest", "LoadAdapterRequest", "MergeRequest",
                 "VllmLoadLoraRequest", "VllmUnloadLoraRequest"):
        assert schemas[name]["examples"], name
        for example in schemas[name]["examples"]:
            getattr(protocol, name).model_validate(example)  # the examples are valid requests
