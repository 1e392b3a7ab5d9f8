"""Server settings: pydantic-settings with the ``MPO_`` env prefix; CLI flags map onto them.

Precedence: explicit keyword arguments (what ``mpo serve`` passes from its flags), then
``MPO_*`` environment variables, then the defaults below.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mpo_core.models.personas import MAX_REQUEST_PERSONAS

from .store.base import Family, StoreTimeouts


def default_home() -> Path:
    """``MPO_HOME`` or ``~/.cache/mpo`` (as ``mpo_core.demo``): demo family and data folder."""
    return Path(os.environ.get("MPO_HOME") or "~/.cache/mpo").expanduser()


class Settings(BaseSettings):
    """Everything the HTTP service needs to start; one instance per app."""

    model_config = SettingsConfigDict(env_prefix="MPO_", extra="ignore")

    config: Path | None = None  # policy-set YAML; None: a demo (real if here)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: SecretStr | None = None  # bearer key for inference routes; None: open
    admin_token: SecretStr | None = None  # bearer token for /admin/*; None: admin is off
    home: Path = Field(default_factory=default_home)
    data_dir: Path | None = None  # profile database and fit artefacts; default home/data
    store_url: str | None = None  # sqlite:///path.db (default: under data_dir) or postgresql://
    # The profile store (docs/deploy.md, Profile store outages): a connection, and one
    # statement, give up after these; while the store is down a replica answers the
    # profiles it read at most store_max_stale_s ago from its cache, and pings the store
    # every store_probe_interval_s.
    store_connect_timeout_s: float = Field(default=2.0, gt=0, le=60)
    store_statement_timeout_s: float = Field(default=5.0, gt=0, le=600)
    store_max_stale_s: float = Field(default=600.0, ge=0)
    store_probe_interval_s: float = Field(default=1.0, gt=0, le=60)
    # The key this family's profiles are stored under; default "<served>/<policies,sorted>"
    # (docs/server.md, Profiles and families). Same key: shared profiles; another: separate.
    profile_family: str | None = Field(default=None, min_length=1, max_length=512)
    max_running: int = Field(default=16, ge=1)  # sequences decoded together
    max_queued: int = Field(default=64, ge=1)  # waiting beyond max_running; then 429
    # Prompt tokens prefilled per engine step (chunked prefill, docs/engine.md): a longer
    # prompt runs in chunks between the running requests' decode steps; 0 = whole
    # prompts; unset: the engine's default (EngineLimits).
    prefill_chunk_tokens: int | None = Field(default=None, ge=0)
    max_body_bytes: int = Field(default=1 << 20, ge=1024)  # larger bodies get 413
    max_n: int = Field(default=8, ge=1)  # choices per OpenAI request
    # Personas a request may bring on a persona family (docs/server.md, Request personas)
    max_request_personas: int = Field(default=4, ge=0, le=MAX_REQUEST_PERSONAS)
    max_top_logprobs: int = Field(default=20, ge=0)  # top_n_tokens / top_logprobs cap
    default_max_tokens: int = Field(default=256, ge=1)  # when a request gives none
    retry_after_s: float = Field(default=1.0, gt=0)  # Retry-After on 429
    # KV-cache memory budget: bytes, else this fraction of the memory available when the
    # engine starts (host memory on CPU, free GPU memory on CUDA); docs/models.md.
    kv_cache_bytes: int | None = Field(default=None, ge=1)
    kv_cache_fraction: float = Field(default=0.5, gt=0, le=1)
    # Overrides the policy-set's `cuda_graphs` when set: false decodes eagerly on CUDA
    # (debugging, or a model whose forward cannot be captured).
    cuda_graphs: bool | None = None
    # Overrides the policy-set's `speculative.method` when set (docs/speculative.md).
    speculative: Literal["off", "ngram", "draft"] | None = None
    sse_keepalive_s: float = Field(default=15.0, gt=0)  # comment on a stream idle this long
    # SIGTERM: new requests get 503 while running ones may finish for this long; then the
    # streams still open end with an error event. MPO_SHUTDOWN_TIMEOUT_S is its old name.
    drain_timeout_s: float = Field(
        default=30.0,
        ge=0,
        validation_alias=AliasChoices(
            "drain_timeout_s", "MPO_DRAIN_TIMEOUT_S", "MPO_SHUTDOWN_TIMEOUT_S"
        ),
    )
    body_timeout_s: float = Field(default=30.0, gt=0)  # a request body must arrive within it
    log_level: str = "info"
    # Reward sets a fit may name, beside the policy-set YAML's `rewards:` (which these
    # override): name -> rewards YAML. MPO_REWARDS='{"helpful": "/etc/mpo/rewards.yaml"}'
    rewards: dict[str, Path] = Field(default_factory=dict)

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, token: object) -> object:
        """``MPO_ADMIN_TOKEN=`` (empty) means admin is off (403), not a token nobody can send."""
        value = token.get_secret_value() if isinstance(token, SecretStr) else token
        if isinstance(value, str) and not value.strip():
            return None
        return token

    @model_validator(mode="after")
    def _fill_data_dir(self) -> Settings:
        if self.data_dir is None:
            self.data_dir = self.home / "data"
        return self

    @property
    def data_path(self) -> Path:
        """The data folder, created on first use."""
        assert self.data_dir is not None  # filled by the validator
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return self.data_dir

    def store_timeouts(self) -> StoreTimeouts:
        return StoreTimeouts(self.store_connect_timeout_s, self.store_statement_timeout_s)

    def family(self, served_name: str, policies: Iterable[str]) -> Family:
        """The family whose profiles a server (or ``mpo fit --save``) reads and writes."""
        return Family.of(served_name, policies, key=self.profile_family)

    def resolved_store_url(self) -> str:
        """The profile store's URL; SQLite under the data folder unless one is set."""
        if self.store_url:
            return self.store_url
        return f"sqlite:///{self.data_path / 'profiles.sqlite3'}"
