"""Prometheus metrics in the app's own registry (two apps in one process never collide).

Request latencies are observed by the routes; batch sizes by an engine step listener; gauges
(queue depth, resident/fused adapters, prefix-cache counts, `vllm:lora_requests_info`) are refreshed from
`engine.stats()` at each scrape. The `vllm:*` names and labels match vLLM's, so routers built for
vLLM (e.g. the Gateway API Inference Extension's LoRA affinity) read them unchanged.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from s2ft_serve.engine.request import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (1, 8, 32, 128, 512, 2048, 8192)
OP_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)
BASE_LABEL = ""  # the `adapter` label of base-model requests
UNKNOWN_ADAPTER_LABEL = "<unknown>"  # requests for unknown names, or refused before their adapter was read
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")  # the routes s2ft_requests_total counts


class EngineCountsCollector(Collector):
    """The engine's prefix-cache, speculative-decoding and auto-fuse totals as of the last `refresh` (the
    engine keeps the counts)."""

    def __init__(self) -> None:
        self.stats: EngineStats | None = None

    def collect(self):
        s = self.stats
        yield CounterMetricFamily("s2ft_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                  value=s.prefix_cache_hit_tokens if s else 0)
        yield CounterMetricFamily("s2ft_prefix_cache_query_tokens",
                                  "Prompt tokens of the requests that looked in the prefix cache",
                                  value=s.prefix_cache_query_tokens if s else 0)
        yield GaugeMetricFamily("s2ft_prefix_cache_bytes", "Bytes held by cached prompt prefixes",
                                value=s.prefix_cache_bytes if s else 0)
        yield CounterMetricFamily("s2ft_spec_decode_draft_tokens", "Draft tokens proposed by prompt lookup",
                                  value=s.spec_draft_tokens if s else 0)
        yield CounterMetricFamily("s2ft_spec_decode_accepted_tokens",
                                  "Draft tokens accepted (the token the model itself chose)",
                                  value=s.spec_accepted_tokens if s else 0)
        yield CounterMetricFamily("s2ft_auto_fuse_decisions", "Fuse/unfuse decisions taken by --auto-fuse",
                                  value=s.auto_fuse_decisions if s else 0)


class Metrics:
    """Every metric the server exports; one instance per app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes etc., for memory-flat checks
        self.requests = Counter("s2ft_requests", "Finished HTTP generation requests", ["adapter", "status"], registry=r)
        self.ttft = Histogram("s2ft_time_to_first_token_seconds", "Time to first token", ["adapter"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("s2ft_time_per_output_token_seconds", "Time per output token after the first",
                              ["adapter"], buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("s2ft_e2e_request_latency_seconds", "End-to-end request latency", ["adapter"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("s2ft_prompt_tokens", "Prompt tokens processed", ["adapter"], registry=r)
        self.generation_tokens = Counter("s2ft_generation_tokens", "Tokens generated", ["adapter"], registry=r)
        self.batch_size = Histogram("s2ft_batch_size", "Requests per engine step", buckets=BATCH_BUCKETS, registry=r)
        self.batch_tokens = Histogram("s2ft_batch_tokens", "Tokens per engine step", buckets=TOKEN_BUCKETS, registry=r)
        self.queue_depth = Gauge("s2ft_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("s2ft_running_requests", "Requests in the running batch", registry=r)
        self.resident_adapters = Gauge("s2ft_resident_adapters", "Adapters with weights in memory", registry=r)
        self.resident_bytes = Gauge("s2ft_resident_adapter_bytes", "Bytes of resident adapter weights", registry=r)
        self.fused_adapters = Gauge("s2ft_fused_adapters", "Adapters fused into the base weights", registry=r)
        self.adapter_load = Histogram("s2ft_adapter_load_seconds", "Adapter load latency (admin and preload)",
                                      buckets=OP_BUCKETS, registry=r)
        self.adapter_fuse = Histogram("s2ft_adapter_fuse_seconds", "Adapter fuse/unfuse latency", ["op"],
                                      buckets=OP_BUCKETS, registry=r)
        self.engine_counts = EngineCountsCollector()  # counters kept by the engine, exported as they are
        r.register(self.engine_counts)
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting (vLLM name)", registry=r)
        self.vllm_running = Gauge("vllm:num_requests_running", "Requests running (vLLM name)", registry=r)
        self.lora_info = Gauge("vllm:lora_requests_info", "Running and waiting adapters (vLLM name and labels)",
                               ["running_lora_adapters", "waiting_lora_adapters", "max_lora"], registry=r)
        self.cuda_graphs = Gauge("s2ft_cuda_graphs", "CUDA graphs captured for decode steps, labelled with their "
                                 "state: on, failed (a capture failed: steps run eagerly since), off (no GPU, or "
                                 "--no-cuda-graphs)", ["state"], registry=r)
        self.engine_info = Gauge("s2ft_engine_info", "The serving engine's set-up (1, labelled); mixed_kernel "
                                 "'embedding_bag' on CPU float32 means the compiled kernel could not be built",
                                 ["model", "device", "dtype", "gemm", "mixed_kernel"], registry=r)

    def set_engine(self, engine) -> None:
        """Label `s2ft_engine_info` with the engine's set-up, once it is built."""
        self.engine_info.clear()
        self.engine_info.labels(model=engine.model_name, device=str(engine.device),
                                dtype=str(engine.dtype).removeprefix("torch."), gemm=engine.config.gemm,
                                mixed_kernel=engine.mixed_kernel).set(1)

    def on_step(self, batch_size: int, num_tokens: int) -> None:
        """The engine's step listener (called from the engine thread)."""
        self.batch_size.observe(batch_size)
        self.batch_tokens.observe(num_tokens)

    def observe_request(self, adapter: str | None, status: int | str) -> None:
        self.requests.labels(adapter=adapter or BASE_LABEL, status=str(status)).inc()

    def observe_generation(self, adapter: str | None, prompt_tokens: int, output_tokens: int,
                           ttft_s: float | None, e2e_s: float, per_token_s: list[float] = ()) -> None:
        """One HTTP generation request: its prompts and generated tokens, its time to the first token
        of any choice, its latency, and each finished choice's time per output token."""
        label = adapter or BASE_LABEL
        self.prompt_tokens.labels(adapter=label).inc(prompt_tokens)
        self.generation_tokens.labels(adapter=label).inc(output_tokens)
        self.e2e.labels(adapter=label).observe(e2e_s)
        if ttft_s is not None:
            self.ttft.labels(adapter=label).observe(ttft_s)
        for seconds in per_token_s:
            self.tpot.labels(adapter=label).observe(seconds)

    def refresh(self, stats: EngineStats) -> None:
        self.queue_depth.set(stats.waiting)
        self.running.set(stats.running)
        self.vllm_waiting.set(stats.waiting)
        self.vllm_running.set(stats.running)
        self.resident_adapters.set(stats.resident_adapters)
        self.resident_bytes.set(stats.resident_bytes)
        self.fused_adapters.set(len(stats.fused_adapters))
        self.engine_counts.stats = stats
        self.cuda_graphs.clear()
        self.cuda_graphs.labels(state=stats.cuda_graphs).set(stats.cuda_graphs_captured)
        self.lora_info.clear()
        self.lora_info.labels(
            running_lora_adapters=",".join(sorted(set(stats.running_adapters))),
            waiting_lora_adapters=",".join(sorted(set(stats.waiting_adapters))),
            max_lora=str(stats.max_resident_adapters),
        ).set(time.time())

    def render(self) -> bytes:
        return generate_latest(self.registry)
