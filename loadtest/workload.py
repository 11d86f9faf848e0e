"""What traffic to send: adapter popularity, prompt and output lengths, arrivals, and stop condition.

Everything here is pure and seeded (no I/O, no clock): a `WorkloadSpec` plus a seed yields the
same sequence of `RequestSpec`s every time, so two runs (or a sweep's points) send the same load.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Iterator

from loadtest.errors import LoadtestConfigError

# Common short English words: each is one token in most BPE vocabularies, so a prompt of n words
# is close to n tokens on any server without the loadtest needing the model's tokenizer.
_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which she "
    "do how their if will up other about out many then them these so some her would make like "
    "him into time has look two more write go see number no way could people my than first water"
).split()


@dataclass(frozen=True)
class Popularity:
    """How requests spread over N adapters: `uniform`, `zipf:<alpha>` or `single`."""

    kind: str  # uniform | zipf | single
    alpha: float = 0.0  # zipf exponent (weight of rank r is 1 / r**alpha)

    @classmethod
    def parse(cls, text: str) -> "Popularity":
        text = text.strip().lower()
        if text in ("uniform", "single"):
            return cls(text)
        if text.startswith("zipf"):
            _, _, raw = text.partition(":")
            try:
                alpha = float(raw) if raw else 1.0
            except ValueError:
                raise LoadtestConfigError(f"popularity {text!r}: zipf alpha must be a number, e.g. zipf:1.1") from None
            if not alpha > 0 or math.isinf(alpha):
                raise LoadtestConfigError(f"popularity {text!r}: zipf alpha must be a positive number")
            return cls("zipf", alpha)
        raise LoadtestConfigError(f"popularity {text!r}: choose uniform, zipf:<alpha> or single")

    def weights(self, n: int) -> list[float]:
        """Unnormalised weight of each of `n` adapters, most popular first."""
        if n < 1:
            raise LoadtestConfigError("popularity needs at least one adapter")
        if self.kind == "single":
            return [1.0] + [0.0] * (n - 1)
        if self.kind == "zipf":
            return [1.0 / (rank ** self.alpha) for rank in range(1, n + 1)]
        return [1.0] * n


class AdapterSampler:
    """Draws adapter names by popularity; `None` in `names` stands for the base model."""

    def __init__(self, names: list[str | None], popularity: Popularity):
        self.names = list(names)
        self._cumulative = list(itertools.accumulate(popularity.weights(len(self.names))))

    def sample(self, rng: random.Random) -> str | None:
        x = rng.random() * self._cumulative[-1]
        return self.names[bisect.bisect_right(self._cumulative, x)]


@dataclass(frozen=True)
class LengthDist:
    """A token-count distribution: `N`, `uniform:LO:HI` or `normal:MEAN:STD` (clipped to >= min)."""

    kind: str  # const | uniform | normal
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "LengthDist":
        kind, _, rest = text.strip().lower().partition(":")
        try:
            if not rest:
                return cls._checked("const", float(int(kind)), 0.0, text)
            lo, _, hi = rest.partition(":")
            if kind in ("uniform", "normal") and hi:
                return cls._checked(kind, float(lo), float(hi), text)
        except ValueError:
            pass
        raise LoadtestConfigError(f"length {text!r}: use N, uniform:LO:HI or normal:MEAN:STD")

    @classmethod
    def _checked(cls, kind: str, a: float, b: float, text: str) -> "LengthDist":
        if a < 0 or b < 0 or (kind == "uniform" and b < a) or not all(map(math.isfinite, (a, b))):
            raise LoadtestConfigError(f"length {text!r}: bounds must be finite, non-negative and ordered")
        return cls(kind, a, b)

    def sample(self, rng: random.Random, minimum: int = 0) -> int:
        if self.kind == "const":
            value = self.a
        elif self.kind == "uniform":
            value = rng.randint(int(self.a), int(self.b))
        else:
            value = rng.gauss(self.a, self.b)
        return max(minimum, int(round(value)))


@dataclass(frozen=True)
class RequestSpec:
    """One request to send; `index` orders results and pairs a request with its re-send."""

    index: int
    adapter: str | None  # None: the base model
    prompt: str
    max_tokens: int
    seed: int


@dataclass
class WorkloadSpec:
    """The whole load: who is asked what, how fast, and until when."""

    adapters: list[str | None] = field(default_factory=lambda: [None])
    popularity: Popularity = field(default_factory=lambda: Popularity("uniform"))
    prompt_len: LengthDist = field(default_factory=lambda: LengthDist("const", 32))
    output_len: LengthDist = field(default_factory=lambda: LengthDist("const", 32))
    num_requests: int | None = 100  # stop after this many requests (None: use duration_s)
    duration_s: float | None = None  # stop issuing new requests after this many seconds
    concurrency: int | None = 4  # closed loop: this many requests in flight (None: use rate)
    rate: float | None = None  # open loop: Poisson arrivals at this many requests per second
    shared_prefix: int = 0  # words every prompt starts with (a system prompt; exercises prefix caching)
    seed: int = 0

    def validate(self) -> None:
        if (self.num_requests is None) == (self.duration_s is None):
            raise LoadtestConfigError("give exactly one of a request count or a duration")
        if (self.concurrency is None) == (self.rate is None):
            raise LoadtestConfigError("give exactly one of a concurrency or an arrival rate")
        if self.num_requests is not None and self.num_requests < 1:
            raise LoadtestConfigError("the request count must be at least 1")
        if self.duration_s is not None and not self.duration_s > 0:
            raise LoadtestConfigError("the duration must be positive")
        if self.concurrency is not None and self.concurrency < 1:
            raise LoadtestConfigError("the concurrency must be at least 1")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise LoadtestConfigError("the arrival rate must be a positive number")
        if not self.adapters:
            raise LoadtestConfigError("the workload needs at least one adapter (or the base model)")
        if self.shared_prefix < 0:
            raise LoadtestConfigError("the shared prefix must be zero or more words")


def make_prompt(rng: random.Random, num_words: int) -> str:
    """A prompt of `num_words` common words (about as many tokens); never empty."""
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, num_words)))


def shared_prefix(spec: WorkloadSpec) -> str:
    """The words every prompt of `spec` starts with, followed by a space ("" when there are none).

    Drawn from its own generator, so adding a prefix leaves the rest of the sequence unchanged."""
    if not spec.shared_prefix:
        return ""
    return make_prompt(random.Random(spec.seed ^ 0x9E3779B9), spec.shared_prefix) + " "


def generate_requests(spec: WorkloadSpec) -> Iterator[RequestSpec]:
    """The request sequence for `spec` (endless when the run is bounded by duration)."""
    spec.validate()
    rng = random.Random(spec.seed)
    sampler = AdapterSampler(spec.adapters, spec.popularity)
    prefix = shared_prefix(spec)
    counter = range(spec.num_requests) if spec.num_requests is not None else itertools.count()
    for index in counter:
        adapter = sampler.sample(rng)
        prompt = prefix + make_prompt(rng, spec.prompt_len.sample(rng, minimum=1))
        max_tokens = spec.output_len.sample(rng, minimum=1)
        yield RequestSpec(index=index, adapter=adapter, prompt=prompt, max_tokens=max_tokens, seed=rng.randrange(2**31))


def poisson_gaps(rate: float, seed: int) -> Iterator[float]:
    """Exponential inter-arrival gaps (seconds) of a Poisson process at `rate` requests/s."""
    rng = random.Random(seed ^ 0x5EED)
    while True:
        yield rng.expovariate(rate)
