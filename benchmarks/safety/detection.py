"""Refuse instead of repair: per-adapter scores the plugin can compute at load time, and how well they
separate adapters that raise attack success from those that do not (issue 15, item 5).

Every score below needs only the adapter and the bank (the safety-overlap scores also need the
SaLoRA-style features V_s stored beside it, i.e. the offline prompt set, never the adapter's data).
Orientation is fixed before looking at labels ("higher = more suspect"; cosines are negated), so an
AUC below 0.5 means the score points the wrong way, not that it should be flipped after the fact.
"""
from __future__ import annotations

import math
import statistics

from vllm_safelora.policies.base import analyze_adapter
from vllm_safelora.policies.salora_select import safety_overlap
from vllm_safelora.policies.splora import standardised_distances
from vllm_safelora.projection import ProjectionKind

# score -> (what it is, the admission key that would enforce it)
SCORES = {
    "min_cosine": ("min over modules of cos(C dW, dW), lower = suspect", "admission.min_cosine (exists)"),
    "mean_cosine": ("mean module cosine, lower = suspect", "new key admission.min_mean_cosine"),
    "frac_below_tau_cal": ("fraction of modules with cos <= tau_cal (population median cosine)",
                           "admission.max_projected_fraction (exists) with policy threshold tau_cal"),
    "mean_rel_distance": ("mean ||(C - I) dW|| / ||dW|| (SPLoRA distance)", "new key admission.max_mean_distance"),
    "max_splora_z": ("max standardised SPLoRA distance within the adapter", "new key admission.max_splora_z"),
    "mean_overlap_rs8": ("mean ||V_s V_s^T dW|| / ||dW||, r_s = 8", "new key admission.max_safety_overlap"),
    "max_overlap_rs8": ("max module safety overlap, r_s = 8", "new key admission.max_safety_overlap"),
    "mean_overlap_rs32": ("mean safety overlap, r_s = 32", "new key admission.max_safety_overlap"),
    "max_overlap_rs32": ("max module safety overlap, r_s = 32", "new key admission.max_safety_overlap"),
    "update_norm": ("||dW|| over all modules (control: size, not direction)", "n/a (control)"),
}
LOWER_IS_SUSPECT = {"min_cosine", "mean_cosine"}


def adapter_scores(adapter, bank) -> dict:
    """Scores of one adapter; ``module_cosines`` is kept to compute frac_below_tau_cal population-wide."""
    analyses = analyze_adapter(adapter, bank, ProjectionKind.APPROX)
    cos = [a.score.cosine for a in analyses.values()]
    dist = {n: a.score.relative_distance for n, a in analyses.items()}
    z, *_ = standardised_distances(dist)
    feats = bank.require_safety_features("detection scores")
    out = {
        "min_cosine": min(cos), "mean_cosine": statistics.fmean(cos),
        "mean_rel_distance": statistics.fmean(dist.values()), "max_splora_z": max(z.values()),
        "update_norm": math.sqrt(sum(a.score.update_norm ** 2 for a in analyses.values())),
        "module_cosines": cos,
    }
    for r in (8, 32):
        ov = [safety_overlap(feats[n].float()[:, :r], m) for n, m in adapter.modules.items()]
        out[f"mean_overlap_rs{r}"], out[f"max_overlap_rs{r}"] = statistics.fmean(ov), max(ov)
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
        "score": score, "refuse_when": f"{score} {op} threshold", "config": SCORES[score][1],
        "catch_all_threshold": raw(catch_all), "catch_all_false_refusal_rate": frr,
        "catch_all_false_refusal_rate_benign_data": (sum(b >= catch_all for b in benign_data) / len(benign_data)
                                                      if benign_data else None),
        "zero_false_refusal_threshold": raw(safe_t) if safe_t != math.inf else None,
        "zero_false_refusal_detection_rate": sum(p >= safe_t for p in pos) / len(pos),
    }


def evaluate_scores(population: list[dict], asr_label: float) -> dict:
    """AUC per score over the population; label = unprotected ASR > asr_label."""
    pos_idx = [a for a in population if a["asr"] > asr_label]
    neg_idx = [a for a in population if a["asr"] <= asr_label]
    out = {"n": len(population), "n_positive": len(pos_idx), "n_negative": len(neg_idx), "asr_label": asr_label, "scores": {}}
    for s, (desc, key) in SCORES.items():
        pos = [suspicion(s, a["scores"][s]) for a in pos_idx]
        neg = [suspicion(s, a["scores"][s]) for a in neg_idx]
        out["scores"][s] = {"auc": roc_auc(pos, neg), "what": desc, "config": key, "roc": roc_curve(pos, neg) if pos and neg else []}
    ranked = [s for s in sorted(out["scores"], key=lambda s: -(out["scores"][s]["auc"] or 0)) if s != "update_norm"]
    if ranked and pos_idx and neg_idx:
        best = ranked[0]
        benign_data = [suspicion(best, a["scores"][best]) for a in neg_idx if a.get("harmful_fraction", 1) == 0]
        out["best"] = admission_rule(best, [suspicion(best, a["scores"][best]) for a in pos_idx],
                                     [suspicion(best, a["scores"][best]) for a in neg_idx], benign_data)
        out["best"]["auc"] = out["scores"][best]["auc"]
    return out
