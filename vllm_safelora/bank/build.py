"""Building a bank: V = W_aligned - W_base per linear module, streamed one module at a
time, decomposed by SVD with truncation, and written atomically (:mod:`.manifest`).

This module imports no vLLM.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from collections.abc import Callable, Iterable, Sequence

import torch
from safetensors.torch import save_file

from .checkpoints import Checkpoint, TensorHasher, resolve_checkpoint
from ..errors import BankError
from ..fsutil import atomic_directory, sha256_file
from .model_identity import FingerprintMode, fingerprint_directory
from .features import save_features
from .manifest import (
    STORAGE_DTYPES,
    MANIFEST_FILE,
    SAFETY_FEATURES_FILE,
    TENSORS_FILE,
    BankManifest,
    BankModule,
    SourceIdentity,
    StorageDType,
    manifest_json,
    now,
)

if TYPE_CHECKING:
    from .safety_features import SafetyFeatureSpec

# The bank's one logger (vllm_safelora.bank), as before the split into modules.
logger = logging.getLogger(__package__)

# Llama-style projectable linears; the default when --modules is not given.
DEFAULT_MODULE_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Never projectable: embeddings and the output head are not LoRA-on-linear targets here.
_NEVER = ("embed_tokens", "lm_head", "wte", "wpe")


@dataclass(frozen=True)
class Truncation:
    """Keep at most ``rank`` directions, or the fewest reaching ``energy`` of ||V||_F^2."""

    rank: int | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        if self.rank is not None and self.energy is not None:
            raise BankError("choose Truncation.rank or Truncation.energy, not both")
        if self.rank is not None and self.rank < 1:
            raise BankError(f"Truncation.rank must be >= 1, got {self.rank}")
        if self.energy is not None and not (0.0 < self.energy <= 1.0):
            raise BankError(f"Truncation.energy must be in (0, 1], got {self.energy}")


def select_bank_modules(base: Checkpoint, aligned: Checkpoint, suffixes: Sequence[str] | None) -> list[str]:
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
            "check modules=[...] against the checkpoints' tensor names"
        )
    return chosen


def _svd(V: torch.Tensor, svd: str, truncation: Truncation) -> tuple[torch.Tensor, torch.Tensor]:
    if svd == "lowrank":
        if truncation.rank is None:
            raise BankError("svd='lowrank' needs Truncation.rank K (a randomized SVD computes only K directions)")
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
    safety: SafetyFeatureSpec | None = None,
    fingerprint: FingerprintMode | None = "sample",
) -> BankManifest:
    """Build a bank from two checkpoints, one module at a time, and write it atomically.

    ``fingerprint`` ('sample', 'full' or None) records the checkpoints' content
    fingerprints (:mod:`vllm_safelora.bank.model_identity`), by which a server's
    ``--model`` is recognised at start-up whatever its name.

    With ``safety`` (a :class:`vllm_safelora.bank.safety_features.SafetyFeatureSpec`)
    the aligned model is also run on the spec's prompts to store SaLoRA-style
    safety features for every bank module (needs ``transformers``).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise BankError(f"{out_dir} already exists; remove it or pass overwrite=True")
    if storage_dtype not in STORAGE_DTYPES:
        raise BankError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BankError(f"device={device!r} requested but CUDA is not available")

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
        tensors[f"{module}.U"] = U.to(STORAGE_DTYPES[storage_dtype]).cpu()
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


def _write_bank(
    out_dir: Path, tensors: dict, entries: list[BankModule], *, overwrite: bool, features=None, **fields
) -> BankManifest:
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": "vllm-safelora-bank"})
        digest = sha256_file(tmp / TENSORS_FILE)
        safety = save_features(tmp, SAFETY_FEATURES_FILE, features) if features is not None else None
        manifest = BankManifest(
            bank_id=f"sb-{digest[:16]}",
            tensors_sha256=digest,
            created_at=now(),
            modules=entries,
            safety_features=safety,
            **fields,
        )
        (tmp / MANIFEST_FILE).write_text(manifest_json(manifest))
    return manifest
