"""s2ft-loadtest: a load generator for OpenAI-compatible servers (s2ft-serve, vLLM).

Modules: `workload` (what to send), `client` (one timed request), `runner` (closed and open
loops), `stats` (percentiles, throughput, tables, JSON), `admin` (model list and admin API),
`sweep` (throughput against the adapter count), `chaos` (adapter churn under traffic, checked),
`adapters` (random adapters for a base model), `cli` (the `s2ft-loadtest` command).
"""
