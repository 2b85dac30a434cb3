"""A suite's results in the paper's tables, its claims' verdicts and its plots.

Each variant finds its table by how its config differs from the reference UniInst's
(:func:`variant_roles`): only ``model.oyor.alpha`` → Table 4; only 3DMF and re-ranking →
Table 5; only the auxiliary loss → Table 6. The baseline and the reference make Table 1, and
every variant is also shown on the occlusion split (Table 7). A cell is "ours mean ± std over
seeds (paper's value)"; a claim's verdict is computed from the rows, never written by hand.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy.stats import t as t_dist

from uniinst.config import to_dict
from uniinst.reproduce.suite import SuiteConfig

RESULT_KEYS = ("variant", "seed", "split", "nms", "AP", "AP50", "AP75", "AR100", "duplicates_per_gt", "iterations")

# The paper's numbers (COCO val, R-50; Table 7 on OCHuman), from the method spec §8.
PAPER_T1 = {"uniinst": {"mask": 38.5, "none": 38.3}, "baseline": {"mask": 37.5, "none": 18.1}}
PAPER_T4 = {0.0: 33.5, 0.2: 33.8, 0.4: 34.4, 0.6: 36.1, 0.8: 37.1, 0.9: 37.9, 1.0: 11.8}
PAPER_T5 = {(False, False): 35.6, (True, False): 36.4, (False, True): 36.8, (True, True): 37.9}
PAPER_T6 = {False: 37.1, True: 37.9}
PAPER_T7 = {"uniinst": 40.2, "baseline": 31.8}

_ALPHA = "model.oyor.alpha"
_TABLE5_KEYS = {"model.max_filter.enabled", "model.rerank"}
_AUX = "model.aux.enabled"
# Keys that do not make a variant another method: how it is scored, seeded or named.
_IGNORED_PREFIXES = ("model.inference.", "train.", "name", "ray.")


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{full}."))
        else:
            out[full] = value
    return out


@dataclass(frozen=True)
class Role:
    """Where a variant appears: ``table`` ("1", "4", "5", "6" or "" for none of them) and
    the settings that place it there."""

    table: str
    settings: dict[str, Any]


def variant_roles(suite: SuiteConfig) -> dict[str, Role]:
    reference = _flat(to_dict(suite.variant_config(suite.reference)))
    roles = {}
    for name in suite.variants:
        flat = _flat(to_dict(suite.variant_config(name)))
        diff = {
            k for k in set(flat) | set(reference)
            if flat.get(k) != reference.get(k) and not k.startswith(_IGNORED_PREFIXES)
        }
        settings = {k: flat[k] for k in (_ALPHA, *sorted(_TABLE5_KEYS), _AUX)}
        if name in (suite.reference, suite.baseline):
            table = "1"
        elif diff == {_ALPHA}:
            table = "4"
        elif diff and diff <= _TABLE5_KEYS:
            table = "5"
        elif diff == {_AUX}:
            table = "6"
        else:
            table = ""
        roles[name] = Role(table, settings)
    return roles


# --------------------------------------------------------------------------- cells


class Rows:
    """The results rows, looked up by (variant, split, nms) across seeds."""

    def __init__(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self.rows = list(rows)

    def values(self, variant: str, split: str, nms: str, key: str = "AP") -> dict[int, float]:
        return {
            int(r["seed"]): float(r[key]) for r in self.rows
            if r["variant"] == variant and r["split"] == split and r["nms"] == nms
        }

    def has(self, variant: str, split: str, nms: str) -> bool:
        return bool(self.values(variant, split, nms))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value; NaN for none)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: Sequence[float], paper: float | None = None, digits: int = 1) -> str:
    if not values:
        return "—"
    m, s = mean_std(values)
    text = f"{m:.{digits}f} ± {s:.{digits}f}"
    return f"{text} ({paper:.1f})" if paper is not None else text


def _named(variant: str) -> str:
    return f"`{variant}`" if variant else "(not in this suite)"


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


# --------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims, checked on the rows: ``holds`` is None when a run it needs
    is missing; ``within_noise`` names the differences whose 95 % confidence interval over the
    seeds (Student's t) holds the claim's bound, so that more seeds could turn the verdict."""

    tag: str
    text: str
    holds: bool | None
    numbers: str
    within_noise: tuple[str, ...] = ()

    def line(self) -> str:
        verdict = {True: "**holds**", False: "**does not hold**", None: "not measured"}[self.holds]
        if self.within_noise:
            noisy = ", ".join(self.within_noise)
            verdict += f", inside the seeds' noise ({noisy}: the bound lies in its 95 % confidence interval)"
        return f"- ({self.tag}) {self.text}: {verdict}. {self.numbers}"


@dataclass(frozen=True)
class Bound:
    """What a paired difference's mean must be for a claim to hold: above ``value`` or below it
    (or equal to it, when ``inclusive``)."""

    value: float
    above: bool = True
    inclusive: bool = False

    def passes(self, mean: float) -> bool:
        if self.inclusive and mean == self.value:
            return True
        return mean > self.value if self.above else mean < self.value

    def within_noise(self, diffs: Sequence[float]) -> bool:
        """Whether the bound lies in the 95 % confidence interval of the mean of ``diffs``
        (Student's t over the seeds; two seeds or more). With two seeds the interval is
        ±12.7 standard errors: two seeds rarely settle a difference."""
        if len(diffs) < 2:
            return False
        mean, std = mean_std(diffs)
        return abs(mean - self.value) < t_dist.ppf(0.975, len(diffs) - 1) * std / math.sqrt(len(diffs))


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> list[float]:
    """Per-seed differences a − b over the seeds both have (the runs of a seed share data order)."""
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def _diff_text(name: str, diffs: Sequence[float]) -> str:
    m, s = mean_std(diffs)
    return f"{name} {m:+.1f} ± {s:.1f} AP over {len(diffs)} seed(s)"


def _compare(
    tag: str, text: str, pairs: Sequence[tuple[str, Mapping[int, float], Mapping[int, float]]], bound: Bound,
) -> Claim:
    """A claim that holds when every named paired difference's mean passes ``bound``."""
    parts, verdicts, noisy = [], [], []
    for name, a, b in pairs:
        diffs = paired(a, b)
        if not diffs:
            return Claim(tag, text, None, f"{name}: a run is missing")
        parts.append(_diff_text(name, diffs))
        verdicts.append(bound.passes(statistics.fmean(diffs)))
        if bound.within_noise(diffs):
            noisy.append(name)
    return Claim(tag, text, all(verdicts), "; ".join(parts) + ".", tuple(noisy))


class SuiteReport:
    """The report of one suite's rows: the paper's tables, the claims, the plots."""

    def __init__(self, suite: SuiteConfig, rows: Sequence[Mapping[str, Any]]) -> None:
        self.suite, self.rows = suite, Rows(rows)
        self.roles = variant_roles(suite)
        self.main, self.heavy = suite.main_split, suite.occlusion_split
        self.nms_mode = next((m for m in suite.nms if m != "none"), "")

    # variants by their place in the paper
    def _with(self, table: str) -> list[str]:
        """The variants of ``table``, the reference among them (it is every table's default)."""
        return [self.suite.reference] + [v for v, r in self.roles.items() if r.table == table]

    def _alpha(self, value: float) -> str | None:
        return next((v for v in self._with("4") if math.isclose(self.roles[v].settings[_ALPHA], value)), None)

    def _table5(self, max_filter: bool, rerank: bool) -> str | None:
        want = {"model.max_filter.enabled": max_filter, "model.rerank": rerank}
        return next(
            (v for v in self._with("5") if all(self.roles[v].settings[k] == x for k, x in want.items())), None
        )

    def _aux(self, enabled: bool) -> str | None:
        return next((v for v in self._with("6") if self.roles[v].settings[_AUX] == enabled), None)

    def ap(self, variant: str | None, nms: str = "none", split: str | None = None, key: str = "AP") -> dict[int, float]:
        return self.rows.values(variant, split or self.main, nms, key) if variant else {}

    # tables
    def table1(self) -> list[str]:
        body = []
        for label, variant, paper in (
            ("UniInst (one-to-one)", self.suite.reference, PAPER_T1["uniinst"]),
            ("CondInst-style baseline (many-to-one)", self.suite.baseline, PAPER_T1["baseline"]),
        ):
            with_nms, without = self.ap(variant, self.nms_mode), self.ap(variant, "none")
            body.append([
                f"{label} {_named(variant)}", cell(list(with_nms.values()), paper["mask"]),
                cell(list(without.values()), paper["none"]),
                cell(paired(without, with_nms), paper["none"] - paper["mask"]),
                cell(list(self.ap(variant, "none", key="duplicates_per_gt").values()), digits=2),
            ])
        header = ["method", f"AP w/ {self.nms_mode} NMS", "AP w/o NMS", "Δ (w/o − w/)", "duplicates per GT w/o NMS"]
        return _table(header, body)

    def table4(self) -> list[str]:
        variants = sorted(self._with("4"), key=lambda v: self.roles[v].settings[_ALPHA])
        body = []
        for v in variants:
            alpha = float(self.roles[v].settings[_ALPHA])
            paper = next((p for a, p in PAPER_T4.items() if math.isclose(a, alpha)), None)
            body.append([f"{alpha:g}", f"`{v}`", cell(list(self.ap(v).values()), paper),
                         cell(list(self.ap(v, key="AP50").values())), cell(list(self.ap(v, key="AP75").values()))])
        return _table(["α", "variant", "AP", "AP50", "AP75"], body)

    def table5(self) -> list[str]:
        body = []
        for (mf, rr), paper in PAPER_T5.items():
            v = self._table5(mf, rr)
            if v is not None:
                body.append(["✓" if mf else "", "✓" if rr else "", f"`{v}`", cell(list(self.ap(v).values()), paper)])
        return _table(["3DMF", "re-ranking", "variant", "AP"], body)

    def table6(self) -> list[str]:
        body = []
        for enabled, paper in PAPER_T6.items():
            v = self._aux(enabled)
            if v is not None:
                body.append(["✓" if enabled else "", f"`{v}`", cell(list(self.ap(v).values()), paper)])
        return _table(["auxiliary loss", "variant", "AP"], body)

    def table7(self) -> list[str]:
        body = []
        for label, variant, nms, paper in (
            ("UniInst w/o NMS", self.suite.reference, "none", PAPER_T7["uniinst"]),
            (f"baseline w/ {self.nms_mode} NMS", self.suite.baseline, self.nms_mode, PAPER_T7["baseline"]),
        ):
            body.append([label, _named(variant)] + [
                cell(list(self.ap(variant, nms, self.heavy, key).values()), paper if key == "AP" else None)
                for key in ("AP", "AP50", "AP75", "AR100")
            ])
        return _table(["method", "variant", "AP", "AP50", "AP75", "AR100"], body)

    def all_variants(self, split: str) -> list[str]:
        header = ["variant", "table"] + [f"AP {m}" for m in self.suite.nms] + ["duplicates per GT w/o NMS"]
        body = [
            [f"`{v}`", self.roles[v].table or "—"]
            + [cell(list(self.ap(v, m, split).values())) for m in self.suite.nms]
            + [cell(list(self.ap(v, "none", split, "duplicates_per_gt").values()), digits=2)]
            for v in self.suite.variants
        ]
        return _table(header, body)

    # claims
    def claims(self) -> list[Claim]:
        ref, base, mode = self.suite.reference, self.suite.baseline, self.nms_mode
        t1a = _compare(
            "T1", f"UniInst without NMS is within 1 AP of itself with {mode} NMS (paper: −0.2)",
            [("w/o − w/ NMS", self.ap(ref), self.ap(ref, mode))], Bound(-1.0, inclusive=True),
        )
        t1b = _compare(
            "T1", "the many-to-one baseline loses at least 5 AP without NMS (paper: −19.4)",
            [("w/o − w/ NMS", self.ap(base), self.ap(base, mode))], Bound(-5.0, above=False, inclusive=True),
        )
        t4 = _compare(
            "T4", "α = 0.9 is above α = 0 and α = 1 (paper: 37.9 against 33.5 and 11.8)",
            [("α 0.9 − α 0", self.ap(self._alpha(0.9)), self.ap(self._alpha(0.0))),
             ("α 0.9 − α 1", self.ap(self._alpha(0.9)), self.ap(self._alpha(1.0)))], Bound(0.0),
        )
        t5 = _compare(
            "T5", "3DMF and re-ranking each add (paper: +0.8 and +1.2 alone, +2.3 together)",
            [("3DMF − none", self.ap(self._table5(True, False)), self.ap(self._table5(False, False))),
             ("re-ranking − none", self.ap(self._table5(False, True)), self.ap(self._table5(False, False))),
             ("both − 3DMF", self.ap(self._table5(True, True)), self.ap(self._table5(True, False))),
             ("both − re-ranking", self.ap(self._table5(True, True)), self.ap(self._table5(False, True)))],
            Bound(0.0),
        )
        t6 = _compare(
            "T6", "the auxiliary loss adds (paper: +0.8)",
            [("with − without", self.ap(self._aux(True)), self.ap(self._aux(False)))], Bound(0.0),
        )
        claims = [t1a, t1b, t4, t5, t6]
        if self.heavy:
            claims.append(_compare(
                "T7", f"under heavy occlusion UniInst without NMS is above the baseline with {mode} NMS "
                "(paper, OCHuman: 40.2 against 31.8)",
                [("UniInst w/o − baseline w/", self.ap(ref, "none", self.heavy), self.ap(base, mode, self.heavy))],
                Bound(0.0),
            ))
        return claims

    def markdown(self, *, header: Sequence[str] = ()) -> str:
        s = self.suite
        lines = [f"# Reproduction suite `{s.name}`", "", *header]
        lines += [
            f"Mask AP (%) on `{self.main}` unless said; each cell is ours mean ± std over seeds {s.seeds} "
            "(the paper's value, COCO val R-50; Table 7: OCHuman). The paper's numbers are for COCO: compare the "
            "direction and size of differences, not the absolute values.", "",
            "## Table 1: one-to-one against many-to-one, with and without NMS", "", *self.table1(), "",
            "## Table 4: α of the OYOR cost", "", *self.table4(), "",
            "## Table 5: 3D max filtering and re-ranking", "", *self.table5(), "",
            "## Table 6: the auxiliary many-to-one loss", "", *self.table6(), "",
        ]
        if self.heavy:
            lines += [f"## Table 7: heavy occlusion (`{self.heavy}`)", "", *self.table7(), ""]
        lines += ["## The paper's claims at this scale", "", *(c.line() for c in self.claims()), ""]
        for split in s.splits:
            lines += [f"## Every variant on `{split}`", "", *self.all_variants(split), ""]
        return "\n".join(lines)

    # plots
    def plots(self, out_dir: str | Path) -> list[Path]:
        """AP against α, AP with and without NMS per variant, duplicates per GT per variant."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        alphas = sorted(self._with("4"), key=lambda v: self.roles[v].settings[_ALPHA])
        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = [self.roles[v].settings[_ALPHA] for v in alphas]
        stats = [mean_std(list(self.ap(v).values())) for v in alphas]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[sd for _, sd in stats], marker="o", capsize=3, label="ours")
        ax.plot(list(PAPER_T4), list(PAPER_T4.values()), "s--", color="grey", label="paper (COCO)")
        ax.set(xlabel="α", ylabel=f"mask AP on {self.main} (%)", title="AP against α (Table 4)")
        ax.legend()
        paths.append(self._save(fig, out / "AP_vs_alpha.png"))

        names = list(s for s in self.suite.variants)
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names)), 3.8))
        width = 0.8 / len(self.suite.nms)
        for i, mode in enumerate(self.suite.nms):
            stats = [mean_std(list(self.ap(v, mode).values())) for v in names]
            ax.bar([j + i * width for j in range(len(names))], [m for m, _ in stats], width,
                   yerr=[sd for _, sd in stats], capsize=2, label=f"NMS {mode}")
        ax.set_xticks([j + width * (len(self.suite.nms) - 1) / 2 for j in range(len(names))], names, rotation=45, ha="right")
        ax.set(ylabel=f"mask AP on {self.main} (%)", title="AP with and without NMS")
        ax.legend()
        paths.append(self._save(fig, out / "AP_nms_per_variant.png"))

        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names)), 3.8))
        for i, split in enumerate(self.suite.splits):
            stats = [mean_std(list(self.ap(v, "none", split, "duplicates_per_gt").values())) for v in names]
            w = 0.8 / len(self.suite.splits)
            ax.bar([j + i * w for j in range(len(names))], [m for m, _ in stats], w,
                   yerr=[sd for _, sd in stats], capsize=2, label=split)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set(ylabel="duplicates per GT instance", title="Predictions ≥ 0.3 that mask NMS would remove")
        ax.legend()
        paths.append(self._save(fig, out / "duplicates_per_variant.png"))
        return paths

    @staticmethod
    def _save(fig: Any, path: Path) -> Path:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        import matplotlib.pyplot as plt

        plt.close(fig)
        return path
