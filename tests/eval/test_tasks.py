"""Prepared offline tasks: same prompts/metrics as lm-eval's built-ins; acc/acc_norm as computed by hand;
hub failure fast and clear."""

import csv
import json
import time
from pathlib import Path

import lm_eval
import pytest
import torch
import yaml

from lightning_optlab.data.tokenizer import ByteTokenizer
from lightning_optlab.eval import (HubUnreachableError, ModuleLM, hellaswag_preprocess, hub_reachable,
                                   metrics_from_results, prepare_samples, prepare_tasks, run_tasks, sample_data_dir)
from lightning_optlab.models import GPT, GPTConfig

torch.set_num_threads(1)
BUILTIN = Path(lm_eval.__file__).parent / "tasks"


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def _builtin(rel):
    return yaml.load((BUILTIN / rel).read_text(), Loader=_Loader)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    assert prepare_samples(out) == ["arc_easy", "arc_challenge", "hellaswag", "mmlu"]
    return out


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(1)
    return ModuleLM(GPT(GPTConfig(vocab_size=257, block_size=64, n_layer=1, n_head=2, n_embd=16)), ByteTokenizer())


def test_prepared_tasks_have_the_builtin_prompts_and_metrics(task_dir):
    arc = _builtin("arc/arc_easy.yaml")
    keys = ["output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "test_split"]
    for name in ("arc_easy", "arc_challenge"):
        ours = yaml.safe_load((task_dir / name / f"{name}.yaml").read_text())
        assert {k: ours[k] for k in keys} == {k: arc[k] for k in keys}
    hs, ours = _builtin("hellaswag/hellaswag.yaml"), yaml.safe_load((task_dir / "hellaswag/hellaswag.yaml").read_text())
    keys = ["output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "validation_split"]
    assert {k: ours[k] for k in keys} == {k: hs[k] for k in keys}
    template = _builtin("mmlu/default/_default_template_yaml")
    subject = _builtin("mmlu/default/mmlu_high_school_computer_science.yaml")
    ours = yaml.safe_load((task_dir / "mmlu/high_school_computer_science/mmlu_high_school_computer_science.yaml")
                          .read_text())
    for k in ["output_type", "doc_to_text", "doc_to_choice", "doc_to_target", "metric_list", "test_split",
              "fewshot_split", "fewshot_config"]:
        assert ours[k] == template[k], k
    assert ours["description"] == subject["description"] and ours["task"] == subject["task"]


def test_hellaswag_documents_are_preprocessed_as_lm_eval_does(task_dir):
    import datasets
    import importlib.util

    spec = importlib.util.spec_from_file_location("hs_utils", BUILTIN / "hellaswag/utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    raw = [json.loads(x) for x in (sample_data_dir() / "hellaswag/hellaswag_val.jsonl").read_text().splitlines()]
    theirs = utils.process_docs(datasets.Dataset.from_list(raw))
    ours = [json.loads(x) for x in (task_dir / "hellaswag/validation.jsonl").read_text().splitlines()]
    assert [d["query"] for d in ours] == theirs["query"]
    assert [d["choices"] for d in ours] == theirs["choices"]
    assert "[" not in "".join(d["query"] for d in ours)  # the WikiHow samples exercise the cleaning
    assert hellaswag_preprocess(" a [title] b  [step] c ") == "a. b  c"  # one pass of "  " -> " "


def _arc_docs(name):
    path = sample_data_dir() / f"ARC-V1-Feb2018/{name}/{name}-Test.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def _hand_acc(lm, items):
    """items: (context, [choice texts], gold index) -> (acc, acc_norm) from our own scores."""
    acc = norm = 0
    for ctx, choices, gold in items:
        scores = [lm.score_tokens([(lm.tok_encode(ctx), lm.tok_encode(" " + c))])[0][0] for c in choices]
        acc += max(range(len(choices)), key=lambda i: scores[i]) == gold
        # lm-eval's acc_norm: log-likelihood per character of the answer (the delimiter not counted)
        norm += max(range(len(choices)), key=lambda i: scores[i] / len(choices[i])) == gold
    return acc / len(items), norm / len(items)


def test_lm_eval_accuracies_equal_a_hand_computation(task_dir, lm):
    tasks = ["arc_easy", "arc_challenge", "hellaswag", "mmlu"]
    metrics = metrics_from_results(run_tasks(lm, tasks, task_dir=task_dir), tasks)
    assert set(metrics) == {"eval/arc_easy/acc", "eval/arc_easy/acc_norm", "eval/arc_challenge/acc",
                            "eval/arc_challenge/acc_norm", "eval/hellaswag/acc", "eval/hellaswag/acc_norm",
                            "eval/mmlu/acc"}
    for name, task in (("ARC-Easy", "arc_easy"), ("ARC-Challenge", "arc_challenge")):
        items = []
        for d in _arc_docs(name):
            labels = [c["label"] for c in d["question"]["choices"]]
            items.append((f"Question: {d['question']['stem']}\nAnswer:", [c["text"] for c in d["question"]["choices"]],
                          labels.index(d["answerKey"])))
        acc, norm = _hand_acc(lm, items)
        assert metrics[f"eval/{task}/acc"] == pytest.approx(acc)
        assert metrics[f"eval/{task}/acc_norm"] == pytest.approx(norm)
    raw = [json.loads(x) for x in (sample_data_dir() / "hellaswag/hellaswag_val.jsonl").read_text().splitlines()]
    items = [(hellaswag_preprocess(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize()),
              [hellaswag_preprocess(e) for e in d["endings"]], d["label"]) for d in raw]
    acc, norm = _hand_acc(lm, items)
    assert (metrics["eval/hellaswag/acc"], metrics["eval/hellaswag/acc_norm"]) == pytest.approx((acc, norm))
    correct = total = 0
    for path in sorted((sample_data_dir() / "mmlu/data/test").glob("*_test.csv")):
        subject = path.name[:-len("_test.csv")].replace("_", " ")
        for q, a, b, c, d, ans in csv.reader(path.open()):
            ctx = (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
                   f"{q.strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:")
            correct += _hand_acc(lm, [(ctx, list("ABCD"), "ABCD".index(ans))])[0]
            total += 1
    assert metrics["eval/mmlu/acc"] == pytest.approx(correct / total)  # size-weighted over subjects


def test_train_and_dev_files_become_the_few_shot_splits(tmp_path, lm):
    import shutil

    arc = tmp_path / "ARC-V1-Feb2018" / "ARC-Easy"
    arc.mkdir(parents=True)
    shutil.copy(sample_data_dir() / "ARC-V1-Feb2018/ARC-Easy/ARC-Easy-Test.jsonl", arc)
    shutil.copy(arc / "ARC-Easy-Test.jsonl", arc / "ARC-Easy-Train.jsonl")
    assert prepare_tasks(tmp_path / "t", arc=tmp_path / "ARC-V1-Feb2018") == ["arc_easy"]
    ours = yaml.safe_load((tmp_path / "t/arc_easy/arc_easy.yaml").read_text())
    assert ours["training_split"] == "train" and "validation_split" not in ours
    res = run_tasks(lm, ["arc_easy"], task_dir=tmp_path / "t", limit=2, num_fewshot=1)
    assert res["n-shot"]["arc_easy"] == 1 and res["results"]["arc_easy"]["acc,none"] in (0.0, 0.5, 1.0)


def test_limit_and_a_missing_task_name(task_dir, lm):
    res = run_tasks(lm, ["arc_easy"], task_dir=task_dir, limit=3)
    assert res["n-samples"]["arc_easy"]["effective"] == 3
    with pytest.raises(ValueError, match=r"\['winogrande'\] are not defined in"):
        run_tasks(lm, ["winogrande"], task_dir=task_dir)
    with pytest.raises(ValueError, match="nothing to prepare"):
        prepare_tasks(task_dir / "x")


def test_hub_task_without_network_fails_fast_and_says_what_to_do(monkeypatch, lm):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    start = time.perf_counter()
    with pytest.raises(HubUnreachableError, match="optlab eval prepare") as err:
        run_tasks(lm, ["arc_easy"])
    assert time.perf_counter() - start < 10
    assert "HF_DATASETS_OFFLINE=1" in str(err.value)
    # a network that never answers: the probe gives up after its timeout
    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: time.sleep(30))
    start = time.perf_counter()
    assert hub_reachable(timeout=0.5) is False
    assert time.perf_counter() - start < 3


def test_cache_only_mode_without_the_data_fails_fast_too(tmp_path):
    """HF_DATASETS_OFFLINE/HF_HUB_OFFLINE skip the hub check and read the cache; an empty cache
    gives the same clear error (the built-in index is limited to the tasks' folders: seconds, not 13 s)."""
    import os
    import subprocess
    import sys

    code = """
import time, torch
from lightning_optlab.eval import HubUnreachableError, ModuleLM, run_tasks
from lightning_optlab.data.tokenizer import ByteTokenizer
from lightning_optlab.models import GPT, GPTConfig
lm = ModuleLM(GPT(GPTConfig(vocab_size=257, block_size=32, n_layer=1, n_head=2, n_embd=16)), ByteTokenizer())
start = time.perf_counter()
try:
    run_tasks(lm, ["arc_easy", "mmlu"])
except HubUnreachableError as err:
    print("clear" if "optlab eval prepare" in str(err) else "unclear", round(time.perf_counter() - start, 1))
"""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    verdict, seconds = out.stdout.split()[-2:]
    assert verdict == "clear", out.stderr[-2000:]
    assert float(seconds) < 15
