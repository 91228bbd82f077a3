"""Ray Serve request router for the engine replicas: to the replica that holds the prompt's first blocks.

Each request reaching the engine deployment carries `prefix`, the chained digests of its prompt's
leading blocks (server/affinity.py). The router remembers which replica each digest was last sent to;
a request goes to the replica of its longest known digest, unless that replica's queue is longer than
the shortest by more than `imbalance` requests: then (and for a request with no known prefix, or none
at all: --no-prefix-routing sends none) it is power-of-two choices on queue length. A Ray Serve router
runs in the caller's process (the ingress), so this memory is per ingress replica; see docs/SCALING.md.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

MAX_ENTRIES = 200_000  # digests remembered (LRU): ~16 bytes each plus the dict's overhead


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, imbalance: int = 4, **_: Any) -> None:
        self.imbalance = imbalance
        self.owner: OrderedDict[str, ReplicaID] = OrderedDict()
        self.routed = {"affinity": 0, "balanced": 0}

    @staticmethod
    def _digests(request: PendingRequest | None) -> list[str]:
        if request is None or not request.args or not isinstance(request.args[0], dict):
            return []
        digests = request.args[0].get("prefix") or []
        return digests if isinstance(digests, list) else []

    def _queue(self, replica: RunningReplica) -> int:
        return self._replica_queue_len_cache.get(replica.replica_id) or 0

    def _match(self, digests: list[str], live: dict[ReplicaID, RunningReplica]) -> RunningReplica | None:
        for digest in reversed(digests):  # the longest shared prefix first
            rid = self.owner.get(digest)
            if rid is not None and rid in live:
                return live[rid]
        return None

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        live = {r.replica_id: r for r in candidate_replicas}
        shortest = min(self._queue(r) for r in candidate_replicas)
        match = self._match(self._digests(pending_request), live)
        if match is not None and self._queue(match) - shortest <= self.imbalance:
            self.routed["affinity"] += 1
            return [[match], [r for r in candidate_replicas if r is not match]]
        self.routed["balanced"] += 1
        pair = random.sample(candidate_replicas, min(2, len(candidate_replicas)))
        best = min(pair, key=self._queue)
        return [[best], [r for r in candidate_replicas if r is not best]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        for digest in self._digests(pending_request):
            self.owner[digest] = replica_id
            self.owner.move_to_end(digest)
        while len(self.owner) > MAX_ENTRIES:
            self.owner.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for digest in [d for d, rid in self.owner.items() if rid == replica_id]:
            del self.owner[digest]
