"""Workload model of the load generator: pure, seeded functions, no I/O.

Contract:
- `arrival_times(process, rate, rng, cv, duration)` yields increasing offsets in seconds
  (< duration): "poisson" has exponential gaps of mean 1/rate; "gamma" has gamma gaps of mean
  1/rate and coefficient of variation `cv` (shape 1/cv^2, scale cv^2/rate; cv=1 is Poisson,
  cv>1 bursty), as in S-LoRA's traces. "closed" has no arrival times (raises ValueError).
- `popularity_weights(n, kind, alpha)` gives the probability of each adapter rank (index 0 =
  rank 1): "zipf" p_i ~ (i+1)^-alpha (Punica's skewed workload); "powerlaw" is S-LoRA's
  `floor(n * numpy.random.power(alpha))`, p_i = ((i+1)/n)^alpha - (i/n)^alpha (alpha < 1
  favours index 0, alpha = 1 is uniform); "uniform" p_i = 1/n.
- `LengthDist.parse("fixed:N" | "uniform:LO:HI" | "lognormal:MEAN:SIGMA")` samples token counts
  >= 1: uniform is inclusive of both ends; lognormal has mean MEAN and log-space std SIGMA
  (mu = ln MEAN - SIGMA^2/2), rounded.
- `choose_adapters(available, n)`: the first n ids, cycled when n > len(available); [""] (the
  base model) when n == 0.
- `make_prompt(rng, n)` is n random common English words joined by spaces; each word is one
  token for GPT-2-style BPE vocabularies (SmolLM2, Llama-3, Qwen2), so the prompt token count
  is about n (plus the BOS token, if the model adds one; checked in the tests).
- `plan_requests(spec, ids, duration)` builds the whole open-loop schedule ahead of time;
  `request_stream(spec, ids)` yields closed-loop requests (at = 0) forever. Arrivals, adapter
  choices, lengths and each prompt come from separate RNG streams derived from spec.seed, so
  changing e.g. the rate does not change which adapters and lengths the requests get; a
  request's prompt text is built when it is sent (PlannedRequest.prompt).
"""

from __future__ import annotations

import math
import random
from bisect import bisect_left
from dataclasses import dataclass
from itertools import accumulate, count
from typing import Iterator

ARRIVALS = ("poisson", "gamma", "closed")
POPULARITY = ("zipf", "powerlaw", "uniform")

WORDS = ("the of and to in is for on that with as at by from it be this are was have not or an but all can "
         "one more new time some when will up out about if there so what which their use than other into "
         "people year good work first make way day just like over also back after only most long world "
         "know life man take state right place part great small high old water house city food book game "
         "light power music money story table river green black white blue red open free early each best "
         "home sea road tree sun moon star rain snow wind fire stone gold king town land group point case "
         "hand line name word fact team list plan field love room voice heart paper ship door").split()


def arrival_times(process: str, rate: float, rng: random.Random, cv: float = 1.0,
                  duration: float = math.inf) -> Iterator[float]:
    """Increasing arrival offsets (seconds) of a renewal process, stopping before `duration`."""
    if process not in ("poisson", "gamma"):
        raise ValueError(f"no arrival times for process {process!r} (open-loop: poisson or gamma)")
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if process == "gamma":
        if cv <= 0:
            raise ValueError(f"cv must be positive, got {cv}")
        shape, scale = 1.0 / (cv * cv), cv * cv / rate
        gap = lambda: rng.gammavariate(shape, scale)  # noqa: E731
    else:
        gap = lambda: rng.expovariate(rate)  # noqa: E731
    t = gap()
    while t < duration:
        yield t
        t += gap()


def popularity_weights(n: int, kind: str = "zipf", alpha: float = 1.0) -> list[float]:
    """Probabilities of adapter indices 0..n-1 (summing to 1)."""
    if n <= 0:
        raise ValueError(f"need at least one adapter, got {n}")
    if kind == "uniform":
        return [1.0 / n] * n
    if alpha <= 0:
        raise ValueError(f"alpha must be positive for {kind}, got {alpha}")
    if kind == "zipf":
        w = [(i + 1) ** -alpha for i in range(n)]
        total = sum(w)
        return [x / total for x in w]
    if kind == "powerlaw":
        return [((i + 1) / n) ** alpha - (i / n) ** alpha for i in range(n)]
    raise ValueError(f"popularity must be one of {POPULARITY}, got {kind!r}")


def choose_adapters(available: list[str], n: int) -> list[str]:
    """The first n of `available` (cycled when n exceeds it), in popularity-rank order; [""] when n == 0."""
    if n < 0:
        raise ValueError(f"adapters must be >= 0, got {n}")
    if n == 0:
        return [""]
    if not available:
        raise ValueError("no adapter ids to choose from")
    return [available[i % len(available)] for i in range(n)]


class AdapterSampler:
    """Draws adapter ids by popularity rank: ids[0] has rank 1. ids == [""] is the base model."""

    def __init__(self, ids: list[str], kind: str = "zipf", alpha: float = 1.0):
        self.ids = list(ids) or [""]
        self.weights = popularity_weights(len(self.ids), kind, alpha)
        self._cum = list(accumulate(self.weights))

    def index(self, rng: random.Random) -> int:
        return min(bisect_left(self._cum, rng.random() * self._cum[-1]), len(self.ids) - 1)

    def __call__(self, rng: random.Random) -> str:
        return self.ids[self.index(rng)]


@dataclass(frozen=True)
class LengthDist:
    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> "LengthDist":
        parts = spec.strip().split(":")
        try:
            nums = [float(x) for x in parts[1:]]
        except ValueError:
            nums = []
        shapes = {"fixed": 1, "uniform": 2, "lognormal": 2}
        if parts[0] not in shapes or len(nums) != shapes[parts[0]]:
            raise ValueError(f"bad length distribution {spec!r}: use fixed:N, uniform:LO:HI or lognormal:MEAN:SIGMA")
        d = cls(parts[0], *nums)
        if d.a < 1 or (d.kind == "uniform" and d.b < d.a) or (d.kind == "lognormal" and d.b < 0):
            raise ValueError(f"bad length distribution {spec!r}: lengths must be >= 1, LO <= HI, SIGMA >= 0")
        if d.kind != "lognormal" and (d.a != int(d.a) or d.b != int(d.b)):
            raise ValueError(f"bad length distribution {spec!r}: token counts must be integers")
        return d

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        mu = math.log(self.a) - self.b * self.b / 2
        return max(1, round(rng.lognormvariate(mu, self.b)))

    def __str__(self) -> str:
        nums = [self.a] if self.kind == "fixed" else [self.a, self.b]
        return ":".join([self.kind] + [f"{x:g}" for x in nums])


def make_prompt(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@dataclass(frozen=True)
class WorkloadSpec:
    arrival: str = "poisson"
    rate: float = 2.0
    cv: float = 2.0
    popularity: str = "zipf"
    alpha: float = 1.0
    input_len: LengthDist = LengthDist("uniform", 8, 64)
    output_len: LengthDist = LengthDist("uniform", 8, 64)
    seed: int = 0


@dataclass(frozen=True)
class PlannedRequest:
    idx: int
    at: float  # seconds after the start (0 for closed loop)
    adapter_id: str  # "" = base model
    input_len: int  # words in the prompt
    max_new_tokens: int
    seed: int = 0

    @property
    def prompt(self) -> str:
        """Built on demand from (seed, idx): a long schedule holds no prompt text."""
        return make_prompt(random.Random(f"{self.seed}/prompt/{self.idx}"), self.input_len)


def _rngs(seed: int) -> tuple[random.Random, random.Random, random.Random]:
    return tuple(random.Random(f"{seed}/{name}") for name in ("arrival", "adapter", "length"))  # type: ignore


def request_stream(spec: WorkloadSpec, adapter_ids: list[str], times: Iterator[float] | None = None,
                   rngs=None) -> Iterator[PlannedRequest]:
    """Requests with adapter and lengths drawn from spec; `at` from `times` (default: 0 forever)."""
    _, adapter_rng, length_rng = rngs or _rngs(spec.seed)
    sampler = AdapterSampler(adapter_ids, spec.popularity, spec.alpha)
    times = times if times is not None else (0.0 for _ in count())
    for idx, at in enumerate(times):
        adapter = sampler(adapter_rng)
        n_in, n_out = spec.input_len.sample(length_rng), spec.output_len.sample(length_rng)
        yield PlannedRequest(idx, at, adapter, n_in, n_out, spec.seed)


def plan_requests(spec: WorkloadSpec, adapter_ids: list[str], duration: float) -> list[PlannedRequest]:
    """The whole open-loop schedule (arrival < duration), drawn before the run starts."""
    rngs = _rngs(spec.seed)
    times = arrival_times(spec.arrival, spec.rate, rngs[0], spec.cv, duration)
    return list(request_stream(spec, adapter_ids, times, rngs))
