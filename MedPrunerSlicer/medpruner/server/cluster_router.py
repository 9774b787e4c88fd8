"""Ray Serve request router of the engine replicas: a follow-up goes to the replica holding its volume.

A follow-up question reuses the KV cache of the volume's pruned prefix, which lives in the memory
of the one replica that prepared it. The front names that replica (`target`, from the job board)
in the request's keyword arguments; this router sends the request there, and waits for it when
it is busy, as a queue would. Every other request, and a follow-up whose replica is gone (its
process died, or Ray replaced it), goes to the least-loaded replica: all replicas are offered as
one rank, and Serve's router picks the shortest queue (the first offered among equals, so the
order is rotated at every request: idle replicas take turns instead of one taking every job that
arrives while the set is idle). A follow-up sent
to a replica that does not hold its volume is answered `unknown_volume`, as by the single server
once a volume is evicted.
"""
from __future__ import annotations

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


def chosen_replicas(candidates: list, target: str | None, turn: int) -> list[list]:
    """The ranks to try: the target replica alone when it is among the candidates, else all of them, in an
    order rotated by `turn`."""
    if target:
        for replica in candidates:
            if replica.replica_id.unique_id == target:
                return [[replica]]
    ordered = sorted(candidates, key=lambda replica: replica.replica_id.unique_id)
    if not ordered:
        return [[]]
    start = turn % len(ordered)
    return [ordered[start:] + ordered[:start]]


class VolumeAffinityRouter(FIFOMixin, RequestRouter):
    turns = 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        target = pending_request.kwargs.get("target") if pending_request is not None else None
        self.turns += 1
        return chosen_replicas(candidate_replicas, target, self.turns)
