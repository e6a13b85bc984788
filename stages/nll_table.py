"""nll_table: reports/nll.csv (one row per trained model), reports/nll_terms.csv (the bound's terms against t) and
reports/nll_comparisons.csv (paired per-image differences between schedules), from nll/<schedule>/seed<k>/nll.npz.

The models come from params.yaml (diffusion.schedules x seeds), not from a glob of nll/. Every model scored the
same held-out images with the same draws, so two schedules compare by the per-image difference of their bpd
(ddpm.metrics.nll.paired), Holm-adjusted over the schedule pairs of each training seed (ddpm.metrics.compare.holm).
Pure functions of their inputs: no timings.
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from ddpm.app.config import load_params
from ddpm.app.paths import NLL_COMPARISONS_CSV, NLL_CSV, NLL_TERMS_CSV, load_arrays, nll_path, setup_logging
from ddpm.io import atomic_path
from ddpm.metrics.compare import holm
from ddpm.metrics.nll import paired, summarize

COLUMNS = ["schedule", "seed", "objective", "variance", "estimator", "n_t", "images", "levels", "bpd", "bpd_lo", "bpd_hi",
           "prior", "decoder", "diffusion"]
TERM_COLUMNS = ["schedule", "seed", "t_lo", "t_hi", "term"]  # term: mean L_t over images and the stratum's t, bits/dim
PAIR_COLUMNS = ["seed", "a", "b", "effect", "lo", "hi", "p", "p_holm", "verdict"]
KEYS = ("bpd", "prior", "decoder", "diffusion", "t", "terms", "weights", "levels", "estimator", "n_t")


def term_rows(schedule: str, seed: int, d) -> list[dict]:
    """Mean L_t per stratum [t_lo, t_hi] (bits/dim): the mean over images of the drawn terms of that stratum."""
    edges = np.concatenate([[1], 1 + np.cumsum(d["weights"])])
    return [{"schedule": schedule, "seed": seed, "t_lo": int(lo), "t_hi": int(hi) - 1, "term": float(d["terms"][:, s].mean())}
            for s, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]


def write(df: pd.DataFrame, path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")


def pairs(per_image: dict, schedules, seeds, alpha: float = 0.05) -> pd.DataFrame:
    """bpd(a) - bpd(b) per image for every schedule pair within each training seed, Holm over each seed's pairs."""
    rows = []
    for seed in seeds:
        found = [(a, b, paired(per_image[(a, seed)], per_image[(b, seed)]))
                 for a, b in itertools.combinations(schedules, 2)]
        adj = holm([e["p"] for _, _, e in found]) if found else []
        for (a, b, e), ph in zip(found, adj):
            verdict = "tie" if ph > alpha else (a if e["effect"] < 0 else b)  # lower bpd wins
            rows.append({"seed": seed, "a": a, "b": b, **e, "p_holm": float(ph), "verdict": verdict})
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def main() -> None:
    log = setup_logging()
    p = load_params()
    rows, terms, per_image = [], [], {}
    for schedule in p.diffusion.schedules:
        for seed in p.seeds:
            d = load_arrays(nll_path(schedule, seed), KEYS)
            s = summarize(d)
            rows.append({"schedule": schedule, "seed": seed, "objective": p.diffusion.objective,
                         "variance": p.diffusion.variance,
                         "estimator": str(d["estimator"]), "n_t": int(d["n_t"]), "levels": int(d["levels"]), **s})
            terms += term_rows(schedule, seed, d)
            per_image[(schedule, seed)] = d["bpd"]
            log.info("nll %s seed %d: %.4f bits/dim [%.4f, %.4f]", schedule, seed, s["bpd"], s["bpd_lo"], s["bpd_hi"])
    write(pd.DataFrame(rows, columns=COLUMNS), NLL_CSV)
    write(pd.DataFrame(terms, columns=TERM_COLUMNS), NLL_TERMS_CSV)
    write(pairs(per_image, p.diffusion.schedules, p.seeds), NLL_COMPARISONS_CSV)


if __name__ == "__main__":
    main()
