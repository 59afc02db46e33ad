"""Turns a run of `bench/` into markdown tables (and charts).

    python bench/report.py build/bench/last-run.jsonl     # print the tables
    python bench/report.py RUN --out-dir bench/results
        # also write <device>.md, <device>.json (the rows) and <device>.png, one set per suite:
        # <device> for the headline ops, <device>-linear (from hidden states), <device>-trainer

RUN is the row log `make bench` writes as each row finishes (`--bench-rows`, JSON lines; a run
that was stopped or failed still has every row measured before) or a pytest-benchmark JSON
(`--benchmark-json`). Only the standard library is needed (matplotlib for the chart, if
installed), so a run made on a GPU machine can be turned into a table anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import naming

BASELINES = {"eager": "vs eager", "compile": "vs compile", "trl": "vs TRL", "liger": "vs Liger"}
IMPL_ORDER = [
    "eager", "compile", "plain", "plain-compile", "trl", "verl", "liger",
    "native", "native-tiled", "native-trl", "triton", "triton-tiled",
]
PASS_ORDER = ["fwd+bwd", "fwd"]
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
# Sanity bounds on |impl - eager reference| of the forward outputs: far above rounding noise,
# far below what a broken kernel produces. Rows beyond them are flagged, not dropped.
ERROR_FLAG = {"float32": 1e-2, "float64": 1e-6}
ERROR_FLAG_DEFAULT = 0.25
# Share of the CPUs other processes used while a row was timed above which the row is marked.
BUSY_FLAG = 0.1

# Goals stated for the headline case; the report says whether the run met them.
TARGETS = [
    {
        "device": "cpu",
        "op": "token_logprobs",
        "pass": "fwd+bwd",
        "shape": [2048, 32000],
        "dtype": "float32",
        "impl": "native",
        "max": {"eager": 0.1, "compile": 0.4},
        "also": {"plain": "plain eager", "plain-compile": "plain compile"},
    },
    *(
        {
            "device": "cpu",
            "op": "dpo_loss",
            "pass": "fwd+bwd",
            "shape": [8, 512, 32000],
            "dtype": dtype,
            "impl": "native",
            "max": {"compile": 0.5},
        }
        for dtype in ("float32", "bfloat16")
    ),
    {
        "device": "cpu",
        "op": "grpo_loss",
        "pass": "fwd+bwd",
        "shape": [16, 1024, 32000],
        "dtype": "bfloat16",
        "impl": "native",
        "max": {"compile": 0.4},
    },
    *(
        {
            "device": "cpu",
            "op": op,
            "pass": "fwd+bwd",
            "shape": shape,
            "dtype": "float32",
            "impl": "native",
            "max": {"eager": 1.2, peer: 1.0},
            "max_memory": {"eager": 0.1, peer: 1.0},
        }
        for op, peer in (("linear_token_logprobs", "trl"), ("linear_grpo_loss", "liger"))
        for shape in ([4096, 1024, 32000], [2048, 512, 151936])
    ),
    # Issue targets for distillation from hidden states: faster and leaner than TRL's and Liger's fused
    # functions, and at most a tenth of the unfused path's peak memory.
    *(
        {
            "device": "cpu",
            "op": "linear_distillation_jsd",
            "pass": "fwd+bwd",
            "shape": shape,
            "dtype": "float32",
            "impl": "native",
            "max": {"trl": 1.0, "liger": 1.0},
            "max_memory": {"eager": 0.1, "trl": 1.0, "liger": 1.0},
        }
        for shape in ([4096, 1024, 2048, 32000], [2048, 512, 1024, 151936])
    ),
    {
        "device": "cpu",
        "op": "gae",
        "pass": "fwd",
        "shape": [256, 4096],
        "dtype": "float32",
        "impl": "native",
        "max": {"eager": 0.02, "trl": 0.02},
    },
]

LEGEND = [
    (
        "eager",
        "`fastalign.reference.token_logprobs` in eager PyTorch (log_softmax + gather + entropy); for dpo_loss, "
        "`fastalign.reference.dpo.dpo_loss_from_logits` (log_softmax + gather + masked sums + the loss, TRL's layout); "
        "for rrhf_loss, `fastalign.reference.rrhf.rrhf_loss_from_logits` (the same, then the released RRHF "
        "trainer's per-prompt ranking and SFT terms); "
        "for grpo_loss, TRL's dapo objective from logits as GRPOTrainer computes it (bench/bench_grpo.py); "
        "for linear_*, the unfused path: logits = hidden @ weight.T, then that eager math; "
        "for gae, verl's `compute_gae_advantage_return` loop (ported); for group_advantages, "
        "`fastalign.reference.advantages` (vectorized PyTorch)",
    ),
    ("compile", "`torch.compile` of that reference, compiled before timing"),
    (
        "plain torch",
        "the bare `log_softmax`, `gather`, `-(p * log p).sum(-1)` in fp32, without the reference's "
        "ignore_index / -inf / NaN handling, in eager and under `torch.compile`",
    ),
    (
        "TRL",
        "TRL `selective_log_softmax_and_entropy` (torch path on CPU, Triton kernel on CUDA); "
        "Liger-Kernel has no selective log-softmax op, so it has no row; for gae, TRL's PPOTrainer loop "
        "(ported from TRL 0.x); for group_advantages, TRL 1.16 GRPO's vectorized advantage code; "
        "for linear_token_logprobs, TRL's `ChunkedLogProbFunction` (what `add_fused_lm_head` runs)",
    ),
    ("Liger", "Liger-Kernel's `LigerFusedLinearGRPOLoss` (linear_grpo_loss: the same dapo objective from hidden "
              "states); for linear_distillation_jsd, `LigerFusedLinearJSDLoss` (hard loss weight 0)"),
    (
        "linear_distillation_jsd",
        "the mean generalized JSD (beta 0.5) between a student and a teacher twice as wide, from both models' hidden "
        "states and lm_heads, gradients to the student's hidden states and weight (bench/bench_distillation.py); "
        "shape is tokens × student width × teacher width × vocab; eager = both logits materialized, then "
        "`fastalign.reference.token_divergence`; TRL = `ChunkedDivergenceFunction` (DistillationTrainer's)",
    ),
    (
        "*_train_step",
        "one optimizer step of TRL 1.16's DPOTrainer / GRPOTrainer on a Llama with vocab 32,000 (hidden 256, "
        "2 layers, fp32) on a fixed batch (GRPO's generated once, generation not timed): `compute_loss`, "
        "backward, AdamW; TRL = stock TRL, fastalign = the same trainer under "
        "`fastalign.integrations.trl.patched()` (bench/bench_trainer_step.py); shape is rows × tokens × vocab",
    ),
]


# Ops reported in files of their own, by name suffix: each suite is its own table and chart.
SUITES = (("-distillation", lambda op: "distillation" in op), ("-linear", lambda op: op.startswith("linear_")),
          ("-trainer", lambda op: op.endswith("_train_step")))


def suite(op: str) -> str:
    return next((suffix for suffix, belongs in SUITES if belongs(op)), "")


def _from_row_log(text: str) -> dict:
    """The run as pytest-benchmark's JSON would hold it, from conftest's row log, plus how far it got."""
    data = {"machine_info": {}, "commit_info": {}, "datetime": "", "benchmarks": [], "fastalign_not_run": []}
    planned, end = None, None
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a run killed while writing it
        kind = record.pop("kind", None)
        if kind == "run":
            planned = record.pop("planned", None)
            data.update(record)
        elif kind == "benchmark":
            data["benchmarks"].append(record)
        elif kind == "not_run":
            data["fastalign_not_run"].append(record)
        elif kind == "end":
            end = record
    if end and end.get("others_busy") is not None:
        data["machine_info"].setdefault("fastalign", {})["others_busy"] = end["others_busy"]
    data["fastalign_progress"] = {
        "planned": planned,
        "done": len(data["benchmarks"]) + len(data["fastalign_not_run"]),
        "exitstatus": None if end is None else end.get("exitstatus"),
    }
    return data


def read_run(path: Path) -> dict:
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    # A row log of one line (a run stopped before its first row) also parses as one object.
    if isinstance(data, dict) and "kind" not in data:
        return data
    return _from_row_log(text)


def load(path: Path) -> dict:
    data = read_run(path)
    rows = []
    for b in data.get("benchmarks", []):
        x = b.get("extra_info", {})
        if "impl" not in x:
            continue
        rows.append(
            {
                "op": x.get("op", b.get("group") or b["name"]),
                "pass": x.get("pass", ""),
                "shape": x.get("shape", []),
                "dtype": x.get("dtype", ""),
                "impl": x["impl"],
                "label": x.get("label", x["impl"]),
                "device": x.get("device", ""),
                "median_ms": b["stats"]["median"] * 1e3,
                "rounds": b["stats"].get("rounds"),
                "peak_mib": x.get("peak_mem_mib"),
                "others_busy": x.get("others_busy"),
                "err": max(
                    (x[k] for k in ("max_err_logps", "max_err_entropy", "max_err_loss") if x.get(k) is not None),
                    default=None,
                ),
            }
        )
    return {
        "machine": data.get("machine_info", {}),
        "commit": data.get("commit_info", {}),
        "datetime": data.get("datetime", ""),
        "rows": rows,
        "not_run": data.get("fastalign_not_run", []),
        "progress": data.get("fastalign_progress"),
        "raw": data,
    }


def split_suites(run: dict) -> dict[str, dict]:
    """suffix -> the part of `run` whose ops belong to that suite (only suites with rows)."""
    parts = {}
    for suffix in dict.fromkeys(suite(r["op"]) for r in run["rows"]):
        raw = dict(run["raw"])
        raw["benchmarks"] = [b for b in raw.get("benchmarks", [])
                             if suite(b.get("extra_info", {}).get("op", b.get("group") or b["name"])) == suffix]
        raw["fastalign_not_run"] = [n for n in run["not_run"] if suite(n.get("op", "")) == suffix]
        parts[suffix] = {
            **run,
            "rows": [r for r in run["rows"] if suite(r["op"]) == suffix],
            "not_run": raw["fastalign_not_run"],
            "raw": raw,
        }
    return parts


def progress_line(run: dict) -> str | None:
    """Says so when the run did not finish every benchmark it collected."""
    progress = run.get("progress")
    if not progress:
        return None
    status = progress.get("exitstatus")
    if status == 0:
        return None
    done, planned = progress.get("done"), progress.get("planned")
    how = {None: "was cut off", 1: "had failures", 2: "was interrupted"}.get(status, f"ended with status {status}")
    return (f"**Partial run**: the run {how} after {done}{f' of {planned}' if planned else ''} benchmarks "
            "(all suites together); this table holds the rows measured before that.")


def _case_key(r: dict):
    return (r["op"], r["pass"], tuple(r["shape"]), r["dtype"])


def _sort_key(r: dict):
    n_elems = 1
    for s in r["shape"]:
        n_elems *= s
    return (
        r["op"],
        n_elems,
        list(DTYPE_SHORT).index(r["dtype"]) if r["dtype"] in DTYPE_SHORT else 99,
        PASS_ORDER.index(r["pass"]) if r["pass"] in PASS_ORDER else 99,
        IMPL_ORDER.index(r["impl"]) if r["impl"] in IMPL_ORDER else 99,
        r["impl"],
    )


def add_ratios(rows: list[dict]) -> None:
    """r["vs_<impl>"]: this row's median over <impl>'s median for the same case, for every impl;
    r["mem_vs_<impl>"]: the same for peak memory, where both were measured."""
    medians, peaks = defaultdict(dict), defaultdict(dict)
    for r in rows:
        medians[_case_key(r)][r["impl"]] = r["median_ms"]
        peaks[_case_key(r)][r["impl"]] = r.get("peak_mib")
    impls = set(BASELINES) | {r["impl"] for r in rows}
    for r in rows:
        for impl in impls:
            b = medians[_case_key(r)].get(impl)
            r["vs_" + impl] = r["median_ms"] / b if b else None
            m = peaks[_case_key(r)].get(impl)
            r["mem_vs_" + impl] = r["peak_mib"] / m if m and r.get("peak_mib") is not None else None


def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 0.1 else f"{v:.3f}"


def _ratio(v) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}×" if v >= 0.1 else f"{v:.3f}×"


def _mib(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.0f}" if abs(v) >= 10 else f"{v:.1f}"


def _flagged(r: dict) -> bool:
    return r["err"] is not None and not r["err"] <= ERROR_FLAG.get(r["dtype"], ERROR_FLAG_DEFAULT)


def _contended(r: dict) -> bool:
    return r["device"] == "cpu" and (r.get("others_busy") or 0) > BUSY_FLAG


def table(rows: list[dict]) -> str:
    head = ["op", "pass", "shape", "dtype", "impl", "median ms", "peak MiB", *BASELINES.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 5 + ["---:"] * (len(head) - 5)) + "|"]
    for r in sorted(rows, key=_sort_key):
        impl = r["label"] + (" †" if _flagged(r) else "") + (" ‡" if _contended(r) else "")
        if r["impl"] in ("native", "native-tiled", "triton", "triton-tiled"):
            impl = f"**{impl}**"
        cells = [
            r["op"],
            r["pass"],
            "×".join(map(str, r["shape"])),
            DTYPE_SHORT.get(r["dtype"], r["dtype"]),
            impl,
            _ms(r["median_ms"]),
            _mib(r["peak_mib"]),
            *(_ratio(r["vs_" + k]) for k in BASELINES),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_lines(rows: list[dict], device_type: str) -> list[str]:
    out = []
    for t in TARGETS:
        if t["device"] != device_type:
            continue
        for r in rows:
            if (r["op"], r["pass"], list(r["shape"]), r["dtype"], r["impl"]) != (
                t["op"], t["pass"], t["shape"], t["dtype"], t["impl"]
            ):
                continue
            parts = []
            for base, limit in t["max"].items():
                got = r["vs_" + base]
                verdict = "no baseline" if got is None else ("met" if got <= limit else "MISSED")
                parts.append(f"{_ratio(got)} {BASELINES[base].removeprefix('vs ')} (target ≤ {limit}×, {verdict})")
            for base, limit in t.get("max_memory", {}).items():
                got = r.get("mem_vs_" + base)
                verdict = "not measured" if got is None else ("met" if got <= limit else "MISSED")
                parts.append(
                    f"peak memory {_ratio(got)} {BASELINES[base].removeprefix('vs ')} (target ≤ {limit}×, {verdict})"
                )
            for base, name in t.get("also", {}).items():
                if r.get("vs_" + base) is not None:
                    parts.append(f"{_ratio(r['vs_' + base])} {name}")
            case = f"{r['op']} {r['pass']} {DTYPE_SHORT.get(r['dtype'], r['dtype'])} {'×'.join(map(str, r['shape']))}"
            out.append(f"- Target, {r['label']}, {case}: " + "; ".join(parts))
    return out


def describe(machine: dict) -> dict:
    info = dict(machine.get("fastalign") or {})
    if "slug" not in info:
        # JSON from a plain pytest-benchmark run: name the machine from what pytest-benchmark saw.
        brand = (machine.get("cpu") or {}).get("brand_raw") or machine.get("processor") or "unknown"
        info.setdefault("type", "cpu")
        info.setdefault("name", brand)
        info["slug"] = naming.cpu_slug(brand)
    return info


def render(run: dict, table_only: bool = False) -> str:
    rows = run["rows"]
    add_ratios(rows)
    info = describe(run["machine"])
    body = [table(rows)]
    targets = target_lines(rows, info.get("type", ""))
    if table_only:
        return "\n".join(body + ([""] + targets if targets else [])) + "\n"

    where = info.get("name", "?")
    if info.get("type") == "cpu":
        where += f", {info.get('cores', info.get('threads', '?'))} cores, {info.get('threads', '?')} torch threads"
    versions = " · ".join(
        f"{k} {info[k]}" for k in ("torch", "triton", "trl", "fastalign") if info.get(k)
    )
    commit = run["commit"] or {}
    commit_txt = ""
    if commit.get("id") and commit["id"] not in ("unknown", "unversioned"):
        commit_txt = f" · commit {commit['id'][:10]}{' (dirty)' if commit.get('dirty') else ''}"
    counts = sorted({r["rounds"] for r in rows if r["rounds"]})
    rounds = f"{counts[0]}–{counts[-1]}" if len(counts) > 1 else (counts[0] if counts else "?")
    mem = info.get("peak_memory_method")
    mem_txt = (
        f"peak MiB = extra memory one call needs at its peak, outputs included ({mem})"
        if mem
        else "peak MiB: n/a (no usable memory probe on this machine)"
    )
    busy = info.get("others_busy")
    busy_txt = ""
    if busy is not None and info.get("type") == "cpu":
        busy_txt = f" Other processes kept {busy:.0%} of the CPUs busy during the run"
        busy_txt += "; timings are shaken by that, rerun on a quiet machine." if busy > 0.1 else "."
    partial = progress_line(run)
    out = [
        f"### Benchmarks on {info.get('type', '?')}: {where}",
        "",
        *([partial, ""] if partial else []),
        f"{versions}{commit_txt} · {run['datetime'][:19].replace('T', ' ')}",
        "",
        f"Median of {rounds} rounds{' (more for faster rows)' if len(counts) > 1 else ''} after warm-up; ratios are median time over the "
        f"baseline's median in the same run (below 1× is faster); {mem_txt}.{busy_txt}",
        "",
        *body,
        "",
    ]
    if targets:
        out += targets + [""]
    notes = [f"- {name}: {text}" for name, text in LEGEND]
    flagged = [r for r in rows if _flagged(r)]
    for r in sorted(flagged, key=_sort_key):
        notes.append(
            f"- † {r['label']}, {r['pass']} {DTYPE_SHORT.get(r['dtype'], r['dtype'])} {'×'.join(map(str, r['shape']))}: "
            "forward outputs differ "
            f"from the eager reference by up to {r['err']:.3g}"
        )
    contended = sorted((r for r in rows if _contended(r)), key=_sort_key)
    if contended:
        worst = max(r["others_busy"] for r in contended)
        notes.append(
            f"- ‡ other processes kept more than {BUSY_FLAG:.0%} of the CPUs busy while this row was timed "
            f"(up to {worst:.0%}): its time is inflated; rerun `make bench` on a quiet machine"
        )
    seen = set()
    for n in run["not_run"]:
        key = (n.get("impl"), n.get("reason"))
        if key not in seen:
            seen.add(key)
            notes.append(f"- not run: {n.get('impl')} ({n.get('reason')})")
    out += notes
    return "\n".join(out) + "\n"


def _chart_case(r: dict) -> str:
    # Several ops can share one chart, so each bar group names its op.
    return f"{r['op']} {r['pass']} {DTYPE_SHORT.get(r['dtype'], r['dtype'])} {'×'.join(map(str, r['shape']))}"


def chart(run: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = sorted(run["rows"], key=_sort_key)
    if not rows:
        return False
    # One bar per row of the table, a case's bars together with a gap after them; a slot for
    # every implementation in every case would leave most of the chart empty.
    impls = list(dict.fromkeys(r["label"] for r in rows))
    bars_of = {label: ([], []) for label in impls}
    ticks, y, case = [], 0, None
    for r in rows:
        if _chart_case(r) != case:
            if case is not None:
                y += 1
            case = _chart_case(r)
            ticks.append([y, y, case])
        ys, xs = bars_of[r["label"]]
        ys.append(y)
        xs.append(r["median_ms"])
        ticks[-1][1] = y
        y += 1
    fig, ax = plt.subplots(figsize=(11, 1.5 + 0.22 * y))
    colors = plt.get_cmap("tab20")
    for j, label in enumerate(impls):
        ys, xs = bars_of[label]
        bars = ax.barh(ys, xs, height=0.8, label=label, color=colors(j % 20))
        ax.bar_label(bars, labels=[_ms(x) for x in xs], padding=2, fontsize=7)
    ax.set_yticks([(first + last) / 2 for first, last, _ in ticks], [name for _, _, name in ticks], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median ms (log scale, lower is better)")
    info = describe(run["machine"])
    ops = ", ".join(dict.fromkeys(r["op"] for r in rows))
    ax.set_title(f"{ops} on {info.get('name', '?')}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", type=Path, help="the row log (--bench-rows) or a pytest-benchmark JSON (--benchmark-json)")
    p.add_argument("--out-dir", type=Path, help="write <device>.md, <device>.json and <device>.png here, per suite")
    p.add_argument("--name", help="file name stem to use instead of the device name")
    p.add_argument("--table-only", action="store_true", help="just the table and target lines (for the README)")
    p.add_argument("--no-chart", action="store_true")
    args = p.parse_args(argv)

    run = load(args.json)
    if not run["rows"]:
        print(f"{args.json}: no fastalign benchmarks in this file", file=sys.stderr)
        return 1
    written = []
    for suffix, part in split_suites(run).items():
        text = render(part, table_only=args.table_only)
        print(text)
        if args.out_dir:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            stem = (args.name or describe(run["machine"])["slug"]) + suffix
            md = args.out_dir / f"{stem}.md"
            md.write_text(text)
            raw = args.out_dir / f"{stem}.json"
            if args.json.resolve() != raw.resolve():
                raw.write_text(json.dumps(part["raw"], indent=2) + "\n")
            written += [md, raw]
            png = args.out_dir / f"{stem}.png"
            if not args.no_chart and chart(part, png):
                written.append(png)
    if written:
        print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
