"""Settings and CLI flags: every flag, the S2FT_* variables, NAME=PATH adapters, the engine config."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from s2ft_serve.server.cli import build_parser
from s2ft_serve.server.settings import ServerSettings


def test_environment_variables_fill_settings(monkeypatch):
    monkeypatch.setenv("S2FT_PORT", "9001")
    monkeypatch.setenv("S2FT_ADAPTER", "a=/x/a, b=/x/b")
    monkeypatch.setenv("S2FT_LAZY_LOAD", "false")
    monkeypatch.setenv("S2FT_API_KEY", "k")
    s = ServerSettings()
    assert s.port == 9001 and s.api_key == "k" and s.lazy_load is False
    assert s.adapter_specs() == {"a": "/x/a", "b": "/x/b"}


def test_an_empty_key_is_refused_and_a_key_read_from_a_file_loses_its_newline(monkeypatch):
    """QA: `S2FT_API_KEY=` (an .env file, an empty Secret) locked every /v1 route with 401 for good;
    a key with the newline of a Secret made from a file matched no bearer token."""
    for name in ("S2FT_API_KEY", "S2FT_ADMIN_KEY"):
        monkeypatch.setenv(name, " ")
        with pytest.raises(ValidationError, match=f"{name[5:].lower()} is empty; unset {name}"):
            ServerSettings()
        monkeypatch.delenv(name)
    monkeypatch.setenv("S2FT_API_KEY", "sk-user\n")
    assert ServerSettings().api_key == "sk-user"
    assert ServerSettings(admin_key=None).admin_key is None


def test_the_log_level_is_one_uvicorn_knows(monkeypatch):
    """QA: `--log-level verbose` (and uvicorn's own `trace`) crashed with a traceback, exit 1."""
    monkeypatch.setenv("S2FT_LOG_LEVEL", "WARNING")
    assert ServerSettings().log_level == "warning"
    assert ServerSettings(log_level="trace").log_level == "trace"
    with pytest.raises(ValidationError, match="log_level"):
        ServerSettings(log_level="verbose")


def test_flags_override_environment(monkeypatch):
    monkeypatch.setenv("S2FT_PORT", "9001")
    args = build_parser().parse_args(["--port", "9002", "--adapter", "a=/p", "--adapter", "b=/q",
                                      "--no-lazy-load", "--max-queue", "3", "--host", "0.0.0.0"])
    s = ServerSettings(**vars(args))
    assert s.port == 9002 and s.max_queue == 3 and s.lazy_load is False
    assert s.adapter_specs() == {"a": "/p", "b": "/q"}
    assert not s.is_loopback and s.url == "http://0.0.0.0:9002"


def test_relative_preload_paths_are_taken_from_the_working_folder_where_they_are(tmp_path, monkeypatch):
    """`--adapter-root ./adapters --adapter math=./adapters/math` (the README's example; QA: it became
    adapters/adapters/math and the server exited 1) and `--adapter code=code` (a folder under the root)
    both name the folder meant."""
    (tmp_path / "adapters" / "math").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    s = ServerSettings(adapter_root="./adapters", adapter=["math=./adapters/math", "code=code", "abs=/x/y"])
    assert s.adapter_specs() == {"math": str(tmp_path / "adapters" / "math"), "code": "code", "abs": "/x/y"}


def test_every_setting_is_a_flag():
    flags = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert flags == set(ServerSettings.model_fields)


def test_engine_config_carries_the_limits(tmp_path):
    s = ServerSettings(model="m", adapter_root=str(tmp_path), max_batch_size=4, max_queue=5,
                       max_resident_adapters=2, max_adapter_bytes=1000, device="cpu", dtype="bfloat16",
                       lazy_load=False, cuda_graphs=False)
    c = s.engine_config()
    assert c.cuda_graphs is False and ServerSettings().engine_config().cuda_graphs is True
    assert (c.model, c.max_batch_size, c.max_queue, c.max_resident_adapters, c.max_adapter_bytes) == \
        ("m", 4, 5, 2, 1000)
    assert (c.adapter_root, c.device, c.dtype, c.lazy_load) == (str(tmp_path), "cpu", "bfloat16", False)


@pytest.mark.parametrize("bad", [{"adapter": ["noequals"]}, {"dtype": "int8"}, {"port": 70000},
                                 {"enable_auto_tool_choice": True}, {"tool_call_parser": "mistral"}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValidationError):
        ServerSettings(**bad)


@pytest.mark.parametrize("adapters, error", [(["bad/name=a"], "must start with a letter or digit"),
                                             (["-x=a"], "must start with"), (["sp ace=a"], "must start with"),
                                             (["x=a", "x=b"], "'x' is given twice"), (["x=a", " x =b"], "given twice")])
def test_preloaded_adapter_names_follow_the_admin_routes_rule_once_each(adapters, error):
    """QA: a preloaded 'bad/name' served but no admin route could reach it; of two preloads named 'x'
    the last silently won."""
    with pytest.raises(ValidationError, match=error):
        ServerSettings(adapter=adapters)
    assert ServerSettings(adapter=["math=a", "m.2:v@1+x=b"]).adapter_specs() == {"math": "a", "m.2:v@1+x": "b"}


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("0.0.0.0", False), ("10.0.0.5", False), ("example.com", False)])
def test_loopback_detection(host, loopback):
    assert ServerSettings(host=host).is_loopback is loopback


def test_auto_fuse_settings_reach_the_engine():
    config = ServerSettings(auto_fuse=True, auto_fuse_share=0.7, auto_unfuse_share=0.2,
                            auto_fuse_window_s=5, auto_fuse_min_requests=3).engine_config()
    assert (config.auto_fuse, config.auto_fuse_share, config.auto_unfuse_share, config.auto_fuse_window_s,
            config.auto_fuse_min_requests) == (True, 0.7, 0.2, 5, 3)


def test_speculative_settings_reach_the_engine():
    config = ServerSettings(speculative_tokens=5, speculative_ngram_min=1, speculative_ngram_max=3,
                            speculative_max_batch=2).engine_config()
    assert (config.speculative_tokens, config.speculative_ngram_min, config.speculative_ngram_max,
            config.speculative_max_batch) == (5, 1, 3, 2)
    assert ServerSettings().engine_config().speculative_tokens == 0  # off unless asked


def test_vllms_auto_tool_choice_flags_are_accepted():
    s = ServerSettings(enable_auto_tool_choice=True, tool_call_parser="hermes")
    assert (s.enable_auto_tool_choice, s.tool_call_parser) == (True, "hermes")


def test_the_parser_flags_offer_exactly_the_parsers_there_are():
    import typing

    from s2ft_serve.server.tools import PARSERS

    allowed = typing.get_args(typing.get_args(ServerSettings.model_fields["tool_call_parser"].annotation)[0])
    assert set(allowed) == set(PARSERS)


def test_the_adapter_kernel_flag_reaches_the_engine_and_offers_the_engines_choices(monkeypatch):
    import typing

    from s2ft_serve.adapters.native import KERNELS

    assert set(typing.get_args(ServerSettings.model_fields["adapter_kernel"].annotation)) == set(KERNELS)
    assert ServerSettings().engine_config().adapter_kernel == "auto"
    args = build_parser().parse_args(["--adapter-kernel", "torch"])
    assert ServerSettings(**vars(args)).engine_config().adapter_kernel == "torch"
    monkeypatch.setenv("S2FT_ADAPTER_KERNEL", "native")
    assert ServerSettings().engine_config().adapter_kernel == "native"
    with pytest.raises(ValidationError):
        ServerSettings(adapter_kernel="fast")
