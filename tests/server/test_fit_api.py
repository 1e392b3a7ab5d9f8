"""The fit-job admin API through HTTP: lifecycle, cancel, failure, conflict, auth, input."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from server_helpers import ADMIN, ADMIN_TOKEN, ClientFactory, assert_error, metric_value

from mpo_core.fitting import driver as fit_driver
from mpo_core.fitting import reward_driver as reward_fit_driver

PROMPTS = ["Could you help me?", "Write a short poem.", "Say thanks."]
SMALL_FIT = {
    "prompts": PROMPTS,
    "samples_per_prompt": 3,
    "max_new_tokens": 4,
    "iterations": 30,
    "seed": 1,
}


def wait_final(client: TestClient, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/admin/fit/{job_id}", headers=ADMIN).json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"fit job {job_id} did not finish in {timeout} s")


def profiles(client: TestClient) -> dict:
    return client.get("/admin/profiles", headers=ADMIN).json()


def test_fit_lifecycle_stores_and_activates_a_profile(admin_client: TestClient) -> None:
    response = admin_client.post(
        "/admin/fit", json={**SMALL_FIT, "profile": "balanced", "activate": True}, headers=ADMIN
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/admin/fit/{job['id']}"
    assert job["state"] in ("queued", "sampling", "scoring", "optimising", "done")
    final = wait_final(admin_client, job["id"])
    assert final["state"] == "done", final["error"]
    assert final["progress"] == 1.0
    weights = final["weights"]
    assert set(weights) == {"helpful", "harmless", "concise"}
    assert sum(weights.values()) == pytest.approx(1.0) and min(weights.values()) >= 0
    stored = admin_client.get("/admin/profiles/balanced", headers=ADMIN).json()
    assert stored["version"] == 1 and stored["is_default"] is True
    assert stored["meta"]["fit_job"] == job["id"]
    assert stored["weights"] == pytest.approx(weights)
    assert "report" in stored["meta"] and final["report"]
    # the stored profile now mixes ordinary requests (it is the default)
    generated = admin_client.post(
        "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
    )
    assert generated.status_code == 200, generated.text
    assert generated.json()["mixing"]["profile"] == "balanced"
    assert generated.json()["mixing"]["weights"] == pytest.approx(weights)
    metrics = admin_client.get("/metrics").text
    assert metric_value(metrics, "mpo_fit_jobs", {"state": "done"}) == 1.0


def test_failed_fit_leaves_profiles_untouched(admin_client: TestClient, monkeypatch) -> None:
    admin_client.put("/admin/profiles/keep", json={"weights": [1, 0, 0]}, headers=ADMIN)
    before = profiles(admin_client)

    def broken(*args, **kwargs):
        raise RuntimeError("scoring exploded")

    monkeypatch.setattr(fit_driver, "run_fit", broken)
    job = admin_client.post("/admin/fit", json={**SMALL_FIT, "profile": "keep"}, headers=ADMIN)
    final = wait_final(admin_client, job.json()["id"])
    assert final["state"] == "failed"
    assert "scoring exploded" in final["error"]
    assert profiles(admin_client) == before


def test_cancel_and_conflict(admin_client: TestClient, monkeypatch) -> None:
    reported, release = threading.Event(), threading.Event()

    def slow(engine, prompts, options, progress=None, should_cancel=None):
        progress("sampling", 0.5)
        reported.set()  # the job reads "sampling" from its start, before this report
        while not release.wait(0.02):
            if should_cancel():
                from mpo_core.fitting.mirror_descent import FitCancelled

                raise FitCancelled("cancelled")
        raise AssertionError("released without cancel")

    monkeypatch.setattr(fit_driver, "run_fit", slow)
    before = profiles(admin_client)
    first = admin_client.post("/admin/fit", json=SMALL_FIT, headers=ADMIN).json()
    second = admin_client.post("/admin/fit", json=SMALL_FIT, headers=ADMIN)
    assert_error(second, 409, text=first["id"])
    assert reported.wait(timeout=30)
    running = admin_client.get(f"/admin/fit/{first['id']}", headers=ADMIN).json()
    assert running["progress"] == pytest.approx(0.35) and running["eta_seconds"] is not None
    cancelled = admin_client.delete(f"/admin/fit/{first['id']}", headers=ADMIN)
    assert cancelled.status_code == 200
    final = wait_final(admin_client, first["id"])
    release.set()
    assert final["state"] == "cancelled"
    assert profiles(admin_client) == before
    listed = admin_client.get("/admin/fit", headers=ADMIN).json()["jobs"]
    assert [j["id"] for j in listed] == [first["id"]]


def test_fit_needs_the_admin_token(client: TestClient, admin_client: TestClient) -> None:
    assert_error(
        client.post("/admin/fit", json=SMALL_FIT, headers=ADMIN), 403, text="MPO_ADMIN_TOKEN"
    )
    assert_error(admin_client.post("/admin/fit", json=SMALL_FIT), 401)
    assert_error(admin_client.get("/admin/fit/abc"), 401)


@pytest.mark.parametrize(
    ("body", "param", "text"),
    [
        (
            {**SMALL_FIT, "samples_per_prompt": 1},
            "samples_per_prompt",
            "greater than or equal to 2",
        ),
        ({**SMALL_FIT, "prompt_file": "p.txt"}, None, "exactly one of prompts"),
        ({**SMALL_FIT, "prompts": []}, "prompts", "at least 1"),
        ({**SMALL_FIT, "step_size": -1}, "step_size", "greater than 0"),
        ({**SMALL_FIT, "profile": "bad name!"}, "profile", "invalid name"),
        ({"prompt_file": "../../etc/passwd"}, "prompt_file", "not a file under"),
        ({"prompt_file": "a\u0000b"}, "prompt_file", "NUL byte"),  # was a 500
        ({"prompt_file": "a" * 5000}, "prompt_file", "not a file under"),  # name too long
        ({"prompt_file": "p.txt/" + "a" * 300}, "prompt_file", "not a file under"),
        ({**SMALL_FIT, "batch_size": 2**64}, "batch_size", "less than or equal to"),
        ({**SMALL_FIT, "prompts": ["ok", "  "]}, "prompts", "non-empty"),
    ],
)
def test_bad_fit_requests_are_400(admin_client: TestClient, body, param, text) -> None:
    response = admin_client.post("/admin/fit", json=body, headers=ADMIN)
    assert_error(response, 400, param=param, text=text)


def test_a_started_job_reads_sampling_not_queued(admin_client: TestClient, monkeypatch) -> None:
    entered, release = threading.Event(), threading.Event()

    def held(engine, prompts, options, progress=None, should_cancel=None):
        entered.set()  # the driver runs, and has reported no progress yet
        assert release.wait(timeout=60)
        from mpo_core.fitting.mirror_descent import FitCancelled

        raise FitCancelled("cancelled")

    monkeypatch.setattr(fit_driver, "run_fit", held)
    job = admin_client.post("/admin/fit", json=SMALL_FIT, headers=ADMIN).json()
    try:
        assert entered.wait(timeout=30)
        running = admin_client.get(f"/admin/fit/{job['id']}", headers=ADMIN).json()
        assert running["state"] == "sampling" and running["started_at"] is not None
    finally:
        release.set()
    assert wait_final(admin_client, job["id"])["state"] == "cancelled"


def test_unknown_job_is_404(admin_client: TestClient) -> None:
    assert_error(admin_client.get("/admin/fit/nope", headers=ADMIN), 404, param="id")
    assert_error(admin_client.delete("/admin/fit/nope", headers=ADMIN), 404)


def test_prompt_file_under_the_data_folder(make_client: ClientFactory, tmp_path: Path) -> None:
    client = make_client(admin_token=ADMIN_TOKEN, data_dir=tmp_path / "data")
    (tmp_path / "data" / "prompts").mkdir(parents=True)
    (tmp_path / "data" / "prompts" / "p.txt").write_text("Hello there\n\nThanks a lot\n")
    body = {k: v for k, v in SMALL_FIT.items() if k != "prompts"} | {"prompt_file": "p.txt"}
    job = client.post("/admin/fit", json=body, headers=ADMIN)
    assert job.status_code == 202, job.text
    final = wait_final(client, job.json()["id"])
    assert final["state"] == "done", final["error"]
    assert final["report"]["num_prompts"] == 2


def test_fit_without_reference_is_400(make_client: ClientFactory, tmp_path: Path) -> None:
    from mpo_core.config import load_config
    from mpo_core.engine.core import Engine
    from mpo_core.runners import load_policy_set
    from mpo_core.testing.families import make_tiny_family

    policy_set = load_policy_set(
        load_config(make_tiny_family(tmp_path / "f", with_reference=False))
    )
    with Engine(policy_set) as engine:
        client = make_client(engine_override=engine, admin_token=ADMIN_TOKEN)
        assert_error(
            client.post("/admin/fit", json=SMALL_FIT, headers=ADMIN), 400, param="reference"
        )


# -- fits to reward sets configured on the server --------------------------------------
REWARDS_YAML = "objectives:\n  polite: {builtin: demo.polite}\n  concise: {builtin: demo.concise}\n"
REWARD_FIT = {**SMALL_FIT, "samples_per_prompt": 2, "reference_samples": 3, "rounds": 1,
              "iterations": 20, "rewards": "tiny"}  # fmt: skip


@pytest.fixture
def rewards_client(make_client: ClientFactory, tmp_path: Path) -> TestClient:
    path = tmp_path / "rewards.yaml"
    path.write_text(REWARDS_YAML)
    return make_client(admin_token=ADMIN_TOKEN, rewards={"tiny": path})


def test_reward_fit_stores_weights_strength_and_report(rewards_client: TestClient) -> None:
    body = {**REWARD_FIT, "profile": "by-rewards", "fit_strength": True}
    job = rewards_client.post("/admin/fit", json=body, headers=ADMIN)
    assert job.status_code == 202, job.text
    final = wait_final(rewards_client, job.json()["id"])
    assert final["state"] == "done", final["error"]
    report = final["report"]
    assert report["rewards"] == "tiny" and set(report["objectives"]) == {"polite", "concise"}
    assert set(report["rows"]) >= {"fitted", "uniform", "reference"}
    stored = rewards_client.get("/admin/profiles/by-rewards", headers=ADMIN).json()
    assert stored["weights"] == pytest.approx(final["weights"])
    assert stored["strength"] == pytest.approx(report["strength"])
    assert stored["meta"]["report"]["rounds"] == report["rounds"]


@pytest.mark.parametrize("name", ["nope", "../rewards.yaml", "mypkg.rewards:brevity"])
def test_reward_fit_names_only_configured_sets(rewards_client: TestClient, name: str) -> None:
    response = rewards_client.post(
        "/admin/fit", json={**REWARD_FIT, "rewards": name}, headers=ADMIN
    )
    assert_error(response, 400, param="rewards")
    assert rewards_client.get("/admin/fit", headers=ADMIN).json()["jobs"] == []


def test_reward_sets_come_from_the_policy_set_yaml(tmp_path: Path) -> None:
    from mpo_core.config import load_config

    (tmp_path / "r.yaml").write_text(REWARDS_YAML)
    family = tmp_path / "family.yaml"
    family.write_text("policies: [{name: a, model: m}]\nrewards: {house: r.yaml}\n")
    assert load_config(family).rewards == {"house": str((tmp_path / "r.yaml").resolve())}


def test_reward_fit_cancelled_mid_round_stores_nothing(
    rewards_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    reached, release = threading.Event(), threading.Event()
    real = reward_fit_driver.sample_mixture

    def held(*args, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("tag") == "fit-r1":  # the first round sampled from a fitted mixture
            reached.set()
            assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(reward_fit_driver, "sample_mixture", held)
    before = profiles(rewards_client)
    job = rewards_client.post("/admin/fit", json={**REWARD_FIT, "profile": "never"}, headers=ADMIN)
    assert job.status_code == 202, job.text
    assert reached.wait(60)  # round 0 is sampled, scored and fitted; round 1 has begun
    cancelled = rewards_client.delete(f"/admin/fit/{job.json()['id']}", headers=ADMIN)
    assert cancelled.status_code == 200
    release.set()
    final = wait_final(rewards_client, job.json()["id"])
    assert final["state"] == "cancelled"
    assert final["weights"] is None and final["profile"] is None
    assert profiles(rewards_client) == before
