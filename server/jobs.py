"""Fit jobs: run the MPO weight fit in a background thread, one at a time.

A job samples through the shared engine (its requests queue with everyone else's, a
bounded number at a time, so serving continues), scores, fits, and on success stores the
weights as a new version of a profile. A failed or cancelled job stores nothing.

Every job has a record in the store (``server/store/fit_records.py``): any replica answers
its status, a cancel on any replica reaches the process running it, one fit runs at a time
across the replicas sharing a PostgreSQL store, and a job whose process died reads failed.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpo_core.engine.core import Engine
from mpo_core.errors import ConfigError, InvalidParameter
from mpo_core.fitting.rewards import Objective
from mpo_core.rules import check_context

from .errors import APIError
from .metrics import Metrics
from .protocol.fit import FitJobOut, FitRequest, FitState
from .store import ProfileStore
from .store.fit_records import FitClaim, FitRecords, open_fit_records

logger = logging.getLogger(__name__)

# Share of the whole job each phase accounts for, for one progress figure and an ETA.
_PHASE_SPAN = {
    FitState.SAMPLING: (0.0, 0.7),
    FitState.SCORING: (0.7, 0.95),
    FitState.OPTIMISING: (0.95, 1.0),
}
MAX_KEPT_JOBS = 100
_PROGRESS_WRITE_S = 0.5  # progress reaches the store at most this often (states at once)


# JSON Schema's (ECMA-262's) \s: what a prompt's pattern \S leaves out.
SCHEMA_SPACE = frozenset(
    "\t\n\v\f\r \u00a0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
)


@dataclass
class FitJob:
    id: str
    request: FitRequest
    state: FitState = FitState.QUEUED
    phase_progress: float = 0.0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    weights: dict[str, float] | None = None
    profile: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    claim: FitClaim | None = None  # the cluster's fit slot, held while the job runs
    owner: str | None = None  # the process running it (``FitRecords.owner``)
    progress_written: float = 0.0  # monotonic time of the last progress write
    ended: threading.Event = field(default_factory=threading.Event)  # set once it is final
    accepted: dict[str, Any] | None = None  # the job as accepted (queued): the 202's body

    @property
    def progress(self) -> float:
        if self.state is FitState.DONE:
            return 1.0
        low, high = _PHASE_SPAN.get(self.state, (0.0, 0.0))
        return low + (high - low) * self.phase_progress

    def eta_seconds(self) -> float | None:
        if not self.state.active or self.started_at is None or self.progress <= 0.01:
            return None
        elapsed = time.time() - self.started_at
        return elapsed * (1 - self.progress) / self.progress

    def record(self) -> dict[str, Any]:
        """The fields the store keeps (``fit_records.FIELDS`` less owner and cancel flag)."""
        return {
            "id": self.id,
            "state": self.state.value,
            "progress": self.progress,
            "phase_progress": self.phase_progress,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "request": self.request.model_dump(),
            "error": self.error,
            "weights": self.weights,
            "profile": self.profile,
            "report": self.report,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state.value,
            "progress": round(self.progress, 4),
            "phase_progress": round(self.phase_progress, 4),
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "eta_seconds": self.eta_seconds(),
            "request": self.request.model_dump(),
            "error": self.error,
            "weights": self.weights,
            "profile": self.profile,
            "report": self.report,
            "owner": self.owner,
        }


class FitJobs:
    """Starts, tracks and cancels fit jobs; at most one is active."""

    def __init__(
        self,
        engine: Engine,
        store: ProfileStore,
        metrics: Metrics,
        data_dir: Path,
        reward_sets: Mapping[str, str | Path] | None = None,
    ):
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self.prompt_dir = data_dir / "prompts"
        self.reward_sets = dict(reward_sets or {})  # name -> rewards YAML, from the server
        self._objectives: dict[str, dict[str, Objective]] = {}  # loaded reward sets
        self.records: FitRecords = open_fit_records(store)
        self._jobs: dict[str, FitJob] = {}  # the jobs this process runs or ran
        self._lock = threading.Lock()

    def start(self, request: FitRequest) -> FitJob:
        if not self.engine.has_reference:
            raise InvalidParameter(
                "reference",
                "fitting samples from the reference policy, and this policy set has none: "
                "add `reference:` to the policy-set config",
            )
        prompts = self._prompts(request)
        self._check_context(prompts, request.max_new_tokens)
        objectives = None if request.rewards is None else self._reward_set(request.rewards)
        with self._lock:
            job = FitJob(id=uuid.uuid4().hex[:16], request=request, owner=self.records.owner)
            claim = self.records.claim(job.record())
            if claim is None:
                running = next((r for r in self.records.list(MAX_KEPT_JOBS) if _active(r)), None)
                which = f"fit job {running['id']} is still {running['state']}" if running else (
                    "another fit is running")  # fmt: skip
                raise APIError(409, f"{which}; one fit at a time", code="fit_in_progress")
            job.claim, job.cancel_requested = claim, claim.cancelled
            self._jobs[job.id] = job
            self._forget_old()
        self._set_state(job, FitState.QUEUED)
        job.accepted = job.to_dict()  # before its thread starts: the 202 always says queued
        thread = threading.Thread(
            target=self._run, args=(job, prompts, objectives), name=f"fit-{job.id}"
        )
        thread.daemon = True
        thread.start()
        return job

    def get(self, job_id: str) -> dict[str, Any]:
        """The job as ``GET /admin/fit/{id}`` shows it, from this process or from the store."""
        job = self._jobs.get(job_id)
        if job is not None:
            return job.to_dict()
        record = self.records.get(job_id)
        if record is None:
            raise APIError(
                404, f"fit job {job_id!r} does not exist", param="id", code="job_not_found"
            )
        return _record_out(record)

    def jobs(self) -> list[dict[str, Any]]:
        """Every job the store knows (newest first), this process's own ones up to date."""
        listed = {r["id"]: _record_out(r) for r in self.records.list(MAX_KEPT_JOBS)}
        listed.update({job.id: job.to_dict() for job in self._jobs.values()})
        return sorted(listed.values(), key=lambda j: j["created_at"], reverse=True)

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask the job to stop, wherever it runs; it ends ``cancelled`` at its next check."""
        job = self._jobs.get(job_id)
        if job is not None:
            if job.state.active:
                job.cancel_requested.set()
                self.records.request_cancel(job_id)
            return job.to_dict()
        record = self.records.request_cancel(job_id)
        if record is None:
            raise APIError(
                404, f"fit job {job_id!r} does not exist", param="id", code="job_not_found"
            )
        return _record_out(record)

    def cancel_all(self) -> list[FitJob]:
        """Cancel this process's active jobs (shutdown); the jobs cancelled."""
        active = [job for job in list(self._jobs.values()) if job.state.active]
        for job in active:
            job.cancel_requested.set()
            self.records.request_cancel(job.id)
        return active

    @staticmethod
    def wait(job: FitJob, timeout: float) -> FitJob:
        """Block until this process's ``job`` has ended or ``timeout`` passes."""
        job.ended.wait(timeout)
        return job

    # -- internals -------------------------------------------------------------------
    def _reward_set(self, name: str) -> dict[str, Objective]:
        """The configured reward set ``name``, loaded once; unknown names are a 400."""
        if name not in self.reward_sets:
            known = ", ".join(sorted(self.reward_sets)) or "none are configured"
            raise InvalidParameter(
                "rewards",
                f"rewards {name!r} is not a reward set of this server ({known}); reward sets "
                "are named in the policy-set YAML (`rewards:`) or MPO_REWARDS",
            )
        with self._lock:
            loaded = self._objectives.get(name)
        if loaded is None:
            from mpo_core.fitting.rewards import load_rewards

            try:
                loaded = load_rewards(self.reward_sets[name], self.engine.policy_set.device)
            except ConfigError as exc:
                logger.error("reward set %r cannot be loaded: %s", name, exc)
                raise APIError(
                    500, f"reward set {name!r} is misconfigured on the server: {exc}",
                    code="reward_set_error",
                ) from None  # fmt: skip
            with self._lock:
                self._objectives.setdefault(name, loaded)
        return loaded

    def _prompts(self, request: FitRequest) -> list[str]:
        if request.prompts is not None:
            prompts = request.prompts
        else:
            assert request.prompt_file is not None  # the request model checks one is given
            prompts = self._read_prompt_file(request.prompt_file)
        # "Something besides whitespace" as the schema's pattern \S reads it (JSON Schema's
        # whitespace, not Python's, which also counts \x1c-\x1f and \x85)
        if not prompts or any(all(c in SCHEMA_SPACE for c in p) for p in prompts):
            raise InvalidParameter("prompts", "prompts must be non-empty strings")
        return prompts

    def _read_prompt_file(self, name: str) -> list[str]:
        """The prompts of a file under ``prompt_dir``; any name that is not one is a 400."""
        not_a_file = InvalidParameter(
            "prompt_file", f"prompt_file {name!r} is not a file under {self.prompt_dir}"
        )
        if "\x00" in name:  # the OS refuses it (ValueError), whatever the folder holds
            raise InvalidParameter("prompt_file", "prompt_file must not contain a NUL byte")
        try:
            path = (self.prompt_dir / name).resolve()
            if self.prompt_dir.resolve() not in path.parents or not path.is_file():
                raise not_a_file
            text = path.read_text(encoding="utf-8")
        except UnicodeError as exc:  # not UTF-8, or a name no file system can hold
            raise InvalidParameter(
                "prompt_file", f"prompt_file {name!r} is not UTF-8 text: {exc}"
            ) from None
        except (OSError, ValueError):  # too long, unreadable, gone meanwhile
            raise not_a_file from None
        return [line.strip() for line in text.splitlines() if line.strip()]

    def _check_context(self, prompts: list[str], max_new_tokens: int) -> None:
        """A reply that cannot fit the context would fail the job later: a 400 now."""
        from mpo_core.fitting.driver import encode_prompt

        longest = max(len(encode_prompt(self.engine.tokenizer, p)) for p in prompts)
        limit = int(self.engine.max_context)
        check_context(longest, max_new_tokens, limit, "max_new_tokens", "prompts", "longest prompt")

    def _forget_old(self) -> None:
        own = sorted(self._jobs.values(), key=lambda j: j.created_at, reverse=True)
        finished = [j for j in own if not j.state.active]
        for job in finished[MAX_KEPT_JOBS:]:
            del self._jobs[job.id]

    def _set_state(self, job: FitJob, state: FitState, phase_progress: float = 0.0) -> None:
        with self._lock:
            job.phase_progress = (
                phase_progress  # first: a reader of the new state sees its progress
            )
            job.state = state
            counts = dict.fromkeys(FitState, 0)
            for other in self._jobs.values():
                counts[other.state] += 1
        for counted, count in counts.items():
            self.metrics.fit_jobs.labels(state=counted.value).set(count)
        self._write(job)

    def _write(self, job: FitJob) -> None:
        """The job's record in the store; a store outage is logged, the job goes on."""
        job.progress_written = time.monotonic()
        try:
            self.records.update(job.id, {k: v for k, v in job.record().items() if k != "id"})
        except Exception as exc:
            logger.warning("fit job %s: cannot write its record (%s)", job.id, exc)

    def _progress(self, job: FitJob, phase: str, fraction: float) -> None:
        if job.cancel_requested.is_set():
            return
        state = FitState(phase)  # the driver's phases: sampling, scoring, optimising
        fraction = min(max(fraction, 0.0), 1.0)
        if state is not job.state:
            self._set_state(job, state, fraction)
            return
        job.phase_progress = fraction
        if time.monotonic() - job.progress_written >= _PROGRESS_WRITE_S:
            self._write(job)

    def _fit(
        self, job: FitJob, prompts: list[str], objectives: dict[str, Objective] | None
    ) -> tuple[dict[str, float], float, dict[str, Any]]:
        """Run the fit the request asks for: (weights, strength, report)."""
        from mpo_core.fitting import driver as fit_driver
        from mpo_core.fitting import reward_driver as reward_fit_driver

        request = job.request

        def progress(phase: str, fraction: float) -> None:
            self._progress(job, phase, fraction)

        cancelled = job.cancel_requested.is_set
        if objectives is None:
            options = fit_driver.FitOptions(
                samples_per_prompt=request.samples_per_prompt,
                max_new_tokens=request.max_new_tokens,
                iterations=request.iterations,
                step_size=request.step_size,
                batch_size=request.batch_size,
                seed=request.seed,
            )
            report = fit_driver.run_fit(self.engine, prompts, options, progress, cancelled)
            return dict(report.weights), 1.0, report.to_dict()
        reward_options = reward_fit_driver.RewardFitDriverOptions(
            reference_samples=request.reference_samples,
            samples_per_round=request.samples_per_prompt,
            rounds=request.rounds,
            tolerance=request.tolerance,
            max_new_tokens=request.max_new_tokens,
            kl_coef=request.kl_coef,
            fit_strength=request.fit_strength,
            iterations=request.iterations,
            seed=request.seed,
        )
        reward_report = reward_fit_driver.run_reward_fit(
            self.engine, prompts, objectives, reward_options, progress, cancelled
        )
        report_dict = reward_report.to_dict()
        report_dict["rewards"] = request.rewards
        return dict(reward_report.weights), reward_report.strength, report_dict

    def _run(
        self, job: FitJob, prompts: list[str], objectives: dict[str, Objective] | None = None
    ) -> None:
        from mpo_core.fitting.mirror_descent import FitCancelled

        request = job.request
        job.started_at = time.time()
        # Sampling starts at once (its first progress report comes with the first reply).
        self._set_state(job, FitState.SAMPLING)
        try:
            weights, strength, report = self._fit(job, prompts, objectives)
            if job.cancel_requested.is_set():
                raise FitCancelled("cancelled")
            job.report = report
            job.weights = weights
            version = self.store.put(
                request.profile, weights, strength, {"fit_job": job.id, "report": job.report}
            )
            if request.activate:
                self.store.set_default(request.profile)
            job.profile = version.to_dict()
            self._finish(job, FitState.DONE)
        except FitCancelled:
            self._finish(job, FitState.CANCELLED)
        except Exception as exc:  # a job failure is reported on the job, not raised
            logger.exception("fit job %s failed", job.id)
            job.error = f"{type(exc).__name__}: {exc}"
            self._finish(job, FitState.FAILED)

    def _finish(self, job: FitJob, state: FitState) -> None:
        job.finished_at = time.time()
        try:
            self._set_state(job, state)  # the final record is written before the slot frees
        finally:
            if job.claim is not None:
                job.claim.release()
            job.ended.set()
        logger.info("fit job %s %s", job.id, state.value)


def _active(record: dict[str, Any]) -> bool:
    return FitState(record["state"]).active


def _record_out(record: dict[str, Any]) -> dict[str, Any]:
    """A stored record in the shape of ``FitJob.to_dict`` (another replica's job)."""
    out = {k: record.get(k) for k in FitJobOut.model_fields if k in record}
    out["eta_seconds"] = None
    if _active(record) and record.get("started_at") and record["progress"] > 0.01:
        elapsed = time.time() - record["started_at"]
        out["eta_seconds"] = elapsed * (1 - record["progress"]) / record["progress"]
    out["progress"] = round(float(record["progress"]), 4)
    out["phase_progress"] = round(float(record["phase_progress"]), 4)
    out["owner"] = record.get("owner")
    return out
