"""Offline task definitions: local ARC, HellaSwag and MMLU files → lm-eval tasks under an ``include_path``.

lm-eval's built-in ``arc_easy``, ``arc_challenge``, ``hellaswag`` and ``mmlu`` read their data from
the Hugging Face hub (``allenai/ai2_arc``, ``Rowan/hellaswag``, ``cais/mmlu``). :func:`prepare_tasks`
reads the datasets in the formats their authors publish them in and writes, under one folder,
JSON-lines copies in the hub's schema and task YAMLs with the same names, prompts, answer choices,
targets, splits and metrics as lm-eval 0.4's built-in tasks (the tests compare the fields with the
installed built-in YAMLs). ``TaskManager(include_path=folder)`` then loads them with no network.

Published formats read here:

* ARC (Clark et al. 2018, "Think you have Solved Question Answering? Try ARC"): the AI2 release
  ``ARC-V1-Feb2018`` — ``ARC-Easy/ARC-Easy-Test.jsonl`` and ``ARC-Challenge/ARC-Challenge-Test.jsonl``
  (``-Train``/``-Dev`` beside them become the few-shot splits, as in lm-eval),
  one ``{"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}`` per line (the
  hub's flattened schema ``{"question": str, "choices": {"text": [...], "label": [...]}}`` is accepted too).
* HellaSwag (Zellers et al. 2019): ``hellaswag_val.jsonl`` (and ``hellaswag_train.jsonl``, the
  few-shot split, when present) with ``activity_label``, ``ctx_a``,
  ``ctx_b``, ``endings``, ``label`` per line (lm-eval scores the validation split; the test split
  has no labels). The documents are preprocessed as lm-eval's task does (below).
* MMLU (Hendrycks et al. 2021, "Measuring Massive Multitask Language Understanding"): the
  ``data/`` folder of ``data.tar`` — ``test/<subject>_test.csv`` (and ``dev/<subject>_dev.csv``,
  the few-shot split), header-less rows ``question, A, B, C, D, answer letter``.

The project ships small sample files in these formats, written for its tests and demo
(:func:`sample_data_dir`); they are not the benchmarks' data.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

__all__ = ["prepare_tasks", "prepare_samples", "sample_data_dir", "hellaswag_preprocess", "SAMPLE_TASKS",
           "DEFAULT_TASKS"]

#: the four zero-shot tasks of the budget study (Schlotthauer et al. 2025, arXiv 2507.08472)
DEFAULT_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "mmlu")
#: the tasks the shipped samples define (the same names)
SAMPLE_TASKS = DEFAULT_TASKS

_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}
_ARC_PROMPT = "Question: {{question}}\nAnswer:"
_MMLU_PROMPT = ("{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}"
                "\nAnswer:")


def sample_data_dir() -> Path:
    """The folder of the shipped sample files (``ARC-V1-Feb2018/``, ``hellaswag/``, ``mmlu/data/``)."""
    return Path(__file__).with_name("samples")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: Path, docs: Iterable[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    return path


def _write_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _find(root: Path, name: str) -> Path:
    if root.is_file():
        return root
    hits = sorted(root.rglob(name))
    if not hits:
        raise FileNotFoundError(f"no {name} under {root}: pass the folder of the published release "
                                f"(or the file itself)")
    return hits[0]


def _json_dataset(split_files: dict[str, Path]) -> dict[str, Any]:
    # lm-eval calls datasets.load_dataset(path, name, **dataset_kwargs): the "json" builder is local
    return {"dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {k: str(v.resolve()) for k, v in split_files.items()}}}


# ----------------------------------------------------------------------------- ARC
def _arc_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """An AI2-release ARC question in the hub's schema (a hub-schema document passes unchanged)."""
    q = doc["question"]
    if isinstance(q, dict):  # AI2 release: {"stem", "choices": [{"text", "label"}]}
        stem, choices = q["stem"], q["choices"]
        return {"id": doc["id"], "question": stem,
                "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
                "answerKey": doc["answerKey"]}
    if not isinstance(doc.get("choices"), dict):
        raise ValueError(f"ARC document {doc.get('id')!r} is in neither the AI2 nor the hub schema")
    return {"id": doc["id"], "question": q, "choices": doc["choices"], "answerKey": doc["answerKey"]}


def _prepare_arc(source: Path, out: Path) -> list[str]:
    written = []
    for task, subset in (("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge")):
        try:
            src = _find(source, f"{subset}-Test.jsonl")
        except FileNotFoundError:
            continue
        files = {"test": _write_jsonl(out / task / "test.jsonl", map(_arc_doc, _read_jsonl(src)))}
        splits = {}
        for split, part in (("train", "Train"), ("validation", "Dev")):  # few-shot sources, when present
            other = src.with_name(f"{subset}-{part}.jsonl")
            if other.is_file():
                files[split] = _write_jsonl(out / task / f"{split}.jsonl", map(_arc_doc, _read_jsonl(other)))
                splits[f"{'training' if split == 'train' else 'validation'}_split"] = split
        _write_yaml(out / task / f"{task}.yaml", {
            "task": task, **_json_dataset(files), "output_type": "multiple_choice", **splits, "test_split": "test",
            "doc_to_text": _ARC_PROMPT, "doc_to_target": "{{choices.label.index(answerKey)}}",
            "doc_to_choice": "{{choices.text}}", "should_decontaminate": True,
            "doc_to_decontamination_query": _ARC_PROMPT, "metric_list": [_ACC, _ACC_NORM],
            "metadata": {"version": 1.0, "source": str(src.resolve())}})
        written.append(task)
    if not written:
        raise FileNotFoundError(f"no ARC-Easy-Test.jsonl or ARC-Challenge-Test.jsonl under {source}")
    return written


# ----------------------------------------------------------------------------- HellaSwag
def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag text cleaning: strip, WikiHow's ``[title]`` → ``". "``, drop other
    ``[...]`` markers, collapse double spaces once."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_doc(doc: dict[str, Any]) -> dict[str, Any]:
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {**doc, "label": str(doc["label"]),
            "query": hellaswag_preprocess(doc["activity_label"] + ": " + context),
            "choices": [hellaswag_preprocess(e) for e in doc["endings"]], "gold": int(doc["label"])}


def _prepare_hellaswag(source: Path, out: Path) -> list[str]:
    src = _find(source, "hellaswag_val.jsonl")
    files = {"validation": _write_jsonl(out / "hellaswag" / "validation.jsonl",
                                        map(_hellaswag_doc, _read_jsonl(src)))}
    splits = {}
    train = src.with_name("hellaswag_train.jsonl")
    if train.is_file():  # the few-shot source, when present
        files["train"] = _write_jsonl(out / "hellaswag" / "train.jsonl", map(_hellaswag_doc, _read_jsonl(train)))
        splits["training_split"] = "train"
    # The documents are preprocessed here, so the YAML needs no process_docs function.
    _write_yaml(out / "hellaswag" / "hellaswag.yaml", {
        "task": "hellaswag", **_json_dataset(files), "output_type": "multiple_choice", **splits,
        "validation_split": "validation", "doc_to_text": "{{query}}", "doc_to_target": "{{label}}",
        "doc_to_choice": "choices", "metric_list": [_ACC, _ACC_NORM],
        "metadata": {"version": 1.0, "source": str(src.resolve())}})
    return ["hellaswag"]


# ----------------------------------------------------------------------------- MMLU
def _mmlu_rows(path: Path, subject: str) -> list[dict[str, Any]]:
    docs = []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
                raise ValueError(f"{path}: expected rows `question,A,B,C,D,answer letter`, got {row}")
            docs.append({"question": row[0], "subject": subject, "choices": row[1:5],
                         "answer": "ABCD".index(row[5].strip())})
    return docs


def _prepare_mmlu(source: Path, out: Path) -> list[str]:
    tests = sorted(source.rglob("*_test.csv")) if source.is_dir() else [source]
    if not tests:
        raise FileNotFoundError(f"no <subject>_test.csv under {source}: pass MMLU's data/ folder")
    subtasks = []
    for test in tests:
        subject = test.name[: -len("_test.csv")]
        files = {"test": _write_jsonl(out / "mmlu" / subject / "test.jsonl", _mmlu_rows(test, subject))}
        dev = test.parent.parent / "dev" / f"{subject}_dev.csv"
        config: dict[str, Any] = {}
        if dev.is_file():
            files["dev"] = _write_jsonl(out / "mmlu" / subject / "dev.jsonl", _mmlu_rows(dev, subject))
            config = {"fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"}}
        task = f"mmlu_{subject}"
        _write_yaml(out / "mmlu" / subject / f"{task}.yaml", {
            "task": task, "task_alias": subject.replace("_", " "), **_json_dataset(files), "test_split": "test",
            **config, "output_type": "multiple_choice",
            "description": f"The following are multiple choice questions (with answers) about "
                           f"{' '.join(subject.split('_'))}.\n\n",
            "doc_to_text": _MMLU_PROMPT, "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer",
            "metric_list": [_ACC], "metadata": {"version": 1.0, "source": str(test.resolve())}})
        subtasks.append(task)
    # One group over the subjects, weighted by size: the same number as lm-eval's two-level
    # mmlu -> {stem, humanities, ...} grouping, since nested size-weighted means are the plain
    # mean over all questions.
    _write_yaml(out / "mmlu" / "_mmlu.yaml", {
        "group": "mmlu", "task": subtasks,
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 2}})
    return ["mmlu"]


def prepare_tasks(out_dir: str | Path, *, arc: str | Path | None = None, hellaswag: str | Path | None = None,
                  mmlu: str | Path | None = None) -> list[str]:
    """Write lm-eval task definitions for local copies of ARC, HellaSwag and MMLU.

    Args:
        out_dir: the folder to pass as lm-eval's ``include_path`` (created).
        arc: the AI2 ``ARC-V1-Feb2018`` folder (or one ``*-Test.jsonl``).
        hellaswag: the folder holding ``hellaswag_val.jsonl`` (or the file).
        mmlu: MMLU's ``data/`` folder (``test/`` and ``dev/``), or one ``<subject>_test.csv``.

    Returns:
        The task (and group) names defined: ``arc_easy``, ``arc_challenge``, ``hellaswag``, ``mmlu``.

    Example:
        >>> prepare_tasks("tasks", arc="ARC-V1-Feb2018", hellaswag="hellaswag", mmlu="mmlu/data")
        >>> lm_eval.simple_evaluate(model=lm, tasks=["mmlu"], task_manager=TaskManager(include_path="tasks"))
    """
    if arc is None and hellaswag is None and mmlu is None:
        raise ValueError("nothing to prepare: pass arc=, hellaswag= and/or mmlu= (local copies of the datasets), "
                         "or use prepare_samples() for the shipped samples")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    for source, prepare in ((arc, _prepare_arc), (hellaswag, _prepare_hellaswag), (mmlu, _prepare_mmlu)):
        if source is not None:
            source = Path(source)
            if not source.exists():
                raise FileNotFoundError(f"{source} does not exist")
            names += prepare(source, out)
    (out / "optlab_tasks.json").write_text(json.dumps({"tasks": names}, indent=1))
    return names


def prepare_samples(out_dir: str | Path) -> list[str]:
    """:func:`prepare_tasks` on the shipped sample files (tiny, written by this project)."""
    root = sample_data_dir()
    return prepare_tasks(out_dir, arc=root / "ARC-V1-Feb2018", hellaswag=root / "hellaswag",
                         mmlu=root / "mmlu" / "data")
