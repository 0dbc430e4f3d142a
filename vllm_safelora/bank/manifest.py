"""The bank's on-disk schema: file names, the manifest models, and reading a manifest.

On disk a bank is a directory with ``bank.safetensors`` (``<module>.U``:
d_out x k left singular vectors, ``<module>.S``: k singular values) and
``manifest.json`` (:class:`BankManifest`), optionally with safety features
(:class:`SafetyFeaturesManifest`, written by :mod:`.features`).

This module imports no vLLM.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Literal
from collections.abc import Iterable

import torch
from pydantic import BaseModel, Field, ValidationError

from .checkpoints import same_model_ref
from ..errors import BankError
from .model_identity import ModelFingerprint, fingerprint_model

BANK_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "bank.safetensors"
SAFETY_FEATURES_FILE = "safety_features.safetensors"

StorageDType = Literal["float32", "bfloat16", "float16"]
# The torch dtype each storage name means: U is written in it and loaded as it.
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class SourceIdentity(BaseModel):
    ref: str = Field(description="local path or hub id as given to build-bank")
    tensors_sha256: str = Field(description="sha256 over (name, dtype, shape, bytes) of the tensors used")
    # Banks built before these fields existed lack them (None): they are then
    # matched by name only, as before; rebuilding the bank adds them.
    path: str | None = Field(None, description="absolute, symlink-resolved directory read (local checkpoints)")
    hub_id: str | None = Field(None, description="hub repo id (hub checkpoints)")
    revision: str | None = Field(None, description="hub snapshot (commit) that was read (hub checkpoints)")
    fingerprint: ModelFingerprint | None = Field(
        None, description="content fingerprint of all the checkpoint's tensors (vllm_safelora.bank.model_identity)"
    )

    def names(self) -> list[str]:
        """Every name this checkpoint was recorded under."""
        return [n for n in (self.ref, self.path, self.hub_id) if n]


class BankModule(BaseModel):
    name: str = Field(description="module path, e.g. model.layers.0.self_attn.q_proj")
    shape: tuple[int, int] = Field(description="(d_out, d_in) of the weight")
    rank_kept: int
    numerical_rank: int = Field(description="singular values above float32 round-off")
    frobenius_norm: float = Field(description="||V||_F of the untruncated V")
    energy_kept: float = Field(description="sum of kept S^2 / ||V||_F^2")
    approx_error_bound: float = Field(
        description="||C - C_k||_2 for the approximate projection: S_{k+1}^2/||V||_F "
        "(an upper bound when built with a randomized SVD)"
    )


class SafetyFeatureModule(BaseModel):
    name: str
    d_out: int
    rank_kept: int = Field(description="directions stored: min(r_s, numerical rank of the collected outputs)")
    energy_captured: float = Field(description="sum of the kept eigenvalues of Y^T Y / its trace (no centring)")


class SafetyFeaturesManifest(BaseModel):
    """The SaLoRA-style safety features V_s stored beside the bank (optional section)."""

    features_id: str = Field(description="'sf-' + first 16 hex of the features file's sha256; part of policy ids")
    file: str = Field(SAFETY_FEATURES_FILE, description="file in the bank directory holding <module>.Vs")
    tensors_sha256: str
    model: str = Field(description="the model run to collect outputs (the aligned model)")
    prompts_file: str = Field(description="name of the JSONL prompt file as given")
    prompts_sha256: str = Field(description="sha256 of the prompt file's bytes")
    samples: int = Field(description="prompt/response pairs used")
    response_tokens: int = Field(description="response tokens whose outputs were collected (rows of Y)")
    rank: int = Field(description="requested r_s")
    chat_template: bool = Field(description="whether the tokenizer's chat template formatted the samples")
    created_at: str
    modules: list[SafetyFeatureModule]


class BankManifest(BaseModel):
    format_version: int = BANK_FORMAT_VERSION
    bank_id: str
    base: SourceIdentity
    aligned: SourceIdentity
    aliases: list[str] = Field(default_factory=list, description="other names of the aligned (served) model")
    storage_dtype: StorageDType
    svd: Literal["full", "lowrank"]
    truncation: dict[str, float | int | None]
    tensors_sha256: str
    created_at: str
    modules: list[BankModule]
    safety_features: SafetyFeaturesManifest | None = Field(
        None, description="SaLoRA-style safety features stored beside the bank, if built (--safety-prompts)"
    )

    def module(self, name: str) -> BankModule | None:
        return self._by_name().get(name)

    def _by_name(self) -> dict[str, BankModule]:
        return {m.name: m for m in self.modules}

    def protects(self, model_ref: str, extra_aliases: Iterable[str] = ()) -> bool:
        """Is ``model_ref`` (a served model or an adapter's base model) the aligned model?"""
        return self.identify(model_ref, extra_aliases)[0]

    def identify(self, model_ref: str, extra_aliases: Iterable[str] = ()) -> tuple[bool, str]:
        """(is ``model_ref`` the aligned model, why), by name for aliases, by content otherwise.

        * An alias (the manifest's or the operator's) is accepted by name alone:
          that is what aliases are for.
        * When the bank has a fingerprint and ``model_ref`` has a local copy (a
          directory, or a hub id already in the hub cache: nothing is downloaded),
          the weights decide, whatever the name: another path, a relative path, a
          symlink or a copy of the same weights is accepted; other weights under
          the bank's own path are not.
        * Otherwise (banks built before fingerprints, models with no local copy)
          the recorded names decide, as before.
        """
        aliases = [*self.aliases, *extra_aliases]
        if any(same_model_ref(model_ref, a) for a in aliases):
            return True, f"'{model_ref}' is an alias of the aligned model (name-only check)"
        named = any(same_model_ref(model_ref, n) for n in self.aligned.names())
        recorded = self.aligned.fingerprint
        if recorded is not None:
            served = fingerprint_model(model_ref, recorded.mode)
            if served is not None:
                if served.sha256 == recorded.sha256:
                    return True, f"'{model_ref}' has the aligned model's weights ({recorded.mode} fingerprint)"
                return False, (
                    f"'{model_ref}' has other weights than the bank's aligned model '{self.aligned.path or self.aligned.ref}' "
                    f"({recorded.mode} fingerprint {served.sha256[:16]}... vs {recorded.sha256[:16]}...)"
                )
        if named:
            return True, f"'{model_ref}' is the name the bank was built from (weights not compared)"
        why = (
            "no local copy of its weights to compare"
            if recorded is not None
            else (
                "the bank has no weights fingerprint (built before vllm-safelora recorded one; rebuild it to "
                "match models by content)"
            )
        )
        return False, f"'{model_ref}' is not a name of the bank's aligned model {self.aligned.names()} ({why})"


def now() -> str:
    """The manifests' ``created_at`` timestamp (UTC, seconds)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_manifest(bank_dir: Path) -> BankManifest:
    bank_dir = Path(bank_dir)
    path = bank_dir / MANIFEST_FILE
    if not path.is_file():
        raise BankError(
            f"no alignment bank at {bank_dir} ({MANIFEST_FILE} missing); build one with "
            "`vllm-safelora build-bank --base BASE --aligned ALIGNED --out DIR`"
        )
    try:
        manifest = BankManifest.model_validate_json(path.read_text())
    except (ValidationError, ValueError, OSError) as exc:
        raise BankError(f"bank manifest {path} is unreadable or invalid ({exc}); rebuild the bank") from exc
    if manifest.format_version != BANK_FORMAT_VERSION:
        raise BankError(
            f"bank {bank_dir} has format version {manifest.format_version}; this vllm-safelora reads "
            f"version {BANK_FORMAT_VERSION}. Rebuild it with this version's build-bank."
        )
    return manifest


def manifest_json(manifest: BankManifest) -> str:
    """The manifest file's text."""
    return manifest.model_dump_json(indent=2) + "\n"
