"""Controls for Safe LoRA's choices, at the same number of modules.

Safe LoRA makes two choices: WHICH modules to change (lowest cos(C dW, dW)) and HOW (lora_B := C lora_B).
Each control keeps one of them and replaces the other, so a comparison isolates it:

* ``random_projection``: project k *randomly chosen* modules with the same C -> does the selection matter?
* ``attenuate``: scale the *selected* modules' lora_B by ||C dW||_F / ||dW||_F, the same update-norm
  reduction as projecting them, without changing direction -> does the direction matter, or is
  "projection" just shrinkage? (In the miniature every eigenvalue of C = V V^T / ||V||_F is < 1.)
* ``prune``: remove the selected modules -> is projecting better than dropping them?
* no adapter at all is the aligned model's row.

For SaLoRA-style projection the analogous control is ``random_subspace``: remove a random r_s-dimensional
subspace of the module's output space instead of the top safety-feature directions.

Everything works on ``{module: Update}`` maps (``inprocess.Update``) and the bank's approximate C.
"""

from __future__ import annotations

import math
import random

import torch

from vllm_safelora.projection import ProjectionKind, apply_operator

from .inprocess import Update


def _gram_norm_sq(B: torch.Tensor, G: torch.Tensor) -> float:
    """||B A||_F^2 = tr(B^T B G) with G = A A^T, in float64."""
    B = B.double()
    return max(float(torch.sum((B.T @ B) * G)), 0.0)


def projected(bank, u: Update, name: str) -> Update:
    """Safe LoRA's approximate projection of one module: lora_B := C lora_B."""
    return Update(u.A, apply_operator(bank.get(name), u.B, ProjectionKind.APPROX).cpu(), u.scale)


def shrink_factor(bank, u: Update, name: str) -> float:
    """||C dW||_F / ||dW||_F: the norm reduction the projection would apply to this module."""
    G = u.A.double() @ u.A.double().T
    den = _gram_norm_sq(u.B, G)
    return math.sqrt(_gram_norm_sq(projected(bank, u, name).B, G) / den) if den > 0 else 0.0


def project_modules(updates: dict[str, Update], bank, names) -> dict[str, Update]:
    return {n: projected(bank, u, n) if n in names else u for n, u in updates.items()}


def random_modules(updates: dict[str, Update], k: int, rng: random.Random) -> set[str]:
    return set(rng.sample(sorted(updates), min(k, len(updates))))


def attenuate(updates: dict[str, Update], bank, names) -> dict[str, Update]:
    return {n: Update(u.A, u.B * shrink_factor(bank, u, n), u.scale) if n in names else u for n, u in updates.items()}


def prune(updates: dict[str, Update], names) -> dict[str, Update]:
    return {n: u for n, u in updates.items() if n not in names}


def random_subspace(updates: dict[str, Update], rank: int, seed: int) -> dict[str, Update]:
    """lora_B := (I - R R^T) lora_B with R a random orthonormal d_out x r_s basis per module."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, u in sorted(updates.items()):
        R, _ = torch.linalg.qr(torch.randn(u.B.shape[0], rank, generator=gen, dtype=torch.float64))
        B = u.B.double()
        out[n] = Update(u.A, (B - R @ (R.T @ B)).to(u.B.dtype), u.scale)
    return out
