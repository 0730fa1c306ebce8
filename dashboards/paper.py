"""Our ranking beside a published one: the ESC paper's design-space figure (CIFAR-10, 1 NFE).

    from dashboards.paper import compare_to_paper
    cmp = compare_to_paper(trials)        # trials: dashboards.tables.load_trials(study)
    cmp.table, cmp.rho, cmp.pairs, cmp.esc
    print("\\n".join(cmp.lines()))

Published: Lin, Hu et al., "On the Design of One-step Diffusion via Shortcutting Flow Paths", ICLR 2026,
Fig. 2: 1-NFE FID on CIFAR-10. ESC itself reports FID 2.85 on ImageNet-256, not a CIFAR-10 number in
that figure: it is taken as "ahead of MeanFlow" (published rank 1, no FID). Spearman's rho uses only the
order, so ESC enters it with that rank.

Which preset a design is: the trial's ``preset`` column (a ``preset`` tag or ``design.preset`` param) when
recorded; otherwise its slug is matched against each preset's slug as ``ablate.design`` resolves it,
ignoring the backbone part (the study picks the backbone). Several designs of one preset (a study that
also searched train settings): the best-ranked one stands for it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pandas as pd
from scipy import stats

from dashboards.tables import compare, rank

SOURCE = ("Lin, Hu et al., On the Design of One-step Diffusion via Shortcutting Flow Paths, ICLR 2026, "
          "Fig. 2 (CIFAR-10, FID at 1 NFE)")
PUBLISHED_FID: dict[str, float | None] = {  # our preset name -> published 1-NFE CIFAR-10 FID
    "esc": None,  # no CIFAR-10 number: "< MeanFlow" (ESC: FID 2.85 on ImageNet-256)
    "meanflow": 3.15,
    "imm": 4.41,
    "sct_linear": 4.46,
    "sct": 7.14,
    "scd": 12.92,
    "ct_linear": 14.82,
    "ct": 18.12,
}
PUBLISHED_ORDER = tuple(PUBLISHED_FID)  # best first; ESC ahead of MeanFlow
LABELS = {"esc": "ESC", "meanflow": "MeanFlow", "imm": "IMM", "sct_linear": "sCT-linear", "sct": "sCT",
          "scd": "SCD", "ct_linear": "CT-linear", "ct": "CT"}
LINEAR_PAIRS = (("ct_linear", "ct"), ("sct_linear", "sct"))  # (linear path, cosine path)
MIN_PRESETS = 3  # the report's paper section needs at least this many of the published presets
OBJECTIVE = "fid/nfe_1"


def published_text(preset: str) -> str:
    v = PUBLISHED_FID.get(preset)
    return f"{v:.2f}" if v is not None else "< MeanFlow (no CIFAR-10 FID)"


@lru_cache(maxsize=1)
def preset_slugs() -> dict[str, tuple[str, str]]:
    """preset -> (slug before the backbone, slug after it), as ``ablate.design`` resolves each preset now."""
    from ablate.design import PRESETS, resolve_design
    from components.registry import DESIGN_KINDS, REGISTRIES

    i = DESIGN_KINDS.index("backbone")
    out = {}
    for name in PRESETS:
        try:
            d = resolve_design({"preset": name}, {"name": "mlp"})
        except Exception:  # noqa: BLE001 - a preset that does not resolve here is simply not matched
            continue
        parts = [REGISTRIES[k].slug(d.name(k), d.kwargs(k)) for k in DESIGN_KINDS]
        out[name] = ("-".join(parts[:i]), "-".join(parts[i + 1:]))
    return out


def preset_of_slug(slug: str, slugs: dict[str, tuple[str, str]] | None = None) -> str | None:
    """The preset whose slug equals ``slug`` up to the backbone part, or None (ambiguous: the longest match)."""
    if not isinstance(slug, str) or not slug:
        return None
    slugs = preset_slugs() if slugs is None else slugs
    hits = [(len(pre) + len(post), name) for name, (pre, post) in slugs.items()
            if (not pre or slug.startswith(pre + "-")) and (not post or slug.endswith("-" + post))
            and len(slug) > len(pre) + len(post) + (1 if pre else 0) + (1 if post else 0)]
    return max(hits)[1] if hits else None


def presets(trials: pd.DataFrame, by: str = "design") -> pd.Series:
    """design -> preset name (None where the design is none of them)."""
    out = {}
    for name, g in trials.groupby(by, sort=False):
        recorded = [p for col in ("preset", "design.preset") if col in g
                    for p in g[col].dropna().astype(str) if p]
        if recorded:
            out[name] = recorded[0]
            continue
        slug = g["slug"].dropna().iloc[0] if "slug" in g and g["slug"].notna().any() else str(name).split(" [")[0]
        out[name] = preset_of_slug(slug)
    return pd.Series(out, dtype=object)


@dataclass
class PaperComparison:
    table: pd.DataFrame  # one row per published preset the study has, in the published order
    rho: float  # Spearman's rho, our order vs the published one, over the presets in ``table``
    rho_p: float
    pairs: pd.DataFrame  # linear vs cosine path: CT vs CT-linear, sCT vs sCT-linear
    esc: dict = field(default_factory=dict)  # ESC vs MeanFlow, paired
    objective: str = OBJECTIVE

    @property
    def n(self) -> int:
        return len(self.table)

    def lines(self) -> list[str]:
        """The comparison as terminal text."""
        if not self.n:
            return [f"paper orderings: none of the published presets ({', '.join(PUBLISHED_ORDER)}) in this study"]
        head = f"ours ({self.objective})"
        w = max(len(head), *(len(s) for s in self.table["ours"])) + 2
        wp = max(len("published"), *(len(s) for s in self.table["published"])) + 2
        out = [f"paper orderings ({SOURCE}):",
               f"  {'preset':<12}{head:<{w}}{'our rank':>8}  {'published':<{wp}}{'rank':>4}"]
        for r in self.table.itertuples():
            out.append(f"  {r.preset:<12}{r.ours:<{w}}{r.our_rank:>8}  {r.published:<{wp}}{r.published_rank:>4}")
        rho = "n/a (fewer than 2 presets)" if not np.isfinite(self.rho) else f"{self.rho:.2f}"
        out.append(f"  Spearman's rho over {self.n} presets: {rho}")
        for r in self.pairs.itertuples():
            out.append(f"  {r.pair}: {r.verdict}")
        if self.esc:
            out.append(f"  ESC vs MeanFlow: {self.esc['verdict']}")
        return out


def compare_to_paper(trials: pd.DataFrame, objective: str = OBJECTIVE, ranking: pd.DataFrame | None = None,
                     by: str = "design") -> PaperComparison:
    """Our per-preset 1-NFE FID beside the published one: ranks, Spearman's rho, linear-vs-cosine, ESC.

    ``table``: preset, design, ours ("geometric mean [95 % interval]" or the n<3 message), ours_gmean,
    ours_low, ours_high, n, our_rank (among these presets, by geometric mean), study_rank, published_fid
    (NaN for ESC), published, published_rank (among these presets). ``pairs``: per (linear, cosine) pair,
    the paired ratio linear/cosine, its interval and separability (``tables.paired``), whether linear is
    ahead (point estimate) and whether that matches the paper (linear ahead in both pairs).
    ``esc``: ratio ESC/MeanFlow, and ``at_least_level``: True unless ESC is separably behind MeanFlow
    (None when undetermined, e.g. n=2 without a wide sampling-SE margin); empty when either is missing.
    """
    ranking = rank(trials, objective, by) if ranking is None else ranking
    of = presets(trials, by)
    r = ranking.copy()
    r["preset"] = r[by].map(of)
    r = r[r["preset"].isin(PUBLISHED_ORDER) & (r["n"] > 0)]
    r = r.sort_values("rank").drop_duplicates("preset")  # the best-ranked design of each preset
    pos = {p: i for i, p in enumerate(PUBLISHED_ORDER)}
    r = r.assign(_pub=r["preset"].map(pos))
    table = pd.DataFrame({
        "preset": r["preset"], "design": r[by],
        "ours": [f"{g:.4g} {iv}" if iv.startswith("[") else f"{g:.4g} ({iv})" for g, iv in zip(r["gmean"],
                                                                                           r["interval"])],
        "ours_gmean": r["gmean"], "ours_low": r["ci_low"], "ours_high": r["ci_high"], "n": r["n"],
        "our_rank": r["gmean"].rank(method="min").astype(int), "study_rank": r["rank"],
        "published_fid": [math.nan if PUBLISHED_FID[p] is None else PUBLISHED_FID[p] for p in r["preset"]],
        "published": [published_text(p) for p in r["preset"]],
        "published_rank": r["_pub"].rank(method="min").astype(int)})
    table = table.sort_values("published_rank").reset_index(drop=True)
    if len(table) >= 2 and table["ours_gmean"].nunique() > 1:
        res = stats.spearmanr(table["ours_gmean"], table["published_rank"])
        rho, rho_p = float(res[0]), float(res[1])
    else:
        rho, rho_p = math.nan, math.nan
    design = dict(zip(table["preset"], table["design"]))
    pairs = []
    for lin, cos in LINEAR_PAIRS:
        if lin not in design or cos not in design:
            continue
        c = compare(trials, design[lin], design[cos], objective, by)
        paper_lin = PUBLISHED_FID[lin] < PUBLISHED_FID[cos]
        ahead = bool(c["diff"] < 0) if np.isfinite(c["diff"]) else None
        if ahead is None:
            verdict = "no seeds in common: undetermined"
        else:
            who = "linear ahead" if ahead else "cosine ahead"
            same = ahead == paper_lin
            if c["separable"] is True:
                tail = "separable, as in the paper" if same else "separable, opposite to the paper"
            elif c["separable"] is False:
                tail = f"not separable ({'same direction as' if same else 'opposite to'} the paper, within noise)"
            else:
                tail = f"undetermined ({'same direction as' if same else 'opposite to'} the paper)"
            verdict = f"{who} (linear/cosine {c['estimate']}): {tail}"
        pairs.append({"pair": f"{LABELS[lin]} vs {LABELS[cos]}", "linear": lin, "cosine": cos,
                      "ratio": c["ratio"], "ratio_low": c["ratio_low"], "ratio_high": c["ratio_high"],
                      "n_paired": c["n_paired"], "separable": c["separable"], "linear_ahead": ahead,
                      "paper_linear_ahead": paper_lin, "as_in_paper": None if ahead is None else ahead == paper_lin,
                      "verdict": verdict})
    pairs = pd.DataFrame(pairs, columns=["pair", "linear", "cosine", "ratio", "ratio_low", "ratio_high", "n_paired",
                                         "separable", "linear_ahead", "paper_linear_ahead", "as_in_paper", "verdict"])
    for c in ("separable", "linear_ahead", "paper_linear_ahead", "as_in_paper"):  # True / False / None (undetermined)
        pairs[c] = pd.Series([None if v is None else bool(v) for v in pairs[c]], index=pairs.index, dtype=object)
    esc = {}
    if "esc" in design and "meanflow" in design:
        c = compare(trials, design["esc"], design["meanflow"], objective, by)
        if not np.isfinite(c["diff"]):
            level, words = None, "no seeds in common: undetermined"
        elif c["separable"] is True:
            level = bool(c["diff"] < 0)
            words = "ESC ahead" if level else "ESC behind MeanFlow"
        elif c["separable"] is False:
            level, words = True, "level (not separable)"
        else:
            level = None
            words = f"undetermined (ESC {'ahead' if c['diff'] < 0 else 'behind'} at the point estimate)"
        esc = {**c, "at_least_level": level,
               "verdict": f"{words} (ESC/MeanFlow {c['estimate']}); paper: ESC ahead of MeanFlow"}
    return PaperComparison(table, rho, rho_p, pairs, esc, objective)
