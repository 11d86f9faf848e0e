"""Property-based fuzz of the OpenAPI schema (schemathesis): no request, valid or not, gets a 5xx.

Bounded: a few examples per operation and an engine with a short context, so it stays well
under a minute on a 2-core CPU.
"""

from __future__ import annotations

import itertools

import pytest
import schemathesis
from server_helpers import make_server_engine
from hypothesis import HealthCheck, given, settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable

from s2ft_serve.server.app import create_app

EXAMPLES_PER_OPERATION = 8


@pytest.fixture(scope="module")
def fuzz_engine(tiny_llama_dir, adapter_root, engine):  # `engine` puts adapters a0, a1 under the root
    e = make_server_engine(tiny_llama_dir, adapter_root, max_model_len=32, max_batch_size=4)
    e.load_adapter("a0", str(adapter_root / "a0"))
    yield e
    e.shutdown(timeout=5)


def test_no_operation_answers_5xx(settings, fuzz_engine):
    app = create_app(settings, fuzz_engine)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    failures, statuses = [], []
    for operation, mode in itertools.product(operations, schemathesis.GenerationMode):

        @given(case=operation.as_strategy(mode))
        @hypothesis_settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                             suppress_health_check=list(HealthCheck))
        def check(case):
            response = case.call()
            statuses.append(response.status_code)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} {case.body!r} -> "
                                f"{response.status_code} {response.text[:200]}")

        try:
            check()
        except Unsatisfiable:  # nothing to break: an operation without parameters has no negative cases
            assert mode is schemathesis.GenerationMode.NEGATIVE
    assert not failures, "\n".join(failures)
    assert len(statuses) >= 2 * len(operations)
    assert {200, 400} <= set(statuses)  # both valid and refused requests were sent
