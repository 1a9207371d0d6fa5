"""Cluster choice as named plugins: which cluster (and so which pool queue) a request joins.

Pure decisions, no I/O and no clock reads. The caller (the live gateway from its shared state, the simulator
from its own) builds one :class:`ClusterLoad` snapshot per candidate cluster and one
:class:`ClusterRequest` for the request, and asks a policy for a cluster name.

``round_robin``   cycle through the clusters; ignores load and distance (baseline).
``least_loaded``  fewest requests per dispatch slot: ``(queued + outstanding) / slots``; ties go to the nearer
                  cluster (baseline: load-aware, but blind to request sizes, engine speed and distance).
``latency_aware`` smallest estimated completion time (design: "network RTT + queue wait from shared state +
                  predicted service time")::

                      estimate = rtt + wait + service
                      service  = prefill + predicted p50 output tokens x the cluster's time per output token
                      wait     = 0                                          when a slot and the KV are free now
                               = (queued work + this request's service) / requests in service   otherwise

                  where the queued work is the predicted service seconds of the requests waiting in (or on
                  their way to) the cluster's pool queue ahead of this one (the simulator counts those its
                  queue policy would serve first; all of them is the policy-blind default); a saturated pool drains its queue at the pace its
                  requests in service finish (each frees a place after about one service time), so the
                  divisor is the number of outstanding requests (what KV and slots let run at once). The nearest cluster wins unless a farther one is
                  estimated faster by more than ``spill_margin_s``: traffic stays local while the local
                  cluster has room and spills to a remote one when the local one is saturated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ClusterLoad:
    """One cluster's pool for the request's model, as shared state shows it."""

    name: str
    rtt_s: float  # client/gateway <-> cluster round trip
    slots: int  # dispatch slots: sum over engines of max_outstanding (max_num_seqs + a small queue)
    outstanding: int  # requests dispatched to its engines and not finished
    queued: int  # requests waiting in its pool queue, including those on their way to it
    queued_work_s: float = 0.0  # predicted service seconds of the queued requests it would wait behind (all of
    # them when the caller does not know the queue order)
    concurrency: int = 0  # sequences its engines can run at once (engines x max_num_seqs); 0: use slots
    free_kv_tokens: int | None = None  # unreserved KV tokens on its best engine (None: not tracked)
    tpot_s: float = 0.05  # expected time per output token on its engines (at their current batch, if known)
    prefill_tps: float = 10000.0  # prompt tokens per second one engine prefills


@dataclass(frozen=True, slots=True)
class ClusterRequest:
    """What cluster choice needs to know about the request (from the predictor)."""

    prompt_tokens: int
    pred_p50: int
    reservation_tokens: int = 0  # what the admission policy will reserve (0: not checked)


def service_estimate_s(request: ClusterRequest, cluster: ClusterLoad) -> float:
    """Predicted service time of ``request`` on one of ``cluster``'s engines."""
    prefill = request.prompt_tokens / cluster.prefill_tps if cluster.prefill_tps > 0 else 0.0
    return prefill + max(0, request.pred_p50 - 1) * cluster.tpot_s


def has_room(request: ClusterRequest, cluster: ClusterLoad) -> bool:
    """A request joining ``cluster`` now would be dispatched at once: nothing queued, a slot and KV free."""
    if cluster.queued > 0 or cluster.outstanding >= cluster.slots:
        return False
    return cluster.free_kv_tokens is None or cluster.free_kv_tokens >= request.reservation_tokens


def expected_wait_s(request: ClusterRequest, cluster: ClusterLoad) -> float:
    """Expected queueing delay in ``cluster``'s pool queue (0 when it has room now)."""
    if has_room(request, cluster):
        return 0.0
    parallel = cluster.outstanding or cluster.concurrency or cluster.slots
    if parallel <= 0:
        return math.inf
    return (cluster.queued_work_s + service_estimate_s(request, cluster)) / parallel


def estimated_completion_s(request: ClusterRequest, cluster: ClusterLoad) -> float:
    """RTT + expected queue wait + predicted service time: when the request would finish, seen from now."""
    if cluster.slots <= 0:
        return math.inf
    return cluster.rtt_s + expected_wait_s(request, cluster) + service_estimate_s(request, cluster)


class ClusterRoutingPolicy(Protocol):
    name: str

    def choose(self, request: ClusterRequest, clusters: Sequence[ClusterLoad]) -> str: ...


class ClusterRoundRobin:
    """Cycle through the clusters in the order given (baseline)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = 0

    def choose(self, request: ClusterRequest, clusters: Sequence[ClusterLoad]) -> str:
        live = [c for c in clusters if c.slots > 0] or list(clusters)
        choice = live[self._counter % len(live)]
        self._counter += 1
        return choice.name


class ClusterLeastLoaded:
    """Fewest requests (queued + outstanding) per dispatch slot; ties: nearer, then by name (baseline)."""

    name = "least_loaded"

    def choose(self, request: ClusterRequest, clusters: Sequence[ClusterLoad]) -> str:
        def load(c: ClusterLoad) -> tuple:
            per_slot = (c.queued + c.outstanding) / c.slots if c.slots > 0 else math.inf
            return (per_slot, c.rtt_s, c.name)

        return min(clusters, key=load).name


class LatencyAware:
    """Smallest RTT + expected queue wait + predicted service; stay near unless far is faster by a margin."""

    name = "latency_aware"

    def __init__(self, spill_margin_s: float = 0.0) -> None:
        if spill_margin_s < 0:
            raise ValueError("spill_margin_s must be >= 0")
        self.spill_margin_s = spill_margin_s

    def choose(self, request: ClusterRequest, clusters: Sequence[ClusterLoad]) -> str:
        # the nearest cluster that can serve: a nearer one with no engine up would put the margin on every
        # live one, and the hysteresis between them would be gone
        nearest_rtt = min((c.rtt_s for c in clusters if c.slots > 0), default=min(c.rtt_s for c in clusters))
        best: tuple | None = None
        best_name = clusters[0].name
        for c in clusters:
            estimate = estimated_completion_s(request, c)
            if c.rtt_s > nearest_rtt:
                estimate += self.spill_margin_s
            score = (estimate, c.rtt_s, c.name)
            if best is None or score < best:
                best, best_name = score, c.name
        return best_name


CLUSTER_ROUTING_POLICIES: dict[str, type] = {
    ClusterRoundRobin.name: ClusterRoundRobin,
    ClusterLeastLoaded.name: ClusterLeastLoaded,
    LatencyAware.name: LatencyAware,
}


def make_cluster_routing(name: str, **options) -> ClusterRoutingPolicy:
    try:
        cls = CLUSTER_ROUTING_POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown cluster routing policy {name!r}; known: "
                         f"{', '.join(sorted(CLUSTER_ROUTING_POLICIES))}") from None
    return cls(**options) if options else cls()
