"""The alignment bank: V = W_aligned - W_base per module, stored as its SVD.

On disk a bank is a directory with ``bank.safetensors`` (``<module>.U``:
d_out x k left singular vectors, ``<module>.S``: k singular values) and
``manifest.json`` (:class:`BankManifest`). Building streams one module at a
time; loading puts U and S on a device in one call and reports the bytes.

Optionally a bank also carries *safety features* for the SaLoRA-style policy:
``safety_features.safetensors`` (``<module>.Vs``: d_out x r_s orthonormal
directions of the aligned model's outputs on harmful prompts with refusals,
see :mod:`vllm_safelora.safety_features`) described by the manifest's
``safety_features`` section. They do not change the bank format or the
``bank_id`` (which stays the digest of ``bank.safetensors``); they have their
own ``features_id`` (digest of their file), which policies that use them fold
into their policy id (:meth:`PolicyConfig.policy_id`), so rebuilding V_s
changes the cache key.

This module imports no vLLM.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Literal, Sequence

import torch
from pydantic import BaseModel, Field, ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoints import Checkpoint, TensorHasher, resolve_checkpoint, same_model_ref
from .errors import BankError
from .fsutil import atomic_directory, sha256_file
from .model_identity import FingerprintMode, ModelFingerprint, fingerprint_directory, fingerprint_model
from .projection import Subspace

if TYPE_CHECKING:
    from .safety_features import SafetyFeatureSpec

logger = logging.getLogger(__name__)

BANK_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "bank.safetensors"
SAFETY_FEATURES_FILE = "safety_features.safetensors"

# Llama-style projectable linears; the default when --modules is not given.
DEFAULT_MODULE_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Never projectable: embeddings and the output head are not LoRA-on-linear targets here.
_NEVER = ("embed_tokens", "lm_head", "wte", "wpe")

StorageDType = Literal["float32", "bfloat16", "float16"]
_DTYPES: dict[str, torch.dtype] = {
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
        None, description="content fingerprint of all the checkpoint's tensors (vllm_safelora.model_identity)"
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
        why = "no local copy of its weights to compare" if recorded is not None else (
            "the bank has no weights fingerprint (built before vllm-safelora recorded one; rebuild it to "
            "match models by content)"
        )
        return False, f"'{model_ref}' is not a name of the bank's aligned model {self.aligned.names()} ({why})"


# ---------------------------------------------------------------------------
# Build


@dataclass(frozen=True)
class Truncation:
    """Keep at most ``rank`` directions, or the fewest reaching ``energy`` of ||V||_F^2."""

    rank: int | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        if self.rank is not None and self.energy is not None:
            raise BankError("choose --rank or --energy, not both")
        if self.rank is not None and self.rank < 1:
            raise BankError(f"--rank must be >= 1, got {self.rank}")
        if self.energy is not None and not (0.0 < self.energy <= 1.0):
            raise BankError(f"--energy must be in (0, 1], got {self.energy}")


def select_bank_modules(
    base: Checkpoint, aligned: Checkpoint, suffixes: Sequence[str] | None
) -> list[str]:
    """Module paths (without '.weight') of the 2-D weights both checkpoints share."""
    shared = sorted(set(base.shards) & set(aligned.shards))
    chosen: list[str] = []
    for tensor in shared:
        if not tensor.endswith(".weight"):
            continue
        module = tensor[: -len(".weight")]
        leaf = module.rsplit(".", 1)[-1]
        if leaf in _NEVER:
            continue
        if suffixes is None:
            if leaf not in DEFAULT_MODULE_SUFFIXES:
                continue
        elif "all-linear" not in suffixes and leaf not in suffixes:
            continue
        if len(aligned.shape(tensor)) != 2:
            continue
        chosen.append(module)
    if not chosen:
        wanted = ",".join(suffixes) if suffixes else ",".join(DEFAULT_MODULE_SUFFIXES)
        raise BankError(
            f"no shared 2-D weights named {wanted} in base '{base.ref}' and aligned '{aligned.ref}'; "
            "check --modules against the checkpoints' tensor names"
        )
    return chosen


def _svd(V: torch.Tensor, svd: str, truncation: Truncation) -> tuple[torch.Tensor, torch.Tensor]:
    if svd == "lowrank":
        if truncation.rank is None:
            raise BankError("--svd lowrank needs --rank K (a randomized SVD computes only K directions)")
        q = min(truncation.rank + 10, min(V.shape))
        # Seeded so the same checkpoints always give the same bank (and bank id).
        with torch.random.fork_rng(devices=[V.device] if V.is_cuda else []):
            torch.manual_seed(0)
            U, S, _ = torch.svd_lowrank(V, q=q, niter=4)
        return U, S
    # A float64 SVD makes C B about 400x more accurate than float32 at 4096
    # dims (design brief, section 6) for ~1.4x the time; stored as float32.
    U, S, _ = torch.linalg.svd(V.double(), full_matrices=False)
    return U.float(), S.float()


def decompose_module(
    V: torch.Tensor, *, svd: str = "full", truncation: Truncation = Truncation()
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """SVD of one alignment matrix with truncation; returns U_k, S_k and manifest stats."""
    V = V.to(torch.float32)
    total_energy = float(torch.sum(V.double() ** 2))
    norm = math.sqrt(total_energy)
    U, S = _svd(V, svd, truncation)
    # The exact projection is defined over the non-zero singular values; those
    # at float32 round-off count as zero there (like torch.linalg.pinv's rtol).
    # The approximate C keeps them all: see projection.Subspace.
    tol = float(S.max()) * max(V.shape) * torch.finfo(torch.float32).eps if S.numel() else 0.0
    numerical_rank = int((S > tol).sum())
    k = S.numel()
    if truncation.rank is not None:
        k = min(k, truncation.rank)
    if truncation.energy is not None and truncation.energy < 1.0 and total_energy > 0:
        cum = torch.cumsum(S.double() ** 2, 0) / total_energy
        k = min(k, int(torch.searchsorted(cum, torch.tensor(truncation.energy - 1e-12, dtype=cum.dtype))) + 1)
    k = max(0, min(k, S.numel())) if total_energy > 0 else 0
    kept_energy = float(torch.sum(S[:k].double() ** 2))
    if svd == "full":
        next_sv = float(S[k]) if k < S.numel() else 0.0
        bound = next_sv * next_sv / norm if norm > 0 else 0.0
    else:
        # S_{k+1}^2 <= the energy the kept directions miss.
        bound = max(total_energy - kept_energy, 0.0) / norm if norm > 0 else 0.0
    stats = {
        "rank_kept": k,
        "numerical_rank": numerical_rank,
        "frobenius_norm": norm,
        "energy_kept": min(1.0, kept_energy / total_energy) if total_energy > 0 else 1.0,
        "approx_error_bound": bound,
    }
    return U[:, :k].contiguous(), S[:k].contiguous(), stats


ProgressFactory = Callable[[Iterable, int, str], Iterable]


def _tqdm_progress(items: Iterable, total: int, desc: str) -> Iterable:
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit="module")


def build_bank(
    base_ref: str,
    aligned_ref: str,
    out_dir: Path,
    *,
    modules: Sequence[str] | None = None,
    truncation: Truncation = Truncation(),
    storage_dtype: StorageDType = "float32",
    device: str = "cpu",
    svd: Literal["full", "lowrank"] = "full",
    aliases: Sequence[str] = (),
    overwrite: bool = False,
    progress: ProgressFactory | None = _tqdm_progress,
    safety: "SafetyFeatureSpec | None" = None,
    fingerprint: FingerprintMode | None = "sample",
) -> BankManifest:
    """Build a bank from two checkpoints, one module at a time, and write it atomically.

    ``fingerprint`` ('sample', 'full' or None) records the checkpoints' content
    fingerprints (:mod:`vllm_safelora.model_identity`), by which a server's
    ``--model`` is recognised at start-up whatever its name.

    With ``safety`` (a :class:`vllm_safelora.safety_features.SafetyFeatureSpec`)
    the aligned model is also run on the spec's prompts to store SaLoRA-style
    safety features for every bank module (needs ``transformers``).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise BankError(f"{out_dir} already exists; remove it or pass --overwrite")
    if storage_dtype not in _DTYPES:
        raise BankError(f"storage dtype must be one of {sorted(_DTYPES)}, got {storage_dtype}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BankError(f"--device {device} requested but CUDA is not available")

    base = resolve_checkpoint(base_ref)
    aligned = resolve_checkpoint(aligned_ref)
    names = select_bank_modules(base, aligned, modules)
    base_hash, aligned_hash = TensorHasher(), TensorHasher()
    tensors: dict[str, torch.Tensor] = {}
    entries: list[BankModule] = []

    iterator: Iterable[str] = names
    if progress is not None:
        iterator = progress(names, len(names), "build-bank")
    for module in iterator:
        key = f"{module}.weight"
        w_base, w_aligned = base.read(key), aligned.read(key)
        if w_base.shape != w_aligned.shape:
            raise BankError(
                f"{key}: base '{base.ref}' has shape {tuple(w_base.shape)}, aligned '{aligned.ref}' "
                f"has {tuple(w_aligned.shape)}; the two checkpoints are not the same architecture"
            )
        shape = (int(w_base.shape[0]), int(w_base.shape[1]))
        base_hash.update(key, w_base)
        aligned_hash.update(key, w_aligned)
        V = w_aligned.to(dev, torch.float32) - w_base.to(dev, torch.float32)
        del w_base, w_aligned
        if not torch.isfinite(V).all():
            raise BankError(f"{key}: W_aligned - W_base has NaN/Inf values; check both checkpoints")
        U, S, stats = decompose_module(V, svd=svd, truncation=truncation)
        del V
        if stats["frobenius_norm"] == 0.0:
            logger.warning(
                "%s is identical in base and aligned: its alignment subspace is empty, so the Safe LoRA "
                "policy will never project it (like the reference). Leave it out with --modules if unwanted.",
                module,
            )
        tensors[f"{module}.U"] = U.to(_DTYPES[storage_dtype]).cpu()
        tensors[f"{module}.S"] = S.to(torch.float32).cpu()
        entries.append(BankModule(name=module, shape=shape, **stats))

    features = None
    if safety is not None:
        from .safety_features import compute_safety_features

        features = compute_safety_features(
            aligned.ref, {e.name: e.shape for e in entries}, safety, device=device, show_progress=progress is not None
        )

    return _write_bank(
        out_dir,
        tensors,
        entries,
        base=_identity(base, base_hash.hexdigest(), fingerprint),
        aligned=_identity(aligned, aligned_hash.hexdigest(), fingerprint),
        aliases=list(aliases),
        storage_dtype=storage_dtype,
        svd=svd,
        truncation={"rank": truncation.rank, "energy": truncation.energy},
        overwrite=overwrite,
        features=features,
    )


def _identity(checkpoint: Checkpoint, tensors_sha256: str, fingerprint: FingerprintMode | None) -> SourceIdentity:
    """Everything that identifies a checkpoint later: its names, resolved, and its content."""
    local = Path(checkpoint.ref).expanduser().is_dir()
    return SourceIdentity(
        ref=checkpoint.ref,
        tensors_sha256=tensors_sha256,
        path=str(checkpoint.directory.resolve()) if local else None,
        hub_id=None if local else checkpoint.ref,
        revision=None if local else checkpoint.directory.name,
        fingerprint=fingerprint_directory(checkpoint.directory, fingerprint) if fingerprint else None,
    )


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _save_features(directory: Path, fname: str, features) -> SafetyFeaturesManifest:
    """Write ``features`` (a ComputedSafetyFeatures) to ``directory/fname`` and describe it."""
    save_file(features.tensors, str(directory / fname), metadata={"format": "vllm-safelora-safety-features"})
    digest = sha256_file(directory / fname)
    return SafetyFeaturesManifest(
        features_id=f"sf-{digest[:16]}", file=fname, tensors_sha256=digest, created_at=_now(), **features.info
    )


def _write_bank(
    out_dir: Path, tensors: dict, entries: list[BankModule], *, overwrite: bool, features=None, **fields
) -> BankManifest:
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": "vllm-safelora-bank"})
        digest = sha256_file(tmp / TENSORS_FILE)
        safety = _save_features(tmp, SAFETY_FEATURES_FILE, features) if features is not None else None
        manifest = BankManifest(
            bank_id=f"sb-{digest[:16]}",
            tensors_sha256=digest,
            created_at=_now(),
            modules=entries,
            safety_features=safety,
            **fields,
        )
        (tmp / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
    return manifest


def add_safety_features(
    bank_dir: Path,
    spec: "SafetyFeatureSpec",
    *,
    model: str | None = None,
    device: str = "cpu",
    show_progress: bool = True,
) -> BankManifest:
    """Compute safety features for an existing bank and attach them (replacing any earlier ones).

    ``model`` defaults to the bank's aligned model. The new features go to a file
    named after their digest, then the manifest is replaced atomically, so a
    reader sees the old or the new features, never a mix. The bank_id does not change.
    """
    from .safety_features import compute_safety_features

    bank_dir = Path(bank_dir)
    manifest = read_manifest(bank_dir)
    features = compute_safety_features(
        model or manifest.aligned.ref, {m.name: m.shape for m in manifest.modules}, spec,
        device=device, show_progress=show_progress,
    )
    tmp_name = f".{SAFETY_FEATURES_FILE}.tmp-{os.getpid()}"
    try:
        section = _save_features(bank_dir, tmp_name, features)
        final = f"safety_features-{section.tensors_sha256[:16]}.safetensors"
        os.replace(bank_dir / tmp_name, bank_dir / final)
    finally:
        (bank_dir / tmp_name).unlink(missing_ok=True)
    section = section.model_copy(update={"file": final})
    old = manifest.safety_features
    manifest = manifest.model_copy(update={"safety_features": section})
    tmp_manifest = bank_dir / f".{MANIFEST_FILE}.tmp-{os.getpid()}"
    tmp_manifest.write_text(manifest.model_dump_json(indent=2) + "\n")
    with open(tmp_manifest, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp_manifest, bank_dir / MANIFEST_FILE)
    if old is not None and old.file != final:
        (bank_dir / old.file).unlink(missing_ok=True)
    return manifest


# ---------------------------------------------------------------------------
# Load


@dataclass
class AlignmentBank:
    """A bank resident on one device, ready for projection."""

    manifest: BankManifest
    subspaces: dict[str, Subspace]
    device: torch.device
    nbytes: int
    path: Path
    safety_features: dict[str, torch.Tensor] | None = None
    """SaLoRA-style V_s per module (d_out x r_s, float32, orthonormal columns), if the bank has them."""

    @property
    def bank_id(self) -> str:
        return self.manifest.bank_id

    @property
    def features_id(self) -> str | None:
        """Identity of the loaded safety features (None without them); not part of bank_id."""
        if self.safety_features is None or self.manifest.safety_features is None:
            return None
        return self.manifest.safety_features.features_id

    def require_safety_features(self, policy: str = "this policy") -> dict[str, torch.Tensor]:
        if self.safety_features is None:
            raise BankError(
                f"{policy} needs safety features (V_s), but bank {self.path} ({self.bank_id}) has none; build them with "
                "`vllm-safelora build-bank ... --safety-prompts FILE.jsonl [--safety-rank 32]` "
                "(or --features-only to add them to an existing bank)"
            )
        return self.safety_features

    def get(self, module: str) -> Subspace | None:
        return self.subspaces.get(module)

    @classmethod
    def described(cls, path: Path, manifest: BankManifest) -> "AlignmentBank":
        """The bank as its manifest describes it, with no tensor loaded (empty subspaces and features).

        For checks of what a policy needs (``validate_bank``) without the memory of a
        load: ``vllm-safelora doctor`` on a 20 GiB bank. Never project with it.
        """
        section = manifest.safety_features
        features = {m.name: torch.empty(0) for m in section.modules} if section is not None else None
        return cls(manifest=manifest, subspaces={}, device=torch.device("cpu"), nbytes=0, path=Path(path),
                   safety_features=features)


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


def resolve_device(device: str) -> torch.device:
    """'auto' means CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise BankError(f"invalid device '{device}' (use auto, cpu or cuda:N)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BankError(f"device '{device}' requested but CUDA is not available in this process")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BankError(f"device '{device}' does not exist ({torch.cuda.device_count()} CUDA devices)")
    elif dev.type != "cpu":
        raise BankError(f"unsupported device '{device}' (use auto, cpu or cuda:N)")
    return dev


def verify_bank_tensors(bank_dir: Path, manifest: BankManifest) -> None:
    """Raise BankError unless bank.safetensors has the sha256 the manifest records."""
    if not (Path(bank_dir) / TENSORS_FILE).is_file():
        raise BankError(f"bank {bank_dir} has no {TENSORS_FILE}; rebuild it")
    digest = sha256_file(Path(bank_dir) / TENSORS_FILE)
    if digest != manifest.tensors_sha256:
        raise BankError(
            f"bank {bank_dir} is corrupt: {TENSORS_FILE} has sha256 {digest[:16]}..., the manifest "
            f"says {manifest.tensors_sha256[:16]}...; rebuild the bank"
        )


def verify_bank_files(bank_dir: Path, manifest: BankManifest) -> None:
    """Every file the manifest names has its recorded sha256; no tensor is loaded (``vllm-safelora doctor``)."""
    verify_bank_tensors(bank_dir, manifest)
    if manifest.safety_features is not None:
        _verify_features_file(Path(bank_dir), manifest.safety_features)


def _features_path(bank_dir: Path, section: SafetyFeaturesManifest) -> Path:
    path = bank_dir / section.file
    if Path(section.file).name != section.file or not path.is_file():
        raise BankError(f"bank {bank_dir}: the manifest names safety features {section.file!r}, which is missing; "
                        "rebuild them with --safety-prompts")
    return path


def _verify_features_file(bank_dir: Path, section: SafetyFeaturesManifest) -> None:
    digest = sha256_file(_features_path(bank_dir, section))
    if digest != section.tensors_sha256:
        raise BankError(
            f"bank {bank_dir}: safety features {section.file} have sha256 {digest[:16]}..., the manifest says "
            f"{section.tensors_sha256[:16]}...; rebuild them"
        )


def load_bank(bank_dir: Path, device: str = "cpu", *, verify: bool = True) -> AlignmentBank:
    """Read a bank onto ``device`` ('cpu', 'cuda:N', 'auto'); verifies its hash by default."""
    bank_dir = Path(bank_dir)
    manifest = read_manifest(bank_dir)
    dev = resolve_device(device)
    tensors_path = bank_dir / TENSORS_FILE
    if not tensors_path.is_file():
        raise BankError(f"bank {bank_dir} has no {TENSORS_FILE}; rebuild it")
    if verify:
        verify_bank_tensors(bank_dir, manifest)
    subspaces: dict[str, Subspace] = {}
    nbytes = 0
    try:
        with safe_open(str(tensors_path), framework="pt", device="cpu") as f:
            present = set(f.keys())
            for m in manifest.modules:
                for suffix in ("U", "S"):
                    if f"{m.name}.{suffix}" not in present:
                        raise BankError(f"bank {bank_dir} lacks tensor {m.name}.{suffix}; rebuild it")
                U = f.get_tensor(f"{m.name}.U")
                S = f.get_tensor(f"{m.name}.S")
                if tuple(U.shape) != (m.shape[0], m.rank_kept) or tuple(S.shape) != (m.rank_kept,):
                    raise BankError(
                        f"bank {bank_dir}: {m.name} tensors have shapes {tuple(U.shape)}/{tuple(S.shape)}, "
                        f"the manifest says ({m.shape[0]}, {m.rank_kept}); rebuild it"
                    )
                U, S = U.to(dev), S.to(dev)
                nbytes += U.numel() * U.element_size() + S.numel() * S.element_size()
                subspaces[m.name] = Subspace(
                    U=U, S=S, frobenius_norm=m.frobenius_norm, numerical_rank=min(m.numerical_rank, m.rank_kept)
                )
    except BankError:
        raise
    except Exception as exc:  # safetensors parse errors, OOM on device
        raise BankError(f"bank {bank_dir} could not be loaded onto {dev}: {exc}") from exc
    features = None
    if manifest.safety_features is not None:
        features = _load_safety_features(bank_dir, manifest, dev, verify=verify)
        nbytes += sum(t.numel() * t.element_size() for t in features.values())
    logger.info(
        "loaded alignment bank %s (%d modules, %.1f MiB) onto %s",
        manifest.bank_id, len(subspaces), nbytes / 2**20, dev,
    )
    return AlignmentBank(
        manifest=manifest, subspaces=subspaces, device=dev, nbytes=nbytes, path=bank_dir, safety_features=features
    )


def _load_safety_features(
    bank_dir: Path, manifest: BankManifest, dev: torch.device, *, verify: bool
) -> dict[str, torch.Tensor]:
    section = manifest.safety_features
    assert section is not None
    path = _features_path(bank_dir, section)
    if verify:
        _verify_features_file(bank_dir, section)
    bank_modules = {m.name: m for m in manifest.modules}
    listed = {m.name: m for m in section.modules}
    if set(listed) != set(bank_modules):
        missing = sorted(set(bank_modules) - set(listed))[:5]
        raise BankError(f"bank {bank_dir}: safety features do not cover the bank's modules (missing e.g. {missing}); "
                        "rebuild them")
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            present = set(f.keys())
            for name, m in listed.items():
                key = f"{name}.Vs"
                if key not in present:
                    raise BankError(f"bank {bank_dir}: safety features lack {key}; rebuild them")
                Vs = f.get_tensor(key)
                if tuple(Vs.shape) != (bank_modules[name].shape[0], m.rank_kept):
                    raise BankError(
                        f"bank {bank_dir}: {key} has shape {tuple(Vs.shape)}, expected "
                        f"({bank_modules[name].shape[0]}, {m.rank_kept}); rebuild them"
                    )
                out[name] = Vs.to(device=dev, dtype=torch.float32)
    except BankError:
        raise
    except Exception as exc:
        raise BankError(f"bank {bank_dir}: safety features could not be loaded onto {dev}: {exc}") from exc
    return out


def dense_bank_bytes(manifest: BankManifest, bytes_per_element: int = 4) -> int:
    """What the reference keeps: one dense d_out x d_out C per module."""
    return sum(m.shape[0] * m.shape[0] * bytes_per_element for m in manifest.modules)


