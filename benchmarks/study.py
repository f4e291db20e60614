"""The reference study published in results/published: one `bench run` grid per paper claim, and a README that
says, claim by claim, what the paper reports, what we measured, and whether it reproduced here.

    python benchmarks/study.py run [STUDY ...]   # run (or resume) the studies' grids: hours on 2 CPU cores
    python benchmarks/study.py render            # re-render every table from the committed rows and write
                                                 # README.md and index.html with the verdicts: seconds
    python benchmarks/study.py list              # the studies, their commands and how many rows each has

`make study` and `make leaderboard` call these. Every number of the README comes from the rows: a verdict is a
rule applied to paired per-seed differences (``verdict``), never typed in, so a rerun with more seeds or larger
budgets rewrites it. What each paper reports is quoted from ../shared/papers in ``Claim.paper``.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from bench import leaderboard

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = Path("results/published")  # relative: the run dirs the tables name are the same on every checkout
FORMATS = ("md", "csv", "json", "html")  # rendered per study; plots (png) beside them
ALPHA = 0.05  # one-sided paired t-test level of a verdict


@dataclass(frozen=True)
class Test:
    """One direction a paper reports, as a paired comparison on the same grid, task and seed.

    The claim holds on a seed when ``contender`` is better than ``rival`` by more than ``-margin`` (a margin > 0
    makes it a non-inferiority claim: "at least as accurate as", "comes close to"). Better: a higher score (a lower
    one for a metric registered lower-is-better, e.g. perplexity), or a lower sharpness."""

    contender: str  # a leaderboard label: method or method[variant]
    rival: str
    bits: str  # as the table labels it: "W4A8", "W4A32 g128" (decoders default to groups of 128); rival fp32: "FP32"
    measure: str = "score"  # "score" (the task's primary metric, as the table shows it) or "sharpness"
    margin: float = 0.0  # in the measure's units (points of a percent score)

    def text(self) -> str:
        what = "flatter than" if self.measure == "sharpness" else "better than"
        if self.margin:
            what = f"within {self.margin:g} of or {what}"
        return f"{self.contender} {what} {self.rival} at {self.bits}"


@dataclass(frozen=True)
class Claim:
    name: str  # its run dir: results/published/NAME
    title: str
    paper: str  # what the paper reports, in plain words
    runs: tuple[tuple[str, ...], ...]  # `bench run` arguments, in the order they run (--out is added)
    tests: tuple[Test, ...]
    notes: str = ""  # what a reader should know about the budget or the setting

    @property
    def run_dir(self) -> Path:
        return PUBLISHED / self.name


SEEDS = ("--seeds", "0,1,2")
# sharpness on a 135M decoder costs minutes a cell on 2 cores; a full WikiText-2 evaluation ~8 minutes: the first 8
# windows of 2048 tokens (16,384 scored tokens) are the same text for every cell, so paired differences stay fair
LM = ("--model", "smollm2-135m", "--no-sharpness", "--limit", "8")
EPOCHS3 = ("--sweep", "squat.epochs=3", "--sweep", "lsq.epochs=3")
# gptq.first_token_weight for the attention-sink question: the value benchmarks/gptq_float_hessians.py tried first
# (1/8 of a 512-token calibration window's weight on its first token), not tuned
SINK_WEIGHT = 64
LM_NOTE = (
    "Perplexity on the test text's first 8 windows of 2048 tokens (16,384 tokens, `--limit 8`); no sharpness. The "
    "offline SmolLM2 is a Q4_1 GGUF: every group of 32 weights of every block Linear is already on an asymmetric "
    "4-bit min-max grid (re-rounding it to that grid changes no weight; the embedding, tied to the LM head, is Q8_0; "
    "`tests/test_sources.py`), so its FP32 row is a 4-bit model in float storage and W4 here re-quantizes a 4-bit "
    "model onto a coarser grid (g128); the hub's float weights may rank the methods differently."
)

CLAIMS = (
    Claim(
        "zsaq-minilm",
        "ZSAQ vs GAN-only zero-shot QAT and RTN (MiniLM, SST-2)",
        "ZSAQ (Zhu et al. 2023, arXiv 2310.13315) reports consistent and significant gains over zero-shot "
        "baselines (GAN-based data-free QAT among them) at W2A8 and W4A8 on GLUE, up to +6.98 average score, with "
        "no task data, and better generalization from flatter minima; its ablations (frozen generator, no SAM, "
        "random tokens) each lose accuracy.",
        (
            ("--methods", "zsaq,gan", "--bits", "4", *SEEDS),
            ("--methods", "zsaq,gan", "--bits", "2", *SEEDS),
            ("--methods", "zsaq", "--bits", "4", "--set", "zsaq.train_generator=false", *SEEDS),
            ("--methods", "zsaq", "--bits", "4", "--set", "zsaq.inputs=random", *SEEDS),
            ("--methods", "zsaq", "--bits", "4", "--sweep", "zsaq.steps=240", *SEEDS),  # the budget question
        ),
        (
            Test("zsaq", "gan", "W4A8"),
            Test("zsaq", "rtn", "W4A8"),
            Test("zsaq", "gan", "W2A8"),
            Test("zsaq", "rtn", "W2A8"),
            Test("zsaq", "gan", "W4A8", "sharpness"),
            Test("zsaq", "gan", "W2A8", "sharpness"),
            Test("zsaq", "zsaq[train_generator=False]", "W4A8"),
            Test("zsaq", "zsaq[inputs=random]", "W4A8"),
            Test("zsaq[steps=240]", "rtn", "W4A8"),
            Test("zsaq[steps=240]", "zsaq", "W4A8"),
        ),
        "CPU budget: 60 student steps of 16 x 32 synthetic tokens, bert-tiny generator (the paper: OPT-350m, "
        "thousands of steps; `--set zsaq.preset=paper` on a GPU). `zsaq[steps=240]` asks the budget question: "
        "whether four times the steps brings ZSAQ above RTN at W4A8. It does not: 240 steps (about 350 s a cell) "
        "move ZSAQ by +0.43 ± 2.11 points over 60 steps and leave it 0.75 ± 1.97 below RTN, with a spread across "
        "seeds (± 2.96) larger than either difference; the default stays 60 steps, and the next point (960 steps, "
        "about 75 minutes for 3 seeds) is left to a GPU. gan is the same loop without SAM. The committed "
        "rows' p50 ms and method s were measured while other jobs shared the 2 cores (seed 0 most): they are no speed "
        "figures (`benchmarks/kernels.py` is); scores and sharpness do not depend on the load. The steps=240 rows "
        "ran a day later, with newer code and less load (the older rows record none): their p50 (about 11 ms, "
        "4-5x below the others') is not comparable with the older rows' either.",
    ),
    Claim(
        "squat-minilm",
        "SQuAT vs LSQ (MiniLM, SST-2)",
        "SQuAT (arXiv 2210.07171) reports that alternating a sharpness objective with the step-size objective "
        "outperforms state-of-the-art quantized BERT at 2, 3 and 4 bits on GLUE by about 1%, with flatter minima. "
        "Tested here as: flatter than LSQ QAT and at least as accurate (within 0.5 points) at the same budget.",
        (
            ("--methods", "squat,lsq", "--bits", "4,3,2", "--act-bits", "8", *SEEDS),
            # the budget question where the accuracy claim failed: both methods three epochs
            ("--methods", "squat,lsq", "--bits", "2", "--act-bits", "8", *EPOCHS3, *SEEDS),
        ),
        (
            *(Test("squat", "lsq", f"W{b}A8", "sharpness") for b in (4, 3, 2)),
            *(Test("squat", "lsq", f"W{b}A8", margin=0.5) for b in (4, 3, 2)),
            Test("squat[epochs=3]", "lsq[epochs=3]", "W2A8", "sharpness"),
            Test("squat[epochs=3]", "lsq[epochs=3]", "W2A8", margin=0.5),
        ),
        "Both at one budget: 1,500 labeled examples, one epoch, KD from the FP32 model. Seed 0's W3/W2 SQuAT cells "
        "were paused or shared the cores while other jobs measured: their method s and p50 ms are marked † and are "
        "no speed figures; scores and sharpness do not depend on the load. The budget question, at W2A8 where the "
        "accuracy claim failed: three epochs for both (`[epochs=3]`, about 6 minutes a SQuAT cell and 2.5 an LSQ "
        "one) lift both, SQuAT more, and narrow its gap to LSQ from 2.02 to 0.90 ± 0.76 points, within 0.5 on one "
        "seed of three: inconclusive, while SQuAT stays about 4x flatter. No budget here showed the accuracy claim, "
        "so the default stays one epoch; the paper's own budget (all of SST-2's 67k examples, several epochs) is "
        "for a GPU. The epochs=3 rows are the first with a paired FP32 timing, hence a speedup (int8-gemm about "
        "2x); their p50 (about 10 ms) ran on a faster day for this VM than the older rows' (about 55 ms).",
    ),
    Claim(
        "prequant-minilm",
        "PreQuant: quantize first, fine-tune 0.5% outliers (MiniLM, SST-2)",
        "PreQuant (arXiv 2306.00014) quantizes the pre-trained model before fine-tuning and trains only its "
        "outlier dimensions (about 0.5% of the weights) on the task, and reports accuracy close to FP32 on GLUE. "
        "Tested here as: within 1 point of FP32 at W4, and better than rounding the fine-tuned model at W3 and W2.",
        (
            ("--methods", "prequant", "--bits", "4,3,2", *SEEDS),
            ("--methods", "prequant", "--bits", "4", "--sweep", "prequant.epochs=3", *SEEDS),  # the budget question
        ),
        (
            Test("prequant", "fp32", "W4A32", margin=1.0),
            Test("prequant[epochs=3]", "fp32", "W4A32", margin=1.0),
            Test("prequant[epochs=3]", "prequant", "W4A32"),
            Test("prequant", "rtn", "W3A32"),
            Test("prequant", "rtn", "W2A32"),
        ),
        "One epoch over the FP32 fine-tune's 4,000 examples, weight-only (A32) as the paper. `prequant[epochs=3]` "
        "asks the budget question: whether three epochs bring PreQuant within 1 point of FP32 at W4 (its rows trained "
        "the slices through the Q(W)x + correction forward, the default rows through the overwritten weight: the "
        "same arithmetic up to float rounding). The default rows ran beside other jobs on the 2 cores: their p50 ms "
        "and method s are no speed figures (the W3/W2 rows mark it with †; the W4 rows predate the mark). The "
        "epochs=3 rows ran alone, after the slice-only backward: about 205 s of method time a cell, what one epoch "
        "took before it. Three epochs gain 4 points over one on every seed but stay 1.6 below FP32 on average (within "
        "1 point on seed 0 only), so the default stays one epoch until a budget shows the paper's direction.",
    ),
    Claim(
        "ptq-smollm2",
        "GPTQ and AWQ vs RTN (SmolLM2-135M, perplexity)",
        "GPTQ and AWQ report lower perplexity than round-to-nearest for weight-only 4- and 3-bit LLMs with per-group "
        "scales (g128).",
        (
            ("--methods", "gptq,awq", "--bits", "3", *SEEDS, *LM),
            ("--methods", "gptq,awq", "--bits", "4", *SEEDS, *LM),
            ("--methods", "gptq", "--bits", "4,3", "--sweep", f"gptq.first_token_weight={SINK_WEIGHT}", *SEEDS, *LM),
        ),
        (
            *(Test(m, "rtn", f"W{b}A32 g128") for b in (4, 3) for m in ("gptq", "awq")),
            *(
                Test(f"gptq[first_token_weight={SINK_WEIGHT}]", m, f"W{b}A32 g128")
                for b in (4, 3)
                for m in ("gptq", "rtn")
            ),
        ),
        "Calibration: the methods' default samples (128 windows of 512 tokens) of the corpus's training split, drawn "
        "by the seed (RTN and FP32 use none: their rows are equal across seeds). GPTQ grids each group on its "
        "error-updated columns as the reference code does (dynamic groups; the rows before that, static groups, were "
        "superseded: W3 42.82 ± 0.76, W4 seed 0 23.20). At W4 GPTQ's perplexity is above RTN's on every seed, "
        "although its layer-wise output error on held-out text is 2-30x below RTN's: GPTQ from float-model Hessians, "
        "without the sequential pipeline, is worse too (static groups 26.22, dynamic 26.71, RTN 23.63 on the first "
        "window, "
        "`benchmarks/gptq_float_hessians.py`), so it is GPTQ's objective on this model, not the calibration code. "
        "The same script (`--dynamic --only ...`, GPTQ on some layers, RTN on the rest; first window) finds the "
        "layer: GPTQ on v_proj alone gives 29.42, on every layer but v_proj 22.31 (better than RTN); q, o, gate, up "
        "and down alone each beat RTN. Counting each calibration window's first position 64 times in the Hessians "
        "(`--first-weight 64`) turns GPTQ on every layer to 21.83 and on v_proj alone to 23.41: GPTQ's token-average "
        "objective trades the value error of the first token, which most attention heads attend to (the attention "
        "sink), for the others'. `gptq[first_token_weight=64]` is that weighting as a method setting (an extension, "
        "not the paper's GPTQ; 64 was the diagnostic's first try, 1/8 of a 512-token window's weight on one token, "
        "picked on the first evaluation window and not tuned): it turns the W4 verdict, beats RTN at W3 and W4 on "
        "every seed, comes within 0.3 of AWQ at W4 and is the best W3 model. The W4 seed 1-2 rows' method s shared "
        "the cores with that diagnostic (about 0.35 cores). The AWQ and RTN W3 rows' latency is `simulated`: they ran "
        "before int4pack served 3-bit codes. p50 ms of rows measured on different days is not comparable: the same "
        "int4pack kernel on the same shapes took 450-1100 ms before 05:00 on 2026-12-01 and 154-185 ms after, with "
        "no latency code changed between (the VM's host, which `others_cores` cannot see); rows without a paired "
        "FP32 reference show no speedup for that reason, and `benchmarks/kernels.py` gives the speed figures. "
        f"{LM_NOTE}",
    ),
    Claim(
        "smoothquant-smollm2",
        "SmoothQuant vs plain W8A8 (SmolLM2-135M, perplexity)",
        "SmoothQuant reports that migrating activation outliers into the weights makes W8A8 work where plain W8A8 "
        "rounding loses accuracy; its W8A8 setting quantizes activations per tensor with static (calibrated) ranges.",
        (
            (
                "--methods",
                "smoothquant",
                "--bits",
                "8",
                "--act-bits",
                "8",
                "--set",
                "smoothquant.act_mode=static",
                "--sweep",
                "smoothquant.layers=norm,none",
                *SEEDS,
                *LM,
            ),
            ("--methods", "smoothquant", "--bits", "8", "--act-bits", "8", *SEEDS, *LM),
        ),  # fmt: skip
        (
            Test("smoothquant[act_mode=static]", "smoothquant[act_mode=static,layers=none]", "W8A8 g128"),
            Test("smoothquant", "rtn", "W8A8 g128"),
        ),
        "Static: the paper's per-tensor static A8 with and without smoothing (`layers=none`: the same calibrated "
        "grid, nothing smoothed). Dynamic: per-token A8, smoothed vs plain RTN: smoothing wins on every seed, but by "
        "0.04: plain per-token W8A8 RTN is already within 0.25 of FP32 here (17.44 vs 17.22), so there is little to "
        "win. The paper's premise, plain W8A8 losing accuracy, shows only with static per-tensor A8 (42.06), where "
        f"smoothing wins back 4 of the 25 points lost. {LM_NOTE}",
    ),
    Claim(
        "zsaq-smollm2",
        "ZSAQ on a generative model (SmolLM2-135M, perplexity)",
        "ZSAQ reports its gains on generative PLMs too (perplexity of GPT-style models).",
        (("--methods", "zsaq,gan", "--bits", "4", *SEEDS, *LM),),
        (Test("zsaq", "rtn", "W4A8 g128"), Test("zsaq", "gan", "W4A8 g128")),
        "CPU budget, as on MiniLM: 60 student steps of 16 x 32 synthetic tokens from the bert-tiny generator, its "
        "tokens mapped onto SmolLM2's vocabulary (each one's first sub-token), KL of the next-token distributions; "
        "about 15 minutes a ZSAQ cell, 8 a GAN-only one (the paper: OPT-350m, thousands of steps, a GPU). The "
        "student's grid is RTN's (W4 g128, per-token A8), so both start from the RTN cell: 60 steps move it away "
        "from RTN's perplexity, not below it. No larger budget was run here: four times the steps did not "
        "measurably move ZSAQ on MiniLM (zsaq-minilm, steps=240), and on SmolLM2 they cost about an hour a cell (3 "
        "hours for 3 seeds) on 2 cores; `--sweep zsaq.steps=240,960` is the command for a GPU. "
        f"{LM_NOTE}",
    ),
)


# --------------------------------------------------------------------------- measuring a claim


@dataclass
class Outcome:
    test: Test
    contender: list[float] = field(default_factory=list)  # per paired seed, as the table shows it
    rival: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    better: list[float] = field(default_factory=list)  # per seed: how much better the contender is (+ = claim's way)

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def verdict(self) -> str:
        return verdict(self.better, self.test.margin)


def verdict(better: list[float], margin: float = 0.0) -> str:
    """reproduced: the claim's direction holds on every seed or by a one-sided paired t-test at ``ALPHA``, n >= 2;
    not reproduced: the opposite holds the same way; inconclusive: neither (or one seed); not run: no pair."""
    if not better:
        return "not run"
    x = np.asarray(better) + margin
    if len(x) < 2:
        return "inconclusive (one seed)"

    def holds(values: np.ndarray) -> bool:
        if (values > 0).all():
            return True
        if np.std(values) == 0:
            return False
        return stats.ttest_1samp(values, 0.0, alternative="greater").pvalue < ALPHA

    if holds(x):
        return "reproduced"
    if (x <= 0).all() or holds(-x):
        return "not reproduced"
    return "inconclusive"


def measure(claim: Claim, rows: list[dict]) -> list[Outcome]:
    scoring = leaderboard.scoring(rows) if rows else {}
    # (label, bits, task, measure) -> seed -> value
    values: dict[tuple[str, str, str, str], dict[int, float]] = defaultdict(dict)
    for row in sorted(rows, key=lambda r: r.get("finished") or ""):  # a cell rerun under a newer config wins
        label = leaderboard.method_label(row)
        bits = row["bits"]  # the reference's is "FP32"
        score = row.get("score")
        sharp = (row.get("sharpness") or {}).get("value")
        scale = scoring[row["task"]].scale
        if score is not None:
            values[(label, bits, row["task"], "score")][row["seed"]] = score * scale
        if sharp is not None:
            values[(label, bits, row["task"], "sharpness")][row["seed"]] = sharp
    outcomes = []
    for test in claim.tests:
        out = Outcome(test)
        for task in sorted({r["task"] for r in rows}):
            higher = scoring[task].higher_is_better if test.measure == "score" else False
            rival_bits = "FP32" if test.rival == "fp32" else test.bits
            mine = values.get((test.contender, test.bits, task, test.measure), {})
            theirs = values.get((test.rival, rival_bits, task, test.measure), {})
            for seed in sorted(set(mine) & set(theirs)):
                out.seeds.append(seed)
                out.contender.append(mine[seed])
                out.rival.append(theirs[seed])
                out.better.append((mine[seed] - theirs[seed]) * (1 if higher else -1))
        outcomes.append(out)
    return outcomes


# --------------------------------------------------------------------------- commands


def bench_command(claim: Claim, args: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "bench", "run", *args, "--out", str(claim.run_dir)]


def shown(argv: list[str]) -> str:
    return " ".join(["bench", *argv[3:]])


def select(names: list[str]) -> list[Claim]:
    known = {c.name: c for c in CLAIMS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown study {unknown[0]!r}; choose from {', '.join(known)}")
    return [known[n] for n in names] if names else list(CLAIMS)


def run(names: list[str]) -> int:
    for claim in select(names):
        for args in claim.runs:
            argv = bench_command(claim, args)
            print(f"$ {shown(argv)}", flush=True)
            code = subprocess.call(argv, cwd=ROOT)
            if code:
                print(f"{claim.name}: `{shown(argv)}` exited {code}; its finished cells are kept", file=sys.stderr)
                return code
    return render()


def collected(claim: Claim) -> tuple[list[dict], list[dict]]:
    """The study's (finished, failed) rows, newest per cell, as ``bench leaderboard`` reads them."""
    if not (ROOT / claim.run_dir / "results.jsonl").is_file():
        return [], []
    return leaderboard.collect([str(ROOT / claim.run_dir)])


def rows_of(claim: Claim) -> list[dict]:
    return collected(claim)[0]


# --------------------------------------------------------------------------- rendering


def fmt(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {float(np.std(values, ddof=1)):.{digits}f}"


def cell_seconds(rows: list[dict]) -> float:
    """Compute the study took: each cell's seconds plus each fine-tune/preparation once."""
    prepares = {(r["task"], r["seed"], r["model"]): (r.get("timing") or {}).get("prepare_s") or 0.0 for r in rows}
    return sum(r.get("wall_time_s") or 0.0 for r in rows) + sum(prepares.values())


def in_words(out: Outcome, unit: str) -> str:
    """One test's outcome as a sentence: the mean paired difference, on how many seeds the claim held, the verdict.
    ``unit``: what the difference is counted in ("points", "in perplexity", "in sharpness": ``unit_of``)."""
    test = out.test
    if not out.n:
        return f"{test.text()}: not run yet."
    digits = 4 if test.measure == "sharpness" else 2
    mean = float(np.mean(out.better))
    way = ("flatter" if mean > 0 else "sharper") if test.measure == "sharpness" else ("better" if mean > 0 else "worse")
    held = int((np.asarray(out.better) + test.margin > 0).sum())
    allowed = f" ({test.margin:g} allowed)" if test.margin else ""
    by = f"{abs(mean):.{digits}f}" + (f" ± {float(np.std(out.better, ddof=1)):.{digits}f}" if out.n > 1 else "")
    return (
        f"{test.contender} is {way} than {test.rival} at {test.bits} by {by} {unit}{allowed}; the claim held on "
        f"{held} of {out.n} seed{'s' if out.n > 1 else ''}: **{out.verdict}**."
    )


def unit_of(test: Test, rows: list[dict]) -> str:
    if test.measure == "sharpness":
        return "in sharpness"
    if all(s.percent for s in leaderboard.scoring(rows).values()):
        return "points"
    return "in " + "/".join(sorted({r["primary_metric"] for r in rows}))


def readme(claims: list[Claim], rows: dict[str, list[dict]] | None = None) -> str:
    """The page: the verdict table, then one section per study; ``rows`` by study name (default: read them)."""
    rows = rows if rows is not None else {claim.name: rows_of(claim) for claim in claims}
    lines = [
        "# quantbench reference leaderboard",
        "",
        "What the papers behind quantbench's methods claim, and what this harness measures on the embedded models "
        "(MiniLM-L6 on the offline SST-2 twin, SmolLM2-135M on the offline corpus), 2 CPU threads, no GPU. Every "
        "figure below is computed from the committed rows (`results.jsonl` in each study's directory); "
        "`make leaderboard` re-renders this page and the tables, `make study` reruns (resumes) the grids.",
        "",
        f"Verdicts: **reproduced** = the paper's direction holds on every seed or by a one-sided paired t-test at "
        f"{ALPHA} over seeds (n >= 2); **not reproduced** = the opposite holds the same way; **inconclusive** = "
        "neither, or one seed; **not run** = no rows yet. Differences are paired: same grid, task and seed. "
        "A claim is about these models and these CPU budgets, not about the papers' own setting.",
        "",
        "| study | claim tested | n | contender | rival | better by | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    sections = []
    for claim in claims:
        outcomes = measure(claim, rows[claim.name])
        for out in outcomes:
            digits = 4 if out.test.measure == "sharpness" else 2
            lines.append(
                f"| [{claim.name}](#{claim.name}) | {out.test.text()} | {out.n} | {fmt(out.contender, digits)} | "
                f"{fmt(out.rival, digits)} | {fmt(out.better, digits)} | {out.verdict} |"
            )
        sections += [f"## {claim.name}", "", f"**{claim.title}.** {claim.paper}", ""]
        if claim.notes:
            sections += [claim.notes, ""]
        if rows[claim.name]:
            sections += ["What we measured (paired by seed, mean ± std of the per-seed differences):", ""]
            sections += [f"- {in_words(o, unit_of(o.test, rows[claim.name]))}" for o in outcomes]
            sections += [""]
        sections += ["Commands (each resumes; `make study` runs them all):", "", "```"]
        sections += [shown(bench_command(claim, args)) for args in claim.runs]
        sections += ["```", ""]
        if rows[claim.name]:
            mine = rows[claim.name]
            seeds = sorted({r["seed"] for r in mine})
            sections += [
                f"{len(mine)} rows, seeds {', '.join(map(str, seeds))}; compute {cell_seconds(mine) / 60:.0f} min "
                f"(cells and fine-tunes, 2 threads). Table: [leaderboard.md]({claim.name}/leaderboard.md), "
                f"[html]({claim.name}/leaderboard.html), [csv]({claim.name}/leaderboard.csv), "
                f"[json]({claim.name}/leaderboard.json).",
                "",
                (ROOT / claim.run_dir / "leaderboard.md").read_text().strip(),
                "",
            ]
        else:
            sections += ["Not run yet.", ""]
    return "\n".join([*lines, "", *sections])


def render() -> int:
    """Each study's tables from its rows, then README.md and index.html (the page to link to)."""
    claims = list(CLAIMS)
    read = {claim.name: collected(claim) for claim in claims}  # each results.jsonl read once
    rows = {name: ok for name, (ok, _) in read.items()}
    for claim in claims:
        if not rows[claim.name]:
            continue
        board = leaderboard.build(*read[claim.name], [str(claim.run_dir)])
        keep_stamp(board, ROOT / claim.run_dir)
        for fmt_name in FORMATS:
            board.write(fmt_name, ROOT / claim.run_dir / f"leaderboard.{fmt_name}")
        board.write("png", ROOT / claim.run_dir / "leaderboard.png")
    text = readme(claims, rows)
    (ROOT / PUBLISHED / "README.md").write_text(text + "\n")
    (ROOT / PUBLISHED / "index.html").write_text(page(text))
    print(f"wrote {PUBLISHED}/README.md, {PUBLISHED}/index.html and each study's leaderboard.*", file=sys.stderr)
    return 0


def keep_stamp(board: leaderboard.Leaderboard, run_dir: Path) -> None:
    """Give ``board`` its committed tables' "rendered" time when that is all that would change: re-rendering the
    same rows then rewrites no file, and a commit of new rows touches only the studies they belong to."""
    committed = run_dir / "leaderboard.json"
    if not committed.is_file():
        return
    now = board.provenance["rendered"]
    board.provenance["rendered"] = json.loads(committed.read_text()).get("provenance", {}).get("rendered")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt_name in FORMATS:
            path = run_dir / f"leaderboard.{fmt_name}"
            trial, _ = board.write(fmt_name, Path(tmp) / path.name)
            if not path.is_file() or path.read_bytes() != trial.read_bytes():
                board.provenance["rendered"] = now
                return


def page(markdown: str) -> str:
    """README.md as a self-contained HTML page; each study's own table page is linked from it."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown.replace("leaderboard.md)", "leaderboard.html)"))
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em}"
        "pre{background:#f6f6f6;padding:.5em;overflow-x:auto}"
    )
    title = html.escape("quantbench reference leaderboard")
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{title}</title><style>{style}</style></head>'
        f"<body>\n{body}</body></html>\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run (resume) the studies' grids, then render")
    run_p.add_argument("studies", nargs="*", metavar="STUDY", help="default: all, in the order listed")
    sub.add_parser("render", help="re-render tables, README.md and index.html from the committed rows")
    sub.add_parser("list", help="the studies, their commands and rows")
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # the tables name their run dirs relative to the checkout (results/published/NAME) wherever run
    if args.command == "run":
        return run(args.studies)
    if args.command == "render":
        return render()
    for claim in CLAIMS:
        print(f"{claim.name}: {len(rows_of(claim))} rows")
        for a in claim.runs:
            print(f"  {shown(bench_command(claim, a))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
