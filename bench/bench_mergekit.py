"""What the mergekit bridge costs: one merge of T fine-tunes of a LLaMA-shaped model, three routes.

* ``mergekit tsv``:       `tsv-fast mergekit CONFIG OUT` (mergekit's merge, merge_method: tsv: one
                          tsv_fast engine call per tensor)
* ``mergekit task_arithmetic``: the same command with mergekit's own task_arithmetic (no SVD at all:
                          the floor of a mergekit merge of these files)
* ``tsv-fast merge``:     tsv_fast's own streamed merge of the same inputs (tsv-m, same weights)

Each route runs in its own subprocess (OMP_NUM_THREADS=1 unless --threads): wall time of the whole
process (Python, imports, merge, write), the merge alone (timed inside, after the imports) and the
process's own peak RSS (VmHWM). The tsv output of both routes is compared key by key. The inputs are
a random LLaMA (transformers' LlamaForCausalLM, saved with save_pretrained, float32) and T fine-tunes
with low-rank task updates plus noise. Needs mergekit (pip install "tsv_fast[mergekit]"). Usage:

    python bench/bench_mergekit.py                                  # hidden 768, 4 layers, vocab 8192, T = 3
    python bench/bench_mergekit.py --hidden 256 --layers 2 --runs 1 # a quick check
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_memory import _git_sha, run_measured  # noqa: E402 - bench/ is this script's folder

ROOT = Path(__file__).resolve().parents[1]

# Runs one route after its imports, so the merge time excludes them; the wrapper adds peak RSS.
CHILD = r"""
import sys, time
route, config, out = sys.argv[1:4]
import torch, tsv_fast.api, tsv_fast.engine.run, tsv_fast.io.sink, tsv_fast.io.sources, tsv_fast.methods.tsv_m  # lazy otherwise
if route == "tsv-fast merge":
    from tsv_fast.cli import app
    argv = ["merge", "-c", config, "--no-progress"]
else:
    import mergekit.scripts.run_yaml, tsv_fast.integrations.mergekit  # the command's imports, done up front
    from tsv_fast.cli import app
    argv = ["mergekit", config, out, "--no-copy-tokenizer", "--quiet"]
started = time.perf_counter()
code = app(argv, standalone_mode=False)
print("MERGE_SECONDS", time.perf_counter() - started, flush=True)
sys.exit(code or 0)
"""


def make_models(folder: Path, args) -> list[Path]:
    """base + T fine-tunes (save_pretrained, float32); reused when present."""
    paths = [folder / "base", *[folder / f"ft{t}" for t in range(args.tasks)]]
    if all((p / "config.json").is_file() for p in paths):
        return paths
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                      num_key_value_heads=max(1, args.hidden // 256), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(paths[0])
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    for t, path in enumerate(paths[1:]):
        with torch.no_grad():
            for key, param in model.named_parameters():
                update = 0.002 * torch.randn(param.shape, generator=gen)
                if param.ndim == 2:  # a rank-16 task update, as fine-tuning leaves them
                    update += 0.01 * torch.randn(param.shape[0], 16, generator=gen) @ torch.randn(16, param.shape[1],
                                                                                                 generator=gen)
                param.copy_(base[key] + update)
        model.save_pretrained(path)
    model.load_state_dict(base)
    return paths


def configs(folder: Path, paths: list[Path]) -> dict[str, Path]:
    import yaml

    models = [{"model": str(p.resolve())} for p in paths[1:]]
    common = {"base_model": str(paths[0].resolve()), "models": models}
    files = {"mergekit tsv": {**common, "merge_method": "tsv", "dtype": "float32"},
             "mergekit task_arithmetic": {**common, "merge_method": "task_arithmetic", "dtype": "float32",
                                          "parameters": {"weight": 1.0}},
             "tsv-fast merge": {**common, "merge_method": "tsv-m", "output": str((folder / "out_tsv_fast").resolve())}}
    out = {}
    for route, config in files.items():
        out[route] = folder / (route.replace(" ", "_") + ".yml")
        out[route].write_text(yaml.safe_dump(config, sort_keys=False))
    return out


# The imports of each route alone: the part of a route's peak RSS that is Python, torch and libraries.
_OURS = "import torch, tsv_fast.api, tsv_fast.engine.run, tsv_fast.io.sink, tsv_fast.io.sources, tsv_fast.cli"
BASELINES = {"tsv-fast merge": _OURS, "mergekit": _OURS + ", mergekit.scripts.run_yaml, tsv_fast.integrations.mergekit"}


def run_route(route: str, config: Path, out: Path, env: dict) -> dict:
    result = run_measured(["-c", CHILD, route, str(config), str(out)], env)
    merge = float(result["log_tail"].rsplit("MERGE_SECONDS", 1)[1].split()[0])
    return {"wall_seconds": result["wall_seconds"], "merge_seconds": round(merge, 2),
            "peak_rss_bytes": result["peak_rss_bytes"]}


def compare(a: Path, b: Path) -> float:
    """Largest relative Frobenius difference over the keys of two model folders."""
    from safetensors.torch import load_file

    from tsv_fast.testing import rel_fro

    def load(folder):
        out = {}
        for file in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(file)))
        return out

    x, y = load(a), load(b)
    assert x.keys() == y.keys(), sorted(set(x) ^ set(y))[:5]
    return max(rel_fro(x[k], y[k]) for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 8/3 of hidden, rounded to 256")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--runs", type=int, default=3, help="runs per route (median reported)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", type=Path, default=None, help="folder for the models (default: temporary)")
    parser.add_argument("--note", default="", help="machine state, recorded with the results")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: bench/results/mergekit_cpu_<date>.json)")
    parser.add_argument("--render", type=Path, default=None, help="write the README table from this results JSON and stop")
    args = parser.parse_args()
    if args.render:
        render(args.render)
        return
    args.intermediate = args.intermediate or max(256, round(args.hidden * 8 / 3 / 256) * 256)

    import importlib.metadata as md

    import torch

    threads = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
    temp = tempfile.TemporaryDirectory(prefix="tsv-bench-mergekit-") if args.data is None else None
    folder = Path(temp.name) if temp else args.data
    folder.mkdir(parents=True, exist_ok=True)
    print(f"writing {args.tasks + 1} models to {folder}", flush=True)
    paths = make_models(folder, args)
    model_bytes = sum(f.stat().st_size for f in paths[0].glob("*.safetensors"))
    files = configs(folder, paths)
    baselines = {name: run_measured(["-c", code], env) for name, code in BASELINES.items()}
    routes = {}
    for route, config in files.items():
        out = folder / ("out_" + route.replace(" ", "_"))
        runs = [run_route(route, config, out, env) for _ in range(args.runs)]
        routes[route] = {key: statistics.median(r[key] for r in runs) for key in runs[0]} | {"runs": runs}
        r = routes[route]
        print(f"{route:26s} wall {r['wall_seconds']:7.1f} s  merge {r['merge_seconds']:7.1f} s  "
              f"peak RSS {r['peak_rss_bytes'] / 2**20:6.0f} MiB", flush=True)
    diff = compare(folder / "out_mergekit_tsv", folder / "out_tsv_fast")
    print(f"max rel. difference, mergekit tsv vs tsv-fast merge: {diff:.1e}")
    results = {"machine": {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                           "cpu_count": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
                           "torch": torch.__version__, "mergekit": md.version("mergekit"),
                           "transformers": md.version("transformers"), "git_sha": _git_sha(),
                           "load_average": os.getloadavg(), "note": args.note,
                           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
               "model": {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers,
                         "vocab": args.vocab, "dtype": "float32", "bytes": model_bytes, "tasks": args.tasks},
               "routes": routes, "max_rel_diff_tsv_routes": diff,
               "imports_only": {name: {"wall_seconds": b["wall_seconds"], "peak_rss_bytes": b["peak_rss_bytes"]}
                                for name, b in baselines.items()},
               "command": "python bench/bench_mergekit.py " + " ".join(sys.argv[1:])}
    out = args.out or ROOT / "bench" / "results" / f"mergekit_cpu_{time.strftime('%Y%m%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results in {out}")
    if temp:
        temp.cleanup()


def render(path: Path) -> None:
    """The README table (between the bench_mergekit markers) from one results file."""
    path = path.resolve()
    data = json.loads(path.read_text())
    m, model = data["machine"], data["model"]
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    rows = ["| route | wall (s) | merge (s) | peak RSS (MiB) | of which imports (MiB) |", "|---|---|---|---|---|"]
    for route, r in data["routes"].items():
        base = data["imports_only"]["tsv-fast merge" if route == "tsv-fast merge" else "mergekit"]
        rows.append(f"| {route} | {r['wall_seconds']:.1f} | {r['merge_seconds']:.1f} | {mib(r['peak_rss_bytes'])} | "
                    f"{mib(base['peak_rss_bytes'])} |")
    runs = len(next(iter(data["routes"].values()))["runs"])
    text = "\n".join([
        f"**Bench** (`{data['command'].split(' --note')[0]}`, `{path.relative_to(ROOT)}`): T = {model['tasks']} fine-tunes of a "
        f"LLaMA-shaped model (hidden {model['hidden']}, {model['layers']} layers, vocabulary {model['vocab']}, "
        f"float32, {model['bytes'] / 2**20:.0f} MiB per model), each route in its own process, median of {runs}; "
        f"{m['threads']} thread, torch {m['torch']}, mergekit {m['mergekit']}, transformers {m['transformers']}, "
        f"git {m['git_sha'][:10]}; {m['note']}. Merge = the merge call after the imports; wall = the whole process.",
        "", *rows, "",
        f"The two tsv outputs differ by at most {data['max_rel_diff_tsv_routes']:.1e} (relative, per key)."])
    readme = ROOT / "README.md"
    head, rest = readme.read_text().split("<!-- bench_mergekit:begin -->\n", 1)
    _, tail = rest.split("<!-- bench_mergekit:end -->", 1)
    readme.write_text(f"{head}<!-- bench_mergekit:begin -->\n{text}\n<!-- bench_mergekit:end -->{tail}")
    print(text)


if __name__ == "__main__":
    main()
