"""Plugin configuration: a YAML file named by VLLM_SAFELORA_CONFIG, overridable per key by env.

Every key can be set as ``VLLM_SAFELORA_<KEY>``; nested keys join with ``__``
(``VLLM_SAFELORA_POLICY__THRESHOLD=0.4``). Lists and objects take JSON
(``VLLM_SAFELORA_ADAPTER_DIRS='["/srv/adapters"]'``). Environment beats YAML.
Anything invalid raises :class:`ConfigError` naming the key: the plugin then
stops the server instead of serving unprotected adapters.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from .errors import ConfigError
from .policies import PolicySetting, SafeLoRAConfig
from .policies.tenant_rules import AdmissionConfig, TenantRule  # defined in tenancy; also importable from here

CONFIG_ENV = "VLLM_SAFELORA_CONFIG"
ENV_PREFIX = "VLLM_SAFELORA_"


class HubConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    prefix: str = Field("hub:", description="served names '<prefix><org>/<repo>' are fetched from the hub")
    allow: list[str] = Field(
        default_factory=list,
        description="fnmatch patterns of repo ids tenants may name; empty (the default) admits no repository",
    )
    revision: str | None = None
    local_files_only: bool | None = Field(None, description="None: follow HF_HUB_OFFLINE")


class S3Config(BaseModel):
    """Adapters in S3-compatible object storage, named ``<prefix><tenant>/<adapter>``. Credentials
    come from boto3's standard chain (environment, shared profile, instance or pod role), never
    from this file."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    uri: str | None = Field(
        None, description="s3://bucket/prefix/: 's3:acme/support-bot' reads s3://bucket/prefix/acme/support-bot/"
    )
    prefix: str = Field("s3:", description="served names with this prefix come from this source only")
    endpoint_url: str | None = Field(None, description="an S3-compatible store (MinIO, Ceph, R2); null: AWS")
    region: str | None = None
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(20.0, gt=0, description="one socket read; a store silent this long is 'slow'")
    fetch_timeout_s: float = Field(
        120.0, gt=0, description="wall clock for one adapter's download (both files); beyond it the tenant gets 503"
    )
    retries: int = Field(
        2,
        ge=0,
        le=10,
        description="retries of one request (connection errors, throttling, 5xx) and of a whole fetch whose "
        "objects were rewritten while downloaded",
    )
    retry_after_s: float = Field(5.0, gt=0, description="Retry-After a tenant is told when the store is unavailable")
    staging_dir: Path | None = Field(
        None, description="private directory for downloads in progress (deleted once read); null: the system temp dir"
    )


class SharedCacheConfig(BaseModel):
    """A fleet-shared tier of projected entries in object storage: a replica downloads an entry another
    replica built instead of projecting it again. Entries are authenticated with a keyed MAC under a
    fleet secret (``mac_key_file``), never by the bucket's permissions alone."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    uri: str | None = Field(None, description="s3://bucket/prefix/ where entries are shared")
    mac_key_file: Path | None = Field(
        None, description="file holding the fleet secret (at least 32 bytes; same on every replica)"
    )
    endpoint_url: str | None = None
    region: str | None = None
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(20.0, gt=0)
    fetch_timeout_s: float = Field(120.0, gt=0)
    retries: int = Field(2, ge=0, le=10)


class AuthConfig(BaseModel):
    """Who a caller is (a per-tenant key, or a gateway's tenant header) and what an upload may cost."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="off: every caller may use every adapter (one server, one tenant)")
    keys_file: Path | None = Field(
        None,
        description="hashes of the tenants' and operators' keys (vllm-safelora issue-key); re-read when it changes",
    )
    upload_root: Path | None = Field(
        None,
        description="the one adapter root the server may write (PUT /safelora/v1/adapters/...); one of "
        "adapter_dirs. None: uploads are refused",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list, description="addresses or networks (CIDR) whose tenant_header is believed"
    )
    tenant_header: str | None = Field(None, description="e.g. X-Tenant; only from trusted_proxies")
    max_adapters_per_tenant: int = Field(64, ge=0, description="uploaded adapters a tenant may keep")
    max_bytes_per_tenant: int = Field(4 << 30, ge=0, description="bytes of uploaded adapters a tenant may keep")
    uploads_per_minute: int = Field(10, ge=0, description="uploads a tenant may start per minute (0: no limit)")
    upload_idle_timeout_s: float = Field(
        30.0, gt=0, description="an upload that sends nothing for this long is cut off (408)"
    )
    upload_timeout_s: float = Field(600.0, gt=0, description="an upload must be received within this (408)")

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, v: list[str]) -> list[str]:
        import ipaddress

        for entry in v:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/24)") from None
        return v

    @field_validator("tenant_header")
    @classmethod
    def _header(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}", v):
            raise ValueError(f"{v!r} is not an HTTP header name (letters, digits, '-')")
        if v is not None and v.lower() == "authorization":
            raise ValueError("the tenant header cannot be Authorization, which carries the keys")
        return v


class SafeLoRASettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
    )

    bank: Path = Field(description="alignment bank directory built by `vllm-safelora build-bank`")
    adapter_dirs: list[Path] = Field(
        default_factory=list, description="local adapter roots (names: adapter or tenant/adapter)"
    )
    shared_adapters: list[str] = Field(
        default_factory=list,
        description="operator-shared areas under the adapter_dirs (globs on locations, e.g. 'public/*'): every tenant "
        "may use them and link into them. A tenant's namespace is the first component of its adapter names "
        "(acme in acme/bot); a link leading anywhere else is refused (outside_namespace). Empty: no shared area",
    )
    hub: HubConfig = Field(default_factory=HubConfig)
    s3: S3Config = Field(default_factory=S3Config)
    shared_cache: SharedCacheConfig = Field(default_factory=SharedCacheConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    cache_dir: Path = Field(Path("/var/cache/vllm-safelora"), description="patched-adapter cache")
    cache_max_bytes: int = Field(10 << 30, gt=0, description="byte budget of the cache (LRU eviction)")
    device: str = Field("auto", description="where the bank lives: auto | cpu | cuda:N")
    policy: PolicySetting = Field(default_factory=SafeLoRAConfig, description="default policy")
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    tenants: list[TenantRule] = Field(
        default_factory=list,
        description="first rule whose glob matches the adapter's location (its real path under an adapter root, "
        "or hub:org/repo) wins; others get the defaults. Never matched against a name an API client chose",
    )
    served_names: Literal["location", "label"] = Field(
        "location",
        description="location: an adapter loaded by path (/v1/load_lora_adapter, --lora-modules, offline requests) "
        "must be served under its location's name (tenant/adapter, hub:org/repo), so nobody can load their adapter "
        "under another tenant's name; label: any served name (vLLM's behaviour; for servers whose load endpoint "
        "only operators can reach). Policies follow the location either way",
    )
    max_concurrent_preparations: int = Field(
        2, ge=1, description="adapters read/validated/projected at once in the server; more wait (see below)"
    )
    max_queued_preparations: int = Field(
        32, ge=0, description="adapters waiting for a preparation slot; beyond this a request gets 503 + Retry-After"
    )
    refusal_cache_entries: int = Field(
        4096, ge=0, description="refusals remembered by content hash and file identity (LRU; 0 disables)"
    )
    max_tracked_adapters: int = Field(
        512,
        ge=1,
        description="adapters the server remembers (LRU, separately: entry paths handed to vLLM, names listed as "
        "loaded). Each keeps its cache entry leased, i.e. never evicted; one that drops out is prepared again on its "
        "next request (a cache hit: its upload is read and hashed). Keep it above vLLM's --max-cpu-loras plus the "
        "distinct adapters of requests in flight, or an entry may be evicted while the engine still has to read it. "
        "Memory: its report, about 300 KiB for a 7B adapter on all 224 linear modules (90 KiB on q/v only)",
    )
    shadow: bool = Field(
        False,
        description="report-only everywhere: adapters are served UNPROJECTED while reports and metrics "
        "show what the policy would have done (for roll-out); rules may override it",
    )
    aliases: list[str] = Field(default_factory=list, description="other names of the served (aligned) model")
    require_base_model_match: bool = True
    max_adapter_bytes: int = Field(2 << 30, gt=0, description="refuse adapters larger than this")
    projection_threads: int | None = Field(
        1,
        ge=1,
        description="torch CPU threads in the server process for projection (None: torch's default). "
        "1 avoids fighting vLLM's own CPU threads: measured 19 ms vs 108 ms median per tiny adapter on 2 cores",
    )
    verify_bank: bool = Field(True, description="check the bank's sha256 at start-up")
    verify_cache: bool = Field(True, description="re-hash cache entries before handing them to vLLM")
    allow_untested_vllm: bool = Field(False, description="run on a vLLM version this plugin was not tested with")

    @field_validator("shared_adapters")
    @classmethod
    def _shared(cls, v: list[str]) -> list[str]:
        for glob in v:
            parts = glob.split("/")
            if (
                not glob
                or glob.startswith("/")
                or any(p in ("", ".", "..") for p in parts)
                or any(c in parts[0] for c in "*?[")
            ):
                raise ValueError(
                    f"{glob!r} is not a location glob under the adapter_dirs (relative, no '.' or '..' components, "
                    "a fixed first component such as 'public/*')"
                )
        return v

    @model_validator(mode="after")
    def _auth(self) -> SafeLoRASettings:
        auth = self.auth
        if auth.enabled and auth.keys_file is None:
            raise ValueError(
                "auth.enabled needs auth.keys_file: the operator's admin key lives there even behind a gateway "
                "(create it with `vllm-safelora issue-key --admin NAME --keys-file FILE`)"
            )
        if auth.tenant_header and not auth.trusted_proxies:
            raise ValueError("auth.tenant_header needs auth.trusted_proxies: otherwise any client could name a tenant")
        if auth.upload_root is not None:
            if not auth.enabled:
                raise ValueError("auth.upload_root needs auth.enabled: an upload must know whose namespace it writes")
            roots = {os.path.realpath(d) for d in self.adapter_dirs}
            if os.path.realpath(auth.upload_root) not in roots:
                raise ValueError(
                    f"auth.upload_root {auth.upload_root} is not one of adapter_dirs: uploads would never be served"
                )
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v == "auto" or v == "cpu" or v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("device must be auto, cpu, cuda or cuda:N")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = os.environ.get(CONFIG_ENV)
        if yaml_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


def load_settings(**overrides: Any) -> SafeLoRASettings:
    """Read and validate the configuration, or raise ConfigError saying what to fix."""
    yaml_file = os.environ.get(CONFIG_ENV)
    if yaml_file and not Path(yaml_file).is_file():
        raise ConfigError(f"{CONFIG_ENV}={yaml_file} does not name a readable file")
    if not yaml_file and not any(k.startswith(ENV_PREFIX) for k in os.environ) and not overrides:
        raise ConfigError(
            f"vllm-safelora is installed but not configured: set {CONFIG_ENV} to a YAML file "
            f"(see configs/example.yaml) or {ENV_PREFIX}BANK. Refusing to serve adapters unprotected."
        )
    try:
        return SafeLoRASettings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
        )
        source = yaml_file or "environment"
        raise ConfigError(f"invalid vllm-safelora configuration ({source}): {problems}") from exc
    except Exception as exc:  # YAML syntax errors and the like
        raise ConfigError(f"cannot read vllm-safelora configuration {yaml_file or ''}: {exc}") from exc
