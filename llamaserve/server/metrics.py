"""Prometheus metrics (prefix llamaserve_), kept in a registry of the app's own."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from llamaserve.engine.async_engine import EngineStats

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_TPOT_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


class _EngineCollector(Collector):
    """Gauges and engine-lifetime counters read from the engine at scrape time, under our names and, as
    compatibility aliases for routers that pick replicas by them (llm-d's endpoint picker, KServe), under
    vLLM's names and label (`vllm:num_requests_running{model_name="..."}`, same types and meaning)."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: Callable[[], str]) -> None:
        self._stats = stats
        self._model_name = model_name

    def collect(self) -> Iterator:
        s = self._stats()
        # (family, name, help, our value, vLLM's value): vLLM counts running requests, we count sequences
        rows = [
            (GaugeMetricFamily, "num_requests_running", "Sequences in the running batch", s.num_running,
             s.num_running_requests),  # vLLM's: requests with a sequence running
            (GaugeMetricFamily, "num_requests_waiting", "Sequences waiting to be scheduled", s.num_waiting,
             s.num_waiting),
            (GaugeMetricFamily, "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)",
             s.kv_cache_usage, s.kv_cache_usage),
            (CounterMetricFamily, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
             s.prefix_query_tokens, s.prefix_query_tokens),
            (CounterMetricFamily, "prefix_cache_hits", "Prompt tokens found in the prefix cache",
             s.prefix_hit_tokens, s.prefix_hit_tokens),
        ]
        for family, name, doc, value, _ in rows:
            yield family(f"llamaserve_{name}", doc, value=value)
        model = self._model_name()
        for family, name, doc, _, value in rows:
            alias = family(f"vllm:{name}", f"vLLM's name, with vLLM's meaning ({doc.lower()})",
                           labels=["model_name"])
            alias.add_metric([model], value)
            yield alias
        old = GaugeMetricFamily("vllm:gpu_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1), "
                                "vLLM's older name of vllm:kv_cache_usage_perc", labels=["model_name"])
        old.add_metric([model], s.kv_cache_usage)
        yield old
        yield CounterMetricFamily("llamaserve_num_preemptions", "Sequences preempted (their KV blocks freed, "
                                  "to be recomputed) because the pool ran out", value=s.num_preemptions)


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats], model_name: Callable[[], str] = lambda: "") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.registry.register(_EngineCollector(stats, model_name))
        self.prompt_tokens = Counter("llamaserve_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("llamaserve_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("llamaserve_requests", "Finished requests by route and HTTP status",
                                ["route", "status"], registry=r)
        self.rejected = Counter("llamaserve_requests_rejected_queue_full",
                                "Requests answered 429 because the queue was full", registry=r)
        self.ttft = Histogram("llamaserve_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("llamaserve_time_per_output_token_seconds", "Time per output token after "
                              "the first", buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("llamaserve_e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=_LATENCY_BUCKETS, registry=r)

    def observe_request(self, ttft: float | None, duration: float, prompt: int, completion: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(completion)
        self.e2e.observe(duration)
        if ttft is not None:
            self.ttft.observe(ttft)
            if completion > 1:
                self.tpot.observe((duration - ttft) / (completion - 1))


def with_replica_label(texts: dict[str, str]) -> str:
    """Several replicas' Prometheus text as one exposition: each sample gains `replica="<id>"`, and each
    family keeps one HELP/TYPE header with all replicas' samples under it (as the format requires)."""
    families: dict[str, dict[str, list[str]]] = {}
    for replica, text in sorted(texts.items()):
        label = 'replica="' + replica.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        family = families.setdefault("", {"head": [], "samples": []})
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                name = line.split(" ", 3)[2]
                family = families.setdefault(name, {"head": [], "samples": []})
                if len(family["head"]) < 2 and line not in family["head"]:
                    family["head"].append(line)
            elif line and not line.startswith("#"):
                end = line.rfind("}")
                if end >= 0:  # name{a="b"} value: the label goes last inside the braces
                    sep = "" if line[end - 1] == "{" else ","
                    family["samples"].append(f"{line[:end]}{sep}{label}{line[end:]}")
                else:
                    name, _, rest = line.partition(" ")
                    family["samples"].append(f"{name}{{{label}}} {rest}")
    return "".join("\n".join(f["head"] + f["samples"]) + "\n" for f in families.values() if f["samples"])
