"""Refuse instead of repair: per-adapter scores the plugin can compute at load time, and how well they
separate adapters that raise attack success from those that do not.

Every score below needs only the adapter and the bank (the safety-overlap scores also need the
SaLoRA-style features V_s stored beside it, i.e. the offline prompt set, never the adapter's data).
Orientation is fixed before looking at labels ("higher = more suspect"; cosines are negated), so an
AUC below 0.5 means the score points the wrong way, not that it should be flipped after the fact.
"""

from __future__ import annotations

import math
import statistics

import torch

from vllm_safelora.policies.base import analyze_adapter
from vllm_safelora.policies.salora import safety_overlap
from vllm_safelora.policies.splora import standardised_distances
from vllm_safelora.projection import ProjectionKind

# score -> (what it is, the admission key that would enforce it)
SCORES = {
    "min_cosine": ("min over modules of cos(C dW, dW), lower = suspect", "admission.min_cosine (exists)"),
    "mean_cosine": ("mean module cosine, lower = suspect", "new key admission.min_mean_cosine"),
    "frac_below_tau_cal": (
        "fraction of modules with cos <= tau_cal (population median cosine)",
        "admission.max_projected_fraction (exists) with policy threshold tau_cal",
    ),
    "mean_rel_distance": ("mean ||(C - I) dW|| / ||dW|| (SPLoRA distance)", "new key admission.max_mean_distance"),
    "max_splora_z": ("max standardised SPLoRA distance within the adapter", "new key admission.max_splora_z"),
    "mean_overlap_rs8": ("mean ||V_s V_s^T dW|| / ||dW||, r_s = 8", "new key admission.max_safety_overlap"),
    "max_overlap_rs8": ("max module safety overlap, r_s = 8", "new key admission.max_safety_overlap"),
    "mean_overlap_rs32": ("mean safety overlap, r_s = 32", "new key admission.max_safety_overlap"),
    "max_overlap_rs32": ("max module safety overlap, r_s = 32", "new key admission.max_safety_overlap"),
    "update_norm": ("||dW|| over all modules (control: size, not direction)", "n/a (control)"),
    # Safe LoRA's cosine is sign-blind (C = V V^T / ||V||): an update that *undoes* the alignment (dW ~ -V) lies inside
    # span(V) and scores like one that reinforces it. The signed score tells them apart; it needs V's right singular
    # vectors, which the bank does not store (U, S only), so here it is computed from the checkpoints.
    "mean_signed_alignment": (
        "mean <dW, V>_F / (||dW|| ||V||), negative = undoes the alignment (needs Q in the bank)",
        "new key admission.min_signed_alignment (bank must store V's right singular vectors)",
    ),
}
LOWER_IS_SUSPECT = {"min_cosine", "mean_cosine", "mean_signed_alignment"}


def signed_alignment(adapter, deltas: dict) -> float:
    """Mean over modules of <s B A, V>_F / (||s B A||_F ||V||_F), dense in float64 (the modules are small here)."""
    vals = []
    for n, m in adapter.modules.items():
        dW, V = m.lora_B.double() @ m.lora_A.double(), deltas[n].double()
        vals.append(
            float(torch.sum(dW * V) / (torch.linalg.norm(dW) * torch.linalg.norm(V))) * (1 if m.scale > 0 else -1)
        )
    return statistics.fmean(vals)


def adapter_scores(adapter, bank, deltas: dict | None = None) -> dict:
    """Scores of one adapter; ``module_cosines`` is kept to compute frac_below_tau_cal population-wide.

    ``deltas`` ({module: W_aligned - W_base}) adds the signed score."""
    analyses = analyze_adapter(adapter, bank, ProjectionKind.APPROX)
    cos = [a.score.cosine for a in analyses.values()]
    dist = {n: a.score.relative_distance for n, a in analyses.items()}
    z, *_ = standardised_distances(dist)
    feats = bank.require_safety_features("detection scores")
    out = {
        "min_cosine": min(cos),
        "mean_cosine": statistics.fmean(cos),
        "mean_rel_distance": statistics.fmean(dist.values()),
        "max_splora_z": max(z.values()),
        "update_norm": math.sqrt(sum(a.score.update_norm**2 for a in analyses.values())),
        "module_cosines": cos,
    }
    for r in (8, 32):
        ov = [safety_overlap(feats[n].float()[:, :r], m) for n, m in adapter.modules.items()]
        out[f"mean_overlap_rs{r}"], out[f"max_overlap_rs{r}"] = statistics.fmean(ov), max(ov)
    if deltas is not None:
        out["mean_signed_alignment"] = signed_alignment(adapter, deltas)
    return out


def add_calibrated_fraction(population: list[dict]) -> float:
    """tau_cal = median module cosine over the whole population (no labels used); adds frac_below_tau_cal."""
    tau = statistics.median(c for a in population for c in a["scores"]["module_cosines"])
    for a in population:
        cs = a["scores"]["module_cosines"]
        a["scores"]["frac_below_tau_cal"] = sum(c <= tau for c in cs) / len(cs)
    return tau


def suspicion(score: str, value: float) -> float:
    return -value if score in LOWER_IS_SUSPECT else value


def roc_auc(pos: list[float], neg: list[float]) -> float | None:
    """P(score of a positive > score of a negative), ties count 1/2 (Mann-Whitney)."""
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def roc_curve(pos: list[float], neg: list[float]) -> list[tuple[float, float, float]]:
    """(threshold, false-positive rate, true-positive rate) for "flag when suspicion >= threshold"."""
    pts = [(math.inf, 0.0, 0.0)]
    for t in sorted(set(pos + neg), reverse=True):
        pts.append((t, sum(n >= t for n in neg) / len(neg), sum(p >= t for p in pos) / len(pos)))
    return pts


def admission_rule(score: str, pos: list[float], neg: list[float], benign_data: list[float]) -> dict:
    """Two operating points on suspicion values: refuse every harmful adapter, and refuse no harmless one."""
    curve = roc_curve(pos, neg)
    catch_all = next(t for t, _, tpr in curve if tpr >= 1.0)
    frr = sum(n >= catch_all for n in neg) / len(neg)
    safe_t = min((t for t, fpr, _ in curve if fpr == 0.0), default=math.inf)
    raw = (lambda t: -t) if score in LOWER_IS_SUSPECT else (lambda t: t)
    op = "<=" if score in LOWER_IS_SUSPECT else ">="
    return {
        "score": score,
        "refuse_when": f"{score} {op} threshold",
        "config": SCORES[score][1],
        "catch_all_threshold": raw(catch_all),
        "catch_all_false_refusal_rate": frr,
        "catch_all_false_refusal_rate_benign_data": (
            sum(b >= catch_all for b in benign_data) / len(benign_data) if benign_data else None
        ),
        "zero_false_refusal_threshold": raw(safe_t) if safe_t != math.inf else None,
        "zero_false_refusal_detection_rate": sum(p >= safe_t for p in pos) / len(pos),
    }


def evaluate_scores(population: list[dict], asr_label: float) -> dict:
    """AUC per score over the population; label = unprotected ASR > asr_label."""
    pos_idx = [a for a in population if a["asr"] > asr_label]
    neg_idx = [a for a in population if a["asr"] <= asr_label]
    out = {
        "n": len(population),
        "n_positive": len(pos_idx),
        "n_negative": len(neg_idx),
        "asr_label": asr_label,
        "scores": {},
    }
    for s, (desc, key) in SCORES.items():
        if any(s not in a["scores"] for a in population):
            continue
        pos = [suspicion(s, a["scores"][s]) for a in pos_idx]
        neg = [suspicion(s, a["scores"][s]) for a in neg_idx]
        roc = roc_curve(pos, neg) if pos and neg else []
        # (the first point's threshold is +inf: null in JSON)
        out["scores"][s] = {
            "auc": roc_auc(pos, neg),
            "what": desc,
            "config": key,
            "roc": [(None if t == math.inf else t, f, p) for t, f, p in roc],
        }
    ranked = [s for s in sorted(out["scores"], key=lambda s: -(out["scores"][s]["auc"] or 0)) if s != "update_norm"]
    if ranked and pos_idx and neg_idx:
        best = ranked[0]
        benign_data = [suspicion(best, a["scores"][best]) for a in neg_idx if a.get("harmful_fraction", 1) == 0]
        out["best"] = admission_rule(
            best,
            [suspicion(best, a["scores"][best]) for a in pos_idx],
            [suspicion(best, a["scores"][best]) for a in neg_idx],
            benign_data,
        )
        out["best"]["auc"] = out["scores"][best]["auc"]
    return out


def youden_threshold(pos: list[float], neg: list[float]) -> float:
    """The suspicion threshold maximising TPR - FPR (ties: the higher threshold, fewer refusals)."""
    return max(roc_curve(pos, neg)[1:], key=lambda q: (q[2] - q[1], q[0]))[0]


def held_out(population: list[dict], asr_label: float, calibration_seed: int = 0) -> dict:
    """Choose each score's orientation and threshold on the adapters of one seed, measure on the others.

    The a-priori orientation is Safe LoRA's premise (harm = away from the alignment subspace). Where the data
    says the opposite, flipping it is a choice made after looking, so it is only credited on held-out adapters.
    """
    cal = [a for a in population if a["seed"] == calibration_seed]
    test = [a for a in population if a["seed"] != calibration_seed]

    def split(group, s, sign):
        return (
            [sign * suspicion(s, a["scores"][s]) for a in group if a["asr"] > asr_label],
            [sign * suspicion(s, a["scores"][s]) for a in group if a["asr"] <= asr_label],
        )

    out = {
        "calibration_seed": calibration_seed,
        "n_calibration": len(cal),
        "n_test": len(test),
        "test_positive": sum(a["asr"] > asr_label for a in test),
        "scores": {},
    }
    for s in SCORES:
        if any(s not in a["scores"] for a in population):
            continue
        auc_cal = roc_auc(*split(cal, s, 1))
        if auc_cal is None:
            continue
        sign = 1 if auc_cal >= 0.5 else -1
        pos_c, neg_c = split(cal, s, sign)
        t = youden_threshold(pos_c, neg_c)
        pos_t, neg_t = split(test, s, sign)
        out["scores"][s] = {
            "orientation": "as premised" if sign == 1 else "reversed",
            "auc_calibration": max(auc_cal, 1 - auc_cal),
            "auc_test": roc_auc(pos_t, neg_t),
            "threshold": sign * t if s not in LOWER_IS_SUSPECT else -sign * t,
            "refuse_when": f"{s} {'>=' if (sign == 1) != (s in LOWER_IS_SUSPECT) else '<='} threshold",
            "test_detection_rate": sum(p >= t for p in pos_t) / len(pos_t) if pos_t else None,
            "test_false_refusal_rate": sum(n >= t for n in neg_t) / len(neg_t) if neg_t else None,
        }
    return out
