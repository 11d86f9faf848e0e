"""`s2ft-serve`: parse flags into `ServerSettings`, log what is served, run uvicorn.

Every settings field is a flag (`max_queue` -> `--max-queue`) and an environment variable
(`S2FT_MAX_QUEUE`); a flag wins over the variable. SIGTERM (or Ctrl-C) stops accepting
connections, lets in-flight requests finish within `--drain-timeout-s`, and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import typing
from types import FrameType

import uvicorn
from uvicorn.config import TRACE_LOG_LEVEL
from pydantic import ValidationError

from s2ft_serve.server.app import begin_drain, create_app
from s2ft_serve.server.settings import ServerSettings

log = logging.getLogger("s2ft_serve.server")

FLAG_HELP = {
    "adapter": "NAME=PATH, repeatable: adapters loaded at start",
    "lazy_load": "load an adapter named in a request from --adapter-root on demand",
}


def build_parser() -> argparse.ArgumentParser:
    """One flag per `ServerSettings` field; flags left out fall back to S2FT_* variables, then defaults."""
    parser = argparse.ArgumentParser(prog="s2ft-serve", description="Serve S²FT adapters over an OpenAI API.",
                                     argument_default=argparse.SUPPRESS)
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"S2FT_{name.upper()}"
        default = "" if field.default_factory is not None else f", default {field.default}"
        help_text = f"{FLAG_HELP.get(name) or field.description or name.replace('_', ' ')} (env {env}{default})"
        kind = _base_type(field.annotation)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif kind is list:
            parser.add_argument(flag, action="append", metavar="NAME=PATH", help=help_text)
        else:
            parser.add_argument(flag, type=kind, help=help_text)
    return parser


def _base_type(annotation: object) -> type:
    """`int | None` -> int, `Annotated[list[str], ...]` -> list."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _base_type(typing.get_args(annotation)[0])
    if origin is list:
        return list
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args:
        return _base_type(args[0])
    return annotation if isinstance(annotation, type) else str


DRAIN_MARGIN_S = 3  # uvicorn waits this much longer than the drain, for the requests ended at its deadline


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but a handled SIGTERM/SIGINT ends the process with status 0 (not re-raised),
    and requests still running at the drain deadline end with an error instead of a cut connection."""

    def __init__(self, config: uvicorn.Config, on_drain: typing.Callable[[], None] = lambda: None) -> None:
        super().__init__(config)
        self.on_drain = on_drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
            return
        if not self.should_exit:
            log.info("%s received: refusing new connections, draining in-flight requests",
                     signal.Signals(sig).name)
            self.on_drain()
        self.should_exit = True


def announce(settings: ServerSettings) -> None:
    model = settings.model or "SmolLM2-135M-Instruct (embedded default)"
    adapters = ", ".join(f"{n}={p}" for n, p in settings.adapter_specs().items()) or "none"
    log.info("s2ft-serve: model %s, device %s, dtype %s, adapters %s, adapter root %s, listening on %s",
             model, settings.device, settings.dtype, adapters, settings.adapter_root or "(any path)", settings.url)
    if not settings.is_loopback and settings.admin_key is None:
        log.warning("listening on non-loopback %s without --admin-key: admin routes answer 403", settings.host)
    if not settings.is_loopback and settings.api_key is None:
        log.warning("listening on non-loopback %s without --api-key: anyone who reaches it may generate",
                    settings.host)


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        settings = ServerSettings(**args)
    except ValidationError as exc:
        print(f"s2ft-serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    level = TRACE_LOG_LEVEL if settings.log_level == "trace" else settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    announce(settings)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=settings.access_log,
                            timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s) + DRAIN_MARGIN_S,
                            lifespan="on")
    server = DrainingServer(config, on_drain=lambda: begin_drain(app))
    app.state.on_fatal = lambda: setattr(server, "should_exit", True)
    server.run()
    return 1 if app.state.startup_error else 0


if __name__ == "__main__":
    sys.exit(main())
