"""Profiles and auth through HTTP: versions, rollback, default, persistence, tokens."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from server_helpers import ADMIN, ADMIN_TOKEN, ClientFactory, assert_error

WEIGHTS = {"helpful": 1.0, "harmless": 3.0, "concise": 0.0}


def put(client: TestClient, name: str, body: dict, status: int = 200) -> dict:
    response = client.put(f"/admin/profiles/{name}", json=body, headers=ADMIN)
    assert response.status_code == status, response.text
    return response.json()


def test_admin_disabled_without_token(client: TestClient) -> None:
    error = assert_error(client.get("/admin/profiles"), 403, text="MPO_ADMIN_TOKEN")
    assert error["type"] == "permission_error"
    assert_error(client.put("/admin/profiles/x", json={"weights": WEIGHTS}, headers=ADMIN), 403)


def test_admin_token_required(admin_client: TestClient) -> None:
    assert_error(admin_client.get("/admin/profiles"), 401, text="missing admin token")
    wrong = {"Authorization": "Bearer nope"}
    assert_error(admin_client.get("/admin/profiles", headers=wrong), 401, text="invalid admin")
    basic = {"Authorization": f"Basic {ADMIN_TOKEN}"}
    assert_error(admin_client.get("/admin/profiles", headers=basic), 401)
    assert admin_client.get("/admin/profiles", headers=ADMIN).status_code == 200


def test_api_key(make_client: ClientFactory) -> None:
    client = make_client(api_key="sk-test", admin_token=ADMIN_TOKEN)
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 1}}
    response = client.post("/generate", json=body)
    assert_error(response, 401, text="missing API key")
    assert response.headers["www-authenticate"] == "Bearer"
    assert_error(client.post("/generate", json=body, headers={"Authorization": "Bearer x"}), 401)
    ok = client.post("/generate", json=body, headers={"Authorization": "Bearer sk-test"})
    assert ok.status_code == 200
    assert_error(client.get("/v1/models"), 401)
    assert client.get("/v1/models", headers={"Authorization": "Bearer sk-test"}).status_code == 200
    # the admin token is not an API key and vice versa
    assert_error(client.post("/generate", json=body, headers=ADMIN), 401)
    wrong_admin = {"Authorization": "Bearer sk-test"}
    assert_error(client.get("/admin/profiles", headers=wrong_admin), 401)
    # ops routes stay open for probes and scrapers
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_profile_lifecycle(admin_client: TestClient) -> None:
    created = put(admin_client, "safe", {"weights": WEIGHTS, "meta": {"by": "me"}}, status=201)
    assert created["version"] == 1
    assert created["weights"] == {"helpful": 0.25, "harmless": 0.75, "concise": 0.0}
    second = put(admin_client, "safe", {"weights": [1, 1, 1], "strength": 0.5})
    assert second["version"] == 2 and second["strength"] == 0.5

    current = admin_client.get("/admin/profiles/safe", headers=ADMIN).json()
    assert current["version"] == 2
    first = admin_client.get("/admin/profiles/safe?version=1", headers=ADMIN).json()
    assert first["meta"] == {"by": "me"}
    history = admin_client.get("/admin/profiles/safe/versions", headers=ADMIN).json()
    assert [v["version"] for v in history["versions"]] == [1, 2]

    rolled = put(admin_client, "safe", {"version": 1})
    assert rolled["version"] == 3
    assert rolled["weights"] == created["weights"] and rolled["strength"] == 1.0
    assert rolled["meta"]["rollback_of"] == 1

    listed = admin_client.get("/admin/profiles", headers=ADMIN).json()
    assert listed["default"] is None
    assert [(p["name"], p["version"]) for p in listed["profiles"]] == [("safe", 3)]

    deleted = admin_client.delete("/admin/profiles/safe", headers=ADMIN)
    assert deleted.status_code == 200
    assert_error(admin_client.get("/admin/profiles/safe", headers=ADMIN), 404)
    assert admin_client.get("/admin/profiles", headers=ADMIN).json()["profiles"] == []
    assert_error(admin_client.delete("/admin/profiles/safe", headers=ADMIN), 404)


def test_a_deleted_profile_keeps_its_history_and_is_re_created_visibly(
    admin_client: TestClient,
) -> None:
    created = put(admin_client, "brief", {"weights": WEIGHTS, "default": True}, status=201)
    put(admin_client, "brief", {"weights": [1, 1, 1]})
    assert admin_client.delete("/admin/profiles/brief", headers=ADMIN).status_code == 200

    gone = admin_client.get("/admin/profiles/brief", headers=ADMIN)
    assert_error(gone, 404, param="profile", text="was deleted (version 3)")
    request = {"inputs": "Hi", "parameters": {"profile": "brief", "max_new_tokens": 1}}
    assert_error(admin_client.post("/generate", json=request), 404, text="was deleted")
    plain = admin_client.post("/generate", json={"inputs": "Hi", "parameters": {}})
    assert plain.json()["mixing"]["profile"] is None  # no longer the default
    history = admin_client.get("/admin/profiles/brief/versions", headers=ADMIN).json()
    assert history["deleted"] is True
    assert [(v["version"], v["deleted"]) for v in history["versions"]] == [
        (1, False), (2, False), (3, True),
    ]  # fmt: skip
    assert history["versions"][2]["weights"] == {}
    old = admin_client.get("/admin/profiles/brief?version=1", headers=ADMIN)
    assert old.status_code == 200 and old.json()["weights"] == created["weights"]

    refused = admin_client.put("/admin/profiles/brief", json={"version": 1}, headers=ADMIN)
    error = assert_error(refused, 409, param="version", text="is deleted")
    assert error["code"] == "profile_deleted"
    assert admin_client.get("/admin/profiles/brief/versions", headers=ADMIN).json()["deleted"]

    again = put(admin_client, "brief", {"weights": {"concise": 1}}, status=201)  # re-created
    assert again["version"] == 4
    history = admin_client.get("/admin/profiles/brief/versions", headers=ADMIN).json()
    assert history["deleted"] is False
    assert [v["version"] for v in history["versions"]] == [1, 2, 3, 4]
    rolled = put(admin_client, "brief", {"version": 1})  # live again: rollbacks work
    assert rolled["version"] == 5 and rolled["weights"] == created["weights"]


def test_default_profile_applies_to_requests(admin_client: TestClient) -> None:
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 1}}
    before = admin_client.post("/generate", json=body).json()["mixing"]
    assert before["profile"] is None and len(set(before["weights"].values())) == 1  # uniform
    put(admin_client, "concise-only", {"weights": {"concise": 1}, "default": True}, status=201)
    listed = admin_client.get("/admin/profiles", headers=ADMIN).json()
    assert listed["default"] == "concise-only" and listed["profiles"][0]["is_default"]
    after = admin_client.post("/generate", json=body).json()["mixing"]
    assert after["profile"] == "concise-only" and after["weights"]["concise"] == 1.0
    # explicit weights override the default
    explicit = admin_client.post(
        "/generate", json={**body, "parameters": {"max_new_tokens": 1, "weights": [1, 0, 0]}}
    ).json()["mixing"]
    assert explicit["profile"] is None and explicit["weights"]["helpful"] == 1.0
    cleared = admin_client.put("/admin/profiles", json={"default": None}, headers=ADMIN)
    assert cleared.json()["default"] is None
    assert admin_client.post("/generate", json=body).json()["mixing"]["profile"] is None
    assert_error(admin_client.put("/admin/profiles", json={"default": "ghost"}, headers=ADMIN), 404)


def test_profile_validation(admin_client: TestClient) -> None:
    def bad(name: str, body: dict, param: str | None, status: int = 400) -> None:
        response = admin_client.put(f"/admin/profiles/{name}", json=body, headers=ADMIN)
        assert_error(response, status, param=param)

    bad("p", {"weights": {"ghost": 1.0}}, "weights.ghost")
    bad("p", {"weights": {"helpful": -1.0}}, "weights")
    bad("p", {"weights": {"helpful": 0.0}}, "weights")
    bad("p", {"weights": [1, 2]}, "weights")
    bad("p", {"weights": WEIGHTS, "strength": -1}, "strength")
    bad("p", {}, None)  # neither weights nor version
    bad("p", {"weights": WEIGHTS, "version": 1}, None)
    bad("p", {"weights": WEIGHTS, "colour": "red"}, "colour")
    bad("bad name!", {"weights": WEIGHTS}, "name")
    bad("p", {"version": 4}, "profile", status=404)
    assert admin_client.get("/admin/profiles", headers=ADMIN).json()["profiles"] == []


def test_profiles_survive_restart(make_client: ClientFactory, tmp_path: Path) -> None:
    first = make_client(admin_token=ADMIN_TOKEN)
    put(first, "keep", {"weights": WEIGHTS, "default": True}, status=201)
    put(first, "keep", {"weights": [1, 1, 1]})
    first.__exit__(None, None, None)  # shut the app down (lifespan exit)

    second = make_client(admin_token=ADMIN_TOKEN)  # same data folder
    history = second.get("/admin/profiles/keep/versions", headers=ADMIN).json()["versions"]
    assert [v["version"] for v in history] == [1, 2]
    assert second.get("/admin/profiles", headers=ADMIN).json()["default"] == "keep"
    assert (tmp_path / "data" / "profiles.sqlite3").is_file()


class _UnreachableStore:
    """A backend whose database is down: every call raises StoreUnavailable."""

    def __getattr__(self, name: str) -> object:
        from server.store import StoreUnavailable

        def fail(*args: object, **kwargs: object) -> None:
            raise StoreUnavailable("the profile database at db.example is unreachable")

        return fail


def test_store_outage_is_503_with_its_own_code(admin_client: TestClient) -> None:
    working = admin_client.app.state.store  # type: ignore[attr-defined]
    admin_client.app.state.store = _UnreachableStore()  # type: ignore[attr-defined]
    try:
        response = admin_client.get("/admin/profiles", headers=ADMIN)
        error = assert_error(response, 503, text="unreachable")
        assert error["code"] == "store_unavailable"
        assert error["type"] == "service_unavailable"
        assert response.headers["retry-after"]
    finally:
        admin_client.app.state.store = working  # type: ignore[attr-defined]
