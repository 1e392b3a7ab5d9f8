"""Fit-job admin routes: `POST /admin/fit`, `GET /admin/fit[/{id}]`, `DELETE /admin/fit/{id}`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from mpo_core.errors import EngineNotRunning

from ..deps import require_admin
from ..jobs import FitJobs
from ..openapi import BODY_ERRORS, error_responses
from ..protocol.fit import FitJobOut, FitRequest

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])
ERRORS = error_responses(400, 401, 403, 404, 503)


def get_jobs(request: Request) -> FitJobs:
    jobs: FitJobs | None = getattr(request.app.state, "fit_jobs", None)
    if jobs is None:
        raise EngineNotRunning("the engine is not loaded yet; retry shortly")
    return jobs


JobsDep = Annotated[FitJobs, Depends(get_jobs)]


@router.post(
    "/fit",
    status_code=202,
    response_model=FitJobOut,
    responses=error_responses(*BODY_ERRORS, 401, 403, 409, 503),
)
def start_fit(body: FitRequest, jobs: JobsDep) -> JSONResponse:
    """Start a fit; 202 with the job, whose ``id`` the other routes take."""
    job = jobs.start(body)
    headers = {"Location": f"/admin/fit/{job.id}"}
    return JSONResponse(job.accepted or job.to_dict(), status_code=202, headers=headers)


@router.get("/fit", responses=ERRORS)
def list_fits(jobs: JobsDep) -> dict[str, Any]:
    return {"jobs": jobs.jobs()}


@router.get("/fit/{job_id}", response_model=FitJobOut, responses=ERRORS)
def get_fit(job_id: str, jobs: JobsDep) -> dict[str, Any]:
    return jobs.get(job_id)


@router.delete("/fit/{job_id}", response_model=FitJobOut, responses=ERRORS)
def cancel_fit(job_id: str, jobs: JobsDep) -> dict[str, Any]:
    """Ask a running job to stop; it ends ``cancelled`` at its next check, storing nothing."""
    return jobs.cancel(job_id)
