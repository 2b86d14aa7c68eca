"""The 2026 local-LLM efficiency claims, tested on the farm's own Results. Pure: the CLI and the dashboard both call it.

Each claim is one function: a selection of stored Results (stated in words as its `query`, so a
reader can redo it), a computation, and a verdict per hardware class — holds, refuted, or not
enough data — with the numbers it came from. No verdict is written by hand: an empty farm answers
"not enough data" to every claim. Thresholds are module constants, named in each test's sentence.

It does not load Results (the caller does, and names the flagged workers, whose Results are never
evidence) and it measures nothing; see orchestrator/recommend.py for the per-tier answer.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from farm.contract import Result, kind_of_test
from orchestrator.ranking import from_result, rank, tier_for

Verdict = Literal["holds", "refuted", "not enough data"]
HOLDS, REFUTED, THIN = "holds", "refuted", "not enough data"
# A verdict on fewer runs than this is a coincidence, not evidence.
MIN_RUNS = 2
# "about 1.8x at 85-90 % second-token acceptance": runs in a widened acceptance window, speedup band.
MTP_ACCEPTANCE = (0.80, 0.95)
MTP_SPEEDUP = (1.5, 2.1)
# "spec gives 1.5-3x": over runs with a well-matched draft; "a poor draft (~30 %) can be slower".
SPEC_GOOD_ACCEPTANCE = 0.6
SPEC_SPEEDUP = (1.5, 3.0)
SPEC_POOR_ACCEPTANCE = 0.4
# "MoE decodes at its active size's speed": its share of the active-bytes roofline against dense models'.
MOE_ROOFLINE_SHARE = 0.7
# "prefill untouched": a technique's prefill within this of the baseline's on the same file and box.
PREFILL_TOLERANCE = 0.10
# "MoE needs the memory of its total size": peak memory against the file's total size.
MOE_MEMORY_SHARE = 0.9
READING_LINES_TS = (7.0, 10.0, 30.0)


@dataclass
class Finding:
    hardware_class: str
    verdict: str
    numbers: str
    n_runs: int


@dataclass
class ClaimReport:
    key: str
    claim: str
    test: str  # one sentence: how the farm's data decides it
    query: str  # which Results were selected and how
    findings: list[Finding] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """Over every class: refuted if any class refutes it, holds if every class with data holds."""
        verdicts = {f.verdict for f in self.findings}
        if REFUTED in verdicts:
            return REFUTED
        return HOLDS if HOLDS in verdicts else THIN


def hardware_class(r: Result) -> str:
    """The coarse class a claim is judged per: a GPU's VRAM tier, or a CPU-only box."""
    if r.hardware.gpu:
        return f"GPU {tier_for(r.hardware.vram_bytes)} GB" if r.hardware.vram_bytes else "GPU"
    return "CPU-only"


def class_order(name: str) -> tuple:
    """GPU tiers smallest first, then CPU-only: the order a reader scans a table of classes in."""
    parts = name.split()
    return (0, int(parts[1])) if len(parts) == 3 and parts[1].isdigit() else (1 if name.startswith("GPU") else 2, 0)


def _by_class(results: Iterable[Result]) -> dict[str, list[Result]]:
    out: dict[str, list[Result]] = {}
    for r in results:
        out.setdefault(hardware_class(r), []).append(r)
    return out


def _median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def _per_class(selected: list[Result], judge: Callable[[list[Result]], tuple[str, str]],
               classes: Iterable[str] = ()) -> list[Finding]:
    """judge(runs of one class) -> (verdict, numbers); a class named in `classes` with no runs says so."""
    groups = _by_class(selected)
    for c in classes:
        groups.setdefault(c, [])
    findings = []
    for c, runs in sorted(groups.items(), key=lambda item: class_order(item[0])):
        verdict, numbers = judge(runs)
        findings.append(Finding(c, verdict, numbers, len(runs)))
    return findings


def _is_decode(r: Result) -> bool:
    return kind_of_test(r.test) == "tg" and r.n_depth == 0


def _second_token_acceptance(r: Result) -> float:
    # Position 0 of the draft is the step's second token: the first one the target did not choose itself.
    s = r.speculation
    return s.acceptance_by_position[0] if s.acceptance_by_position else s.acceptance_rate


def claim_mtp(results: list[Result], classes: Iterable[str] = ()) -> ClaimReport:
    lo, hi = MTP_ACCEPTANCE
    selected = [r for r in results if r.technique == "mtp" and r.speculation is not None]

    def judge(runs: list[Result]) -> tuple[str, str]:
        if len(runs) < MIN_RUNS:
            return THIN, f"{len(runs)} MTP runs (need {MIN_RUNS})"
        window = [r for r in runs if lo <= _second_token_acceptance(r) <= hi]
        accs = [_second_token_acceptance(r) for r in runs]
        if not window:
            return THIN, (f"no run at {lo:.0%}-{hi:.0%} second-token acceptance: {len(runs)} runs measured "
                          f"{min(accs):.2f}-{max(accs):.2f}, speedup {_median(r.speculation.speedup for r in runs):.2f}x")
        speedup = _median(r.speculation.speedup for r in window)
        acc = _median(_second_token_acceptance(r) for r in window)
        verdict = HOLDS if MTP_SPEEDUP[0] <= speedup <= MTP_SPEEDUP[1] else REFUTED
        return verdict, f"median {speedup:.2f}x at second-token acceptance {acc:.2f} ({len(window)} of {len(runs)} runs)"

    return ClaimReport(
        "mtp", "MTP gives about 1.8x decode at 85-90 % second-token acceptance",
        f"Among MTP runs whose second-token acceptance is {lo:.0%}-{hi:.0%}, the median speedup over plain decoding "
        f"in the same job must lie in {MTP_SPEEDUP[0]}-{MTP_SPEEDUP[1]}x.",
        "ok Results, technique = mtp, with a speculation block; second-token acceptance = "
        "speculation.acceptance_by_position[0]; speedup = speculation.speedup; per hardware class",
        _per_class(selected, judge, classes))


def claim_spec_gain(results: list[Result], classes: Iterable[str] = ()) -> ClaimReport:
    lo, hi = SPEC_SPEEDUP
    selected = [r for r in results if r.technique == "spec" and r.speculation is not None
                and r.speculation.acceptance_rate >= SPEC_GOOD_ACCEPTANCE]

    def judge(runs: list[Result]) -> tuple[str, str]:
        if len(runs) < MIN_RUNS:
            return THIN, f"{len(runs)} spec runs with acceptance >= {SPEC_GOOD_ACCEPTANCE:.2f} (need {MIN_RUNS})"
        speedups = [r.speculation.speedup for r in runs]
        speedup = _median(speedups)
        verdict = HOLDS if lo <= speedup <= hi else REFUTED
        return verdict, (f"median {speedup:.2f}x (range {min(speedups):.2f}-{max(speedups):.2f}x) over {len(runs)} runs, "
                         f"acceptance {_median(r.speculation.acceptance_rate for r in runs):.2f}")

    return ClaimReport(
        "spec-gain", "speculative decoding gives 1.5-3x decode",
        f"Over spec runs with a well-matched draft (acceptance >= {SPEC_GOOD_ACCEPTANCE:.0%}), the median speedup over "
        f"plain decoding in the same job must lie in {lo}-{hi}x.",
        f"ok Results, technique = spec, speculation.acceptance_rate >= {SPEC_GOOD_ACCEPTANCE}; "
        "speedup = speculation.speedup; per hardware class",
        _per_class(selected, judge, classes))


def claim_spec_poor_draft(results: list[Result], classes: Iterable[str] = ()) -> ClaimReport:
    selected = [r for r in results if r.technique == "spec" and r.speculation is not None
                and r.speculation.acceptance_rate <= SPEC_POOR_ACCEPTANCE]

    def judge(runs: list[Result]) -> tuple[str, str]:
        if len(runs) < MIN_RUNS:
            return THIN, f"{len(runs)} spec runs with acceptance <= {SPEC_POOR_ACCEPTANCE:.2f} (need {MIN_RUNS})"
        slower = [r for r in runs if r.speculation.speedup < 1.0]
        lowest = min(r.speculation.speedup for r in runs)
        return (HOLDS if slower else REFUTED), (
            f"{len(slower)} of {len(runs)} poor-draft runs slower than plain decoding (lowest {lowest:.2f}x, "
            f"acceptance {_median(r.speculation.acceptance_rate for r in runs):.2f})")

    return ClaimReport(
        "spec-poor-draft", "a poorly matched draft (acceptance ~30 %) can be slower than no draft",
        f"Among spec runs with acceptance <= {SPEC_POOR_ACCEPTANCE:.0%}, at least one must decode slower than plain "
        "decoding in the same job (speedup < 1).",
        f"ok Results, technique = spec, speculation.acceptance_rate <= {SPEC_POOR_ACCEPTANCE}; per hardware class",
        _per_class(selected, judge, classes))


def _roofline_share(r: Result, weight_bytes: int) -> float:
    """tok/s as a share of bandwidth / bytes read per token."""
    return r.avg_ts * weight_bytes / (r.hardware.bandwidth_gbps * 1e9)


def claim_moe_active_speed(results: list[Result], classes: Iterable[str] = ()) -> ClaimReport:
    selected = [r for r in results if r.technique == "baseline" and _is_decode(r) and r.hardware.bandwidth_gbps > 0
                and r.model_facts.size_bytes > 0 and (r.model_facts.n_expert == 0 or r.model_facts.active_bytes > 0)]

    def judge(runs: list[Result]) -> tuple[str, str]:
        moe = [r for r in runs if r.model_facts.n_expert > 0]
        dense = [r for r in runs if r.model_facts.n_expert == 0]
        if not moe or not dense:
            return THIN, f"{len(moe)} MoE and {len(dense)} dense decode runs with a measured bandwidth (need both)"
        moe_active = _median(_roofline_share(r, r.model_facts.active_bytes) for r in moe)
        moe_total = _median(_roofline_share(r, r.model_facts.size_bytes) for r in moe)
        dense_share = _median(_roofline_share(r, r.model_facts.active_bytes or r.model_facts.size_bytes) for r in dense)
        ratio = moe_active / dense_share
        return (HOLDS if ratio >= MOE_ROOFLINE_SHARE else REFUTED), (
            f"MoE reaches {moe_active:.0%} of bandwidth / active bytes ({moe_total:.0%} of bandwidth / total bytes), "
            f"dense models {dense_share:.0%} of theirs: ratio {ratio:.2f} ({len(moe)} MoE, {len(dense)} dense runs)")

    return ClaimReport(
        "moe-active-speed", "a sparse MoE decodes at the speed of its active size (tok/s tracks bandwidth / active bytes)",
        "On each hardware class, an MoE's decode tok/s as a share of bandwidth / active weight bytes must reach "
        f"{MOE_ROOFLINE_SHARE:.0%} of the share dense models reach of bandwidth / their weight bytes.",
        "ok Results, technique = baseline, decode (tg) at depth 0, hardware.bandwidth_gbps > 0; MoE: model_facts."
        "n_expert > 0 with active_bytes known; dense: n_expert = 0; median shares per hardware class",
        _per_class(selected, judge, classes))


def claim_lossless(results: list[Result], classes: Iterable[str] = ()) -> ClaimReport:
    selected = [r for r in results if r.technique in ("spec", "lookup", "mtp") and r.speculation is not None
                and r.temperature == 0]

    def judge(runs: list[Result]) -> tuple[str, str]:
        if not runs:
            return THIN, "no greedy spec, lookup or MTP run"
        diverged = [r for r in runs if not r.speculation.lossless]
        if not diverged:
            return HOLDS, f"all {len(runs)} greedy runs produced the plain decoding's tokens"
        firsts = [m for r in diverged for m in r.speculation.first_mismatch if m is not None]
        by_tech = ", ".join(f"{t} {sum(r.technique == t for r in diverged)}/{sum(r.technique == t for r in runs)}"
                            for t in sorted({r.technique for r in runs}))
        return REFUTED, (f"{len(diverged)} of {len(runs)} greedy runs diverged ({by_tech})"
                         + (f", earliest at token {min(firsts)}" if firsts else ""))

    return ClaimReport(
        "lossless", "speculation and MTP are lossless",
        "Every greedy spec, lookup and MTP run must produce, prompt for prompt, the same tokens as plain greedy "
        "decoding of the same file in the same job.",
        "ok Results, technique in (spec, lookup, mtp), temperature = 0, with a speculation block; "
        "lossless = speculation.lossless (the collector checks it against the token hashes); per hardware class",
        _per_class(selected, judge, classes))


def claim_prefill_untouched(results: list[Result], classes: Iterable[str] = ()) -> ClaimReport:
    def box(r: Result) -> tuple:
        return (r.model_sha256, r.test, r.worker)

    baseline: dict[tuple, list[float]] = {}
    for r in results:
        if r.technique == "baseline" and kind_of_test(r.test) in ("pp", "pg"):
            baseline.setdefault(box(r), []).append(r.avg_ts)
    selected = [r for r in results if r.technique != "baseline" and kind_of_test(r.test) in ("pp", "pg")]

    def judge(runs: list[Result]) -> tuple[str, str]:
        paired = [(r, statistics.fmean(baseline[box(r)])) for r in runs if box(r) in baseline]
        if not paired:
            return THIN, ("no spec, lookup or MTP run timed a prefill beside a baseline prefill of the same file on the "
                          "same worker: the farm runs these techniques as decode (tg) tests")
        ratios = [r.avg_ts / base for r, base in paired]
        off = [x for x in ratios if abs(x - 1) > PREFILL_TOLERANCE]
        return (REFUTED if off else HOLDS), (
            f"prefill {min(ratios):.2f}-{max(ratios):.2f}x the baseline's over {len(paired)} runs"
            + (f"; {len(off)} outside ±{PREFILL_TOLERANCE:.0%}" if off else ""))

    return ClaimReport(
        "prefill-untouched", "prefill is untouched by speculation, lookup and MTP",
        f"A technique's prefill tok/s must stay within ±{PREFILL_TOLERANCE:.0%} of the baseline's prefill of the same "
        "file and test on the same worker.",
        "ok Results with a prefill test (pp or pg): technique != baseline, paired by (file sha256, test, worker) with "
        "baseline ones; per hardware class",
        _per_class(selected, judge, classes))


def claim_moe_memory(results: list[Result], classes: Iterable[str] = ()) -> ClaimReport:
    selected = [r for r in results if r.model_facts.n_expert > 0 and r.model_facts.size_bytes > 0
                and (r.conditions.peak_vram_bytes or r.conditions.peak_rss_bytes)]

    def judge(runs: list[Result]) -> tuple[str, str]:
        if not runs:
            return THIN, "no MoE run with a measured peak memory"
        shares = [(r.conditions.peak_vram_bytes or r.conditions.peak_rss_bytes) / r.model_facts.size_bytes for r in runs]
        active = _median((r.model_facts.active_bytes or r.model_facts.size_bytes) / r.model_facts.size_bytes
                         for r in runs)
        share = _median(shares)
        return (HOLDS if share >= MOE_MEMORY_SHARE else REFUTED), (
            f"peak memory {share:.2f}x the file's total size (active weights {active:.2f}x of it) over {len(runs)} runs")

    return ClaimReport(
        "moe-memory", "MoE saves bandwidth, not VRAM: it needs the memory of its total size",
        f"An MoE run's measured peak memory (VRAM on a GPU, RSS on a CPU-only box) must be at least "
        f"{MOE_MEMORY_SHARE:.0%} of its file's total size, whatever its active size.",
        "ok Results, model_facts.n_expert > 0, peak_vram_bytes or peak_rss_bytes recorded; per hardware class",
        _per_class(selected, judge, classes))


def claim_reading_speed(results: list[Result], classes: Iterable[str] = ()) -> ClaimReport:
    selected = [r for r in results if _is_decode(r)]
    comfortable, _, instant = READING_LINES_TS

    def judge(runs: list[Result]) -> tuple[str, str]:
        if not runs:
            return THIN, "no decode run at depth 0"
        # The leaderboard's rows: each combination's headline decode test (largest n_gen), its runs pooled.
        rated = [(row.tg_ts, row.n_params, row.size_bytes, row.model, row.quant, row.technique, row.tier_gb)
                 for row in rank(from_result(r) for r in runs) if row.tg_ts is not None]
        parts = []
        for line in READING_LINES_TS:
            clear = [x for x in rated if x[0] >= line]
            if clear:
                # The largest model that clears the line (then the larger file: the higher-precision quant).
                ts, _, _, model, quant, technique, tier = max(clear, key=lambda x: (x[1], x[2]))
                parts.append(f">= {line:g} tok/s: {model} {quant} {technique} ({ts:.1f} tok/s, {tier} GB tier)")
            else:
                parts.append(f">= {line:g} tok/s: nothing")
        fastest = max(x[0] for x in rated)
        return (HOLDS if fastest >= comfortable else REFUTED), "; ".join(parts)

    return ClaimReport(
        "reading-speed", f"comfortable reading is 7-10 tok/s and above ~{instant:g} tok/s feels instant: "
        "which tier, model and quant clears each line",
        f"On each hardware class, the largest model whose decode clears {', '.join(f'{x:g}' for x in READING_LINES_TS)} "
        f"tok/s is named; the claim that comfortable reading is within reach holds where something clears "
        f"{comfortable:g} tok/s.",
        "ok Results, decode (tg) at depth 0, any technique; per (model file, quant, technique, box) the leaderboard's "
        "headline decode test (largest n_gen), runs pooled; per hardware class",
        _per_class(selected, judge, classes))


CLAIMS = (claim_mtp, claim_spec_gain, claim_spec_poor_draft, claim_moe_active_speed, claim_lossless,
          claim_prefill_untouched, claim_moe_memory, claim_reading_speed)


def claims(results: Iterable[Result], flagged_workers: frozenset[str] | set[str] = frozenset()) -> list[ClaimReport]:
    """Every claim on the ok Results of unflagged workers; each class the farm has data on gets a finding."""
    ok = [r for r in results if r.status == "ok" and r.worker not in flagged_workers]
    classes = sorted({hardware_class(r) for r in ok}, key=class_order)
    return [claim(ok, classes) for claim in CLAIMS]
