"""The status object of a job (GET /v1/jobs/{id}), one shape for the single server and a replica set."""
from __future__ import annotations

from typing import Any


def job_status(job, position: int | None) -> dict[str, Any]:
    """The status of `job` (a jobs.Job or a cluster_board.JobRecord); `replica` only where the job has one."""
    status = {
        "job_id": job.id,
        "state": job.state,
        "stage": job.stage,
        "progress": round(job.progress, 4),
        "position": position,
        "error": job.error,
        "created": job.created,
        "started": job.started,
        "finished": job.finished,
        "answer_so_far": job.answer,
    }
    if hasattr(job, "replica"):
        status["replica"] = job.replica
    return status
