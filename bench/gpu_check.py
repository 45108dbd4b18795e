"""Helpers of bench/gpu_check.sh: the environment record, the final report, and applying results.

    python bench/gpu_check.py env OUT [--dry-run 0|1]     # summary.json with the environment
    python bench/gpu_check.py report OUT --raw DIR [...]  # the table printed last; exit 1 on failures
    python bench/gpu_check.py apply OUT [--readme README.md]   # here, after a GPU run: results.tar.gz
                                                              # into bench/results/, README tables

The report reads OUT/steps.tsv, OUT/tests.jsonl and the benchmark files (--raw, or OUT/results.tar.gz),
checks the goals of issue #16 against their floors, and names, per op, the backend that `auto`
should take on CUDA (the fastest that is accurate; see ``auto_choices``). Figures from a dry run
are labelled as such and never count as measurements.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README_BEGIN, README_END = "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->"

#: issue #16: (key, what, target, comparison)
GOALS = [
    ("merge_vs_authors", "ViT-L/14 T=20 whole encoder: ours vs the authors' route", 100.0, ">="),
    ("merge_over_floor", "ViT-L/14 T=20 whole encoder: ours over its floor", 2.0, "<="),
    ("task_gram_over_gemm", "task Gram (fp64, fused) over a cuBLAS DGEMM of its size", 1.3, "<="),
    ("reconstruct_speedup", "fused reconstruction vs GEMM + add + cast (fp32 IEEE)", 1.5, ">="),
    ("topk_vs_svd_loop", "batched cuSOLVER top-k vs a torch.linalg.svd loop, T=20", 5.0, ">="),
]


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# ------------------------------------------------------------------------------------------ env
def environment(dry_run: bool) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "host": platform.node(), "cpus": os.cpu_count(), "dry_run": dry_run,
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for module in ("triton", "numpy", "transformers"):
        try:
            env[module] = __import__(module).__version__
        except Exception as exc:  # noqa: BLE001 - a broken optional package is itself a finding
            env[module] = f"unavailable ({type(exc).__name__})"
    sha = _run(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    if sha:
        dirty = _run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
        env["git_sha"] = sha + ("-dirty" if dirty else "")
    else:  # the device machine gets a copy of the tree without .git
        env["git_sha"] = os.environ.get("TSV_FAST_GIT_SHA", "unknown") + " (from TSV_FAST_GIT_SHA)"
    nvcc = _run(["nvcc", "--version"]).splitlines()
    env["nvcc"] = nvcc[-2] if len(nvcc) >= 2 else "not found"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, sm=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1))
        env["nvidia_smi"] = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                                  "clocks.max.sm,power.limit", "--format=csv,noheader"])
    else:
        env["gpu"] = "none (CPU dry run)" if dry_run else "none: torch sees no CUDA device"
    return env


# ------------------------------------------------------------------------------------------ inputs
def read_steps(out: Path) -> list[dict]:
    path = out / "steps.tsv"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        name, status, seconds, note = (line.split("\t") + ["", "", "", ""])[:4]
        rows.append({"step": name, "status": status, "seconds": int(seconds or 0), "note": note})
    return rows


def read_tests(out: Path) -> dict:
    counts, failures = {}, []
    path = out / "tests.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        entry = json.loads(line)
        counts[entry["outcome"]] = counts.get(entry["outcome"], 0) + 1
        if entry["outcome"] != "passed":
            failures.append(f"{entry['nodeid']}: {entry['reason']}"[:240])
    return {"counts": counts, "not_passed": failures}


def bench_files(raw: Path | None, out: Path) -> dict[str, bytes]:
    """name -> content of every benchmark file, from --raw or from OUT/results.tar.gz."""
    files = {}
    if raw is not None and raw.is_dir():
        for path in raw.iterdir():
            if path.is_file() and not path.name.startswith("."):
                files[path.name] = path.read_bytes()
    elif (out / "results.tar.gz").exists():
        with tarfile.open(out / "results.tar.gz") as tar:
            for member in tar.getmembers():
                if member.isfile() and not Path(member.name).name.startswith("."):
                    files[Path(member.name).name] = tar.extractfile(member).read()
    return files


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# ------------------------------------------------------------------------------------------ goals
def merge_goals(files: dict[str, bytes]) -> tuple[dict, list[str]]:
    rows = []
    for name, content in files.items():
        if name.startswith("merge_") and name.endswith(".json"):
            rows += json.loads(content)["rows"]
    lines = [f"{r['provider']:<9} {r['time_median_s']:8.3f} s  x{r['ratio_vs_authors']:.1f}"
             f"{'*' if 'EXTRAPOLATED' in str(r['ratio_basis']) else ''} vs authors, floor "
             f"{max(r['floor_bandwidth_s'], r['floor_flops_s']):.3f} s, contract "
             f"{'ok' if r['acc_contract_ok'] else 'FAIL (%d matrices)' % r['acc_contract_failures']}, "
             f"err {r['acc_rel_err']:.1e} (authors {r['acc_authors_rel_err']:.1e})" for r in rows]
    ours = [r for r in rows if r["provider"] not in ("authors", "exact")]
    if not ours:
        return {}, lines
    best = min(ours, key=lambda r: r["time_median_s"])
    floor = max(best["floor_bandwidth_s"], best["floor_flops_s"])
    extrapolated = "EXTRAPOLATED" in str(best["ratio_basis"])
    return {
        "merge_vs_authors": {"value": best["ratio_vs_authors"], "floor": None, "provider": best["provider"],
                             "note": ("authors timed on 1 block, EXTRAPOLATED; " if extrapolated else "")
                             + f"{best['provider']} {best['time_median_s']:.3f} s"},
        "merge_over_floor": {"value": best["time_median_s"] / floor if floor else math.nan,
                             "floor": f"{floor:.3f} s", "provider": best["provider"],
                             "note": f"{best['time_median_s']:.3f} s / floor {floor:.3f} s"},
        "merge_contract": all(r["acc_contract_ok"] for r in rows),
    }, lines


def kernel_rows(files: dict[str, bytes]) -> list[dict]:
    rows = []
    for op in ("task_gram", "reconstruct", "sti", "stack_gram"):
        for suffix in ("", "_dryrun"):
            if f"{op}{suffix}.json" in files:
                rows += json.loads(files[f"{op}{suffix}.json"])["rows"]
    return rows


def _floor_ms(row: dict) -> str | None:
    return f"{row['floor_ms']} ms" if row.get("floor_ms") not in (None, "") else None


def kernel_goals(rows: list[dict]) -> dict:
    goals = {}
    for row in rows:
        if row["op"] == "task_gram" and row["provider"] == "triton" and row["precision"] == "fp64":
            goals["task_gram_over_gemm"] = {"value": _num(row["over_gemm"]), "floor": _floor_ms(row),
                                            "note": f"{row['shape']} T={row['tasks']}: {row['ms']} ms vs cuBLAS "
                                                    f"{row['gemm_ms']} ms"}
        if row["op"] == "reconstruct" and row["provider"] == "triton" and row["precision"] == "ieee":
            goals["reconstruct_speedup"] = {"value": _num(row["speedup_vs_torch"]), "floor": _floor_ms(row),
                                            "note": f"{row['shape']} T={row['tasks']}: {row['ms']} ms"}
    return goals


def cusolver_rows(files: dict[str, bytes]) -> list[dict]:
    rows = []
    for name, content in files.items():
        if name.startswith("cusolver_") and name.endswith(".csv"):
            rows += list(csv.DictReader(io.StringIO(content.decode())))
    return [r for r in rows if r.get("status", "").startswith("ok")]


def cusolver_goals(rows: list[dict]) -> dict:
    if not rows:
        return {}
    tasks = max(int(r["T"]) for r in rows)
    at = [r for r in rows if int(r["T"]) == tasks]
    loop = [r for r in at if r["provider"] == "torch.svd loop"]
    ext = [r for r in at if r["provider"].startswith("ext.")]
    if not loop or not ext:
        return {}
    best = min(ext, key=lambda r: _num(r["median_ms"]))
    return {"topk_vs_svd_loop": {"value": _num(loop[0]["median_ms"]) / _num(best["median_ms"]),
                                 "floor": _floor_ms(best),
                                 "note": f"{best['provider']} {best['median_ms']} ms (err {best['rel_err']}) vs "
                                         f"{loop[0]['median_ms']} ms, {best['m']}x{best['n']} T={tasks}"}}


def auto_choices(kernel: list[dict], cusolver: list[dict], merge_lines_rows: list[dict]) -> dict:
    """Per op, the fastest provider that is accurate: fp64 ops within 1e-10 of the float64 result,
    fp32 ops at most 2x torch's error in the same dtype. Measured rows only."""
    choice = {}
    for op, torch_provider, accurate in [
        ("task_gram", "torch fp64 Δ + DGEMM", lambda r: r["precision"] == "fp64"),
        ("stack_gram", "torch bmm", lambda r: r["precision"] == "fp64"),
        ("sti", "torch (sti_ref)", lambda r: True),
        ("reconstruct", "torch baddbmm + cast", lambda r: r["precision"] == "ieee")]:
        rows = [r for r in kernel if r["op"] == op and accurate(r)]
        base = [r for r in rows if r["provider"] == torch_provider]
        fast = [r for r in rows if r["provider"] == "triton" and (_num(r["max_rel_err"]) <= 1e-10 or op == "reconstruct")]
        if base and fast:
            torch_ms, triton_ms = _num(base[0]["ms"]), _num(fast[0]["ms"])
            choice[op] = {"backend": "triton" if triton_ms < torch_ms else "torch",
                          "why": f"triton {triton_ms:.3g} ms vs torch {torch_ms:.3g} ms ({fast[0]['shape']})"}
    eigh = [r for r in cusolver if "gram64" in r["provider"] and _num(r["rel_err"]) <= 1e-6]
    if eigh:
        best = min(eigh, key=lambda r: _num(r["median_ms"]))
        choice["eigh (task Grams)"] = {"backend": "cusolver" if best["provider"].startswith("ext.") else "torch",
                                       "why": f"{best['provider']} {best['median_ms']} ms, fastest accurate "
                                              f"Gram route ({best['m']}x{best['n']} T={best['T']})"}
    if merge_lines_rows:
        ok = [r for r in merge_lines_rows if r["provider"] not in ("authors", "exact") and r["acc_contract_ok"]]
        if ok:
            best = min(ok, key=lambda r: r["time_median_s"])
            choice["whole merge"] = {"backend": best["provider"],
                                     "why": f"{best['time_median_s']:.3f} s on {best['workload']} T={best['T']}, "
                                            "contract ok"}
    return choice


# ------------------------------------------------------------------------------------------ report
def report(out: Path, raw: Path | None, dry_run: bool, elapsed: int | None) -> int:
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    env = summary.get("env", {})
    steps = read_steps(out)
    tests = read_tests(out)
    files = bench_files(raw, out)
    merge, merge_lines = merge_goals(files)
    krows, crows = kernel_rows(files), cusolver_rows(files)
    goals = {**{k: v for k, v in merge.items() if k != "merge_contract"}, **kernel_goals(krows),
             **cusolver_goals(crows)}
    merge_rows = [r for n, c in files.items() if n.startswith("merge_") and n.endswith(".json")
                  for r in json.loads(c)["rows"]]
    choices = auto_choices(krows, crows, merge_rows)

    failed_steps = [s for s in steps if s["status"] in ("failed", "timeout") or (dry_run and s["status"] != "ok")]
    failed_tests = sum(n for outcome, n in tests["counts"].items() if outcome != "passed")
    contract_ok = merge.get("merge_contract")  # None: no merge was measured
    summary.update(steps=steps, tests=tests, goals=goals, auto_choices=choices, merge_lines=merge_lines,
                   elapsed_s=elapsed, bench_files=sorted(files), merge_contract_ok=contract_ok,
                   verdict="pass" if not failed_steps and not failed_tests and contract_ok is not False else "FAIL")
    summary_path.write_text(json.dumps(summary, indent=1, default=str) + "\n")

    mark = "  [DRY RUN: CPU stand-ins, every figure below is meaningless]" if dry_run else ""
    print()
    print(f"== GPU check: {env.get('gpu', '?')} | torch {env.get('torch', '?')} CUDA {env.get('torch_cuda', '?')} | "
          f"triton {env.get('triton', '?')} | git {env.get('git_sha', '?')} | {elapsed}s{mark}")
    print(f"{'step':<15} {'status':<8} {'s':>4}  note")
    for s in steps:
        print(f"{s['step']:<15} {s['status']:<8} {s['seconds']:>4}  {s['note']}")
    counts = ", ".join(f"{n} {k}" for k, n in sorted(tests["counts"].items())) or "none ran"
    print(f"tests: {counts} (a skip fails on this run)")
    for line in tests["not_passed"][:8]:
        print(f"  NOT PASSED {line}")
    for line in merge_lines:
        print(f"merge: {line}")
    print(f"{'goal':<58} {'measured':>9} {'target':>8} {'met':>4}  floor / note")
    for key, what, target, cmp in GOALS:
        g = goals.get(key)
        if g is None:
            print(f"{what:<58} {'-':>9} {cmp}{target:<6g} {'-':>4}  not measured in this run")
            continue
        value = g["value"]
        met = (value >= target) if cmp == ">=" else (value <= target)
        shown = f"{value:.2f}x" if math.isfinite(value) else "nan"
        print(f"{what:<58} {shown:>9} {cmp}{target:<6g} {'yes' if met and not dry_run else 'no' if not dry_run else '-':>4}"
              f"  floor {g.get('floor') or '-'}; {g['note']}")
    print("accuracy contract per matrix (merge): "
          + {True: "ok", False: "FAILED", None: "not measured"}[contract_ok])
    if choices:
        print("auto on CUDA, by measurement: " + "; ".join(f"{op} -> {c['backend']} ({c['why']})"
                                                           for op, c in choices.items()))
    print(f"verdict: {summary['verdict']}" + (" (dry run)" if dry_run else ""))
    return 0 if summary["verdict"] == "pass" else 1


# ------------------------------------------------------------------------------------------ apply
def apply(out: Path, readme: Path | None) -> None:
    """After a GPU run, on a checkout: the benchmark files into bench/results/ (with the summary),
    then the README tables regenerated from bench/results/."""
    summary = json.loads((out / "summary.json").read_text())
    if summary.get("env", {}).get("dry_run"):
        raise SystemExit("apply: this is a dry run's output; nothing in it is a measurement")
    files = bench_files(None, out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (RESULTS / name).write_bytes(content)
    gpu = "".join(c if c.isalnum() else "-" for c in summary["env"].get("gpu", "gpu")).strip("-").lower()
    stamp = summary["env"].get("timestamp", "")[:10].replace("-", "")
    (RESULTS / f"gpu_check_{gpu}_{stamp}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"apply: {len(files) + 1} files into {RESULTS}")
    if readme is not None:
        subprocess.run([sys.executable, str(ROOT / "bench" / "bench_merge.py"), "--render", "--readme", str(readme)],
                       check=True)
        update_readme(readme, render_gpu_block(summary))
        print(f"apply: README tables regenerated in {readme}")


def render_gpu_block(summary: dict) -> str:
    env = summary["env"]
    lines = [f"GPU acceptance run (`bash bench/gpu_check.sh`): {env.get('gpu')}, torch {env.get('torch')} "
             f"(CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, git {env.get('git_sha')}, "
             f"{env.get('timestamp')}.", "", "| goal | measured | target | floor / note |", "|---|---|---|---|"]
    for key, what, target, cmp in GOALS:
        g = summary["goals"].get(key)
        if g:
            lines.append(f"| {what} | {g['value']:.2f}x | {cmp} {target:g} | {g.get('floor') or '-'}; {g['note']} |")
        else:
            lines.append(f"| {what} | not measured | {cmp} {target:g} | |")
    lines += ["", "`auto` on CUDA by measurement: " + "; ".join(
        f"{op} → {c['backend']} ({c['why']})" for op, c in summary.get("auto_choices", {}).items()), ""]
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    body = f"{README_BEGIN}\n{block}{README_END}"
    if README_BEGIN in text and README_END in text:
        head, rest = text.split(README_BEGIN, 1)
        text = head + body + rest.split(README_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    readme.write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_env = sub.add_parser("env")
    p_env.add_argument("out", type=Path)
    p_env.add_argument("--dry-run", type=int, default=0)
    p_rep = sub.add_parser("report")
    p_rep.add_argument("out", type=Path)
    p_rep.add_argument("--raw", type=Path)
    p_rep.add_argument("--dry-run", type=int, default=0)
    p_rep.add_argument("--elapsed", type=int)
    p_app = sub.add_parser("apply")
    p_app.add_argument("out", type=Path)
    p_app.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    if args.command == "env":
        env = environment(bool(args.dry_run))
        (args.out / "summary.json").write_text(json.dumps({"env": env}, indent=1) + "\n")
        for key, value in env.items():
            print(f"  {key}: {value}")
        return 0
    if args.command == "report":
        return report(args.out, args.raw, bool(args.dry_run), args.elapsed)
    apply(args.out, args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
