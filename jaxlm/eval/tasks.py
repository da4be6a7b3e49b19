"""Log-likelihood benchmarks defined exactly as lm-evaluation-harness (0.4.x) defines them.

Each task turns a data row (Hugging Face field names) into one `Question`: a context string and the
continuation strings to score, built as the harness's task YAMLs build them:

    hellaswag      query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()),
                   choices = preprocess(ending) for each ending, gold = int(label)
    arc_easy       "Question: {question}\\nAnswer:", choices = choices.text,
    arc_challenge  gold = choices.label.index(answerKey)
    piqa           "Question: {goal}\\nAnswer:", choices = [sol1, sol2], gold = label
    lambada        (lambada_openai) context = all words of `text` but the last (split on " "),
                   continuation = " " + the last word; acc = the greedy continuation is the target

Multiple-choice continuations are target_delimiter (" ") + choice. With k-shot, the context is
"{text} {answer}\\n\\n" for each of k examples, then the row's text; the examples are drawn as the
harness's default sampler draws them: one `random.Random(seed)` (1234 by default) for the whole run,
called once per evaluated row in order, `sample(pool, k + 1)` with the evaluated row removed (the
pool is the evaluated file itself, so the row is excluded as the harness excludes it when the
few-shot split is the evaluation split).

Every row is validated before anything runs: a missing or malformed field stops with file:line, since
a silently skipped row would make the numbers differ from the harness's.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable, Sequence

from jaxlm.data.sources import read_all_or_fail
from jaxlm.errors import UsageError

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
FEWSHOT_SEED = 1234  # lm-evaluation-harness's default fewshot_random_seed


@dataclasses.dataclass(frozen=True)
class Task:
    """One benchmark: how a row becomes a context, its choices and its gold answer."""

    name: str
    output_type: str  # "multiple_choice" | "loglikelihood" (the harness's output types)
    file: str  # default data file, relative to the data directory
    fields: tuple  # fields every row needs
    text: Callable[[dict], str]  # doc_to_text (of the processed doc)
    target: Callable[[dict], object]  # doc_to_target: an index into the choices, or a string
    choices: Callable[[dict], list] | None = None  # doc_to_choice
    process: Callable[[dict], dict] | None = None  # process_docs, per row
    check: Callable[[dict], str | None] | None = None  # extra row check -> problem or None
    metrics: tuple = ("acc", "acc_norm")
    harness_name: str = ""  # the harness's task name, when it differs


@dataclasses.dataclass
class Question:
    """One evaluated row: what to score and how to grade it."""

    doc_id: int
    origin: str  # file:line
    doc: dict  # the processed row, as the harness's doc
    context: str  # few-shot examples + the row's text
    continuations: list[str]  # scored strings: delimiter + choice (or lambada's " word")
    choices: list[str]  # the choices without the delimiter (acc_norm divides by their length)
    gold: int  # index of the right continuation
    target: object  # the harness's doc_to_target value (for samples)


# ----------------------------------------------------------------------------- hellaswag
def hellaswag_preprocess(text: str) -> str:
    """The harness's hellaswag preprocessing (WikiHow's [title] / [step] artefacts removed)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_process(doc: dict) -> dict:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {**doc, "query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [hellaswag_preprocess(e) for e in doc["endings"]], "gold": int(doc["label"])}


def _hellaswag_check(doc):
    if not isinstance(doc["endings"], list) or not doc["endings"] or not all(isinstance(e, str) for e in doc["endings"]):
        return "field 'endings' is not a list of strings"
    if not all(isinstance(doc[f], str) for f in ("activity_label", "ctx_a", "ctx_b")):
        return "fields activity_label, ctx_a and ctx_b must be strings"
    if not str(doc["label"]).isdigit() or int(doc["label"]) >= len(doc["endings"]):
        return f"label {doc['label']!r} is not an index into the {len(doc['endings'])} endings"
    return None


# ----------------------------------------------------------------------------- arc
def _arc_check(doc):
    ch = doc["choices"]
    if not isinstance(ch, dict) or not isinstance(ch.get("text"), list) or not isinstance(ch.get("label"), list):
        return "field 'choices' needs lists 'text' and 'label'"
    if len(ch["text"]) != len(ch["label"]) or not ch["text"]:
        return "choices.text and choices.label differ in length"
    if doc["answerKey"] not in ch["label"]:
        return f"answerKey {doc['answerKey']!r} is not one of choices.label {ch['label']}"
    if not isinstance(doc["question"], str):
        return "field 'question' is not a string"
    return None


def _arc(name):
    return Task(name=name, output_type="multiple_choice", file=f"benchmarks/{name}_val.jsonl",
                fields=("question", "choices", "answerKey"),
                text=lambda d: f"Question: {d['question']}\nAnswer:",
                target=lambda d: d["choices"]["label"].index(d["answerKey"]),
                choices=lambda d: list(d["choices"]["text"]), check=_arc_check)


# ----------------------------------------------------------------------------- piqa
def _piqa_check(doc):
    if not all(isinstance(doc[f], str) for f in ("goal", "sol1", "sol2")):
        return "fields goal, sol1 and sol2 must be strings"
    if doc["label"] not in (0, 1):
        return f"label {doc['label']!r} is not 0 or 1"
    return None


# ----------------------------------------------------------------------------- lambada (OpenAI)
def _lambada_check(doc):
    if not isinstance(doc["text"], str) or " " not in doc["text"]:
        return "field 'text' must be a string of several words"
    return None


TASKS: dict[str, Task] = {
    "hellaswag": Task(name="hellaswag", output_type="multiple_choice", file="benchmarks/hellaswag_val.jsonl",
                      fields=("activity_label", "ctx_a", "ctx_b", "endings", "label"),
                      text=lambda d: d["query"], target=lambda d: d["gold"], choices=lambda d: d["choices"],
                      process=_hellaswag_process, check=_hellaswag_check),
    "arc_easy": _arc("arc_easy"),
    "arc_challenge": _arc("arc_challenge"),
    "piqa": Task(name="piqa", output_type="multiple_choice", file="benchmarks/piqa_val.jsonl",
                 fields=("goal", "sol1", "sol2", "label"), text=lambda d: f"Question: {d['goal']}\nAnswer:",
                 target=lambda d: d["label"], choices=lambda d: [d["sol1"], d["sol2"]], check=_piqa_check),
    "lambada": Task(name="lambada", output_type="loglikelihood", file="benchmarks/lambada_test.jsonl",
                    fields=("text",), text=lambda d: " ".join(d["text"].split(" ")[:-1]),
                    target=lambda d: " " + d["text"].split(" ")[-1], check=_lambada_check,
                    metrics=("perplexity", "acc"), harness_name="lambada_openai"),
}
ALIASES = {"lambada_openai": "lambada"}


def get_task(name: str) -> Task:
    key = ALIASES.get(name, name)
    if key not in TASKS:
        raise UsageError(f"unknown task {name!r}; log-likelihood tasks are {', '.join(TASKS)}")
    return TASKS[key]


# ----------------------------------------------------------------------------- rows
def row_problem(task: Task, rec: dict) -> str | None:
    """What makes a row unusable for `task`, or None."""
    for f in task.fields:
        if f not in rec or rec[f] is None:
            return f"missing field '{f}'"
    return task.check(rec) if task.check else None


def read_docs(task: Task, spec: str) -> list[tuple[str, dict]]:
    """(origin 'file:line', row) of every row of `spec` ('PATH' or 'PATH[a:b]'). Any unusable row
    (malformed JSON, a missing or malformed field) is an error naming its file:line: a skipped row
    would make the score differ from the harness's."""
    records = read_all_or_fail(spec, lambda rec: row_problem(task, {k: v for k, v in rec.items() if k != "_origin"}),
                               what=f"{task.name} rows", row=f"{task.name} row")
    return [(rec.pop("_origin"), rec) for rec in records]


# ----------------------------------------------------------------------------- requests
class FewshotSampler:
    """lm-evaluation-harness's default ContextSampler with the evaluated row excluded: one
    random.Random(seed) for the run; per row, sample(pool, k + 1), drop rows equal to it, keep k.
    `random.sample` depends only on the pool's length, so indices stand in for the rows."""

    def __init__(self, pool: Sequence[dict], seed: int = FEWSHOT_SEED):
        self.pool, self.rnd = list(pool), random.Random(seed)

    def sample(self, k: int, doc: dict) -> list[dict]:
        if k + 1 > len(self.pool):
            raise UsageError(f"--num-fewshot {k} needs at least {k + 1} rows in the data, it has {len(self.pool)}")
        drawn = [self.pool[i] for i in self.rnd.sample(range(len(self.pool)), k + 1)]
        out = [d for d in drawn if d != doc][:k]
        if len(out) < k:  # duplicates of the row were drawn: resample from the pool without it
            rest = [d for d in self.pool if d != doc]
            if len(rest) < k:
                raise UsageError(f"--num-fewshot {k}: only {len(rest)} rows differ from the evaluated one")
            out = self.rnd.sample(rest, k)
        return out


def answer_text(task: Task, doc: dict) -> str:
    """The text a few-shot example shows after its question."""
    t = task.target(doc)
    return task.choices(doc)[t] if task.choices and isinstance(t, int) else t


def build_questions(task: Task, docs: Sequence[tuple[str, dict]], *, num_fewshot: int = 0,
                    limit: int | None = None, seed: int = FEWSHOT_SEED) -> list[Question]:
    """The task's questions for the first `limit` rows (all when None); few-shot examples come from
    all rows of `docs`."""
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}")
    if num_fewshot < 0:
        raise UsageError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    processed = [(origin, task.process(doc) if task.process else dict(doc)) for origin, doc in docs]
    sampler = FewshotSampler([d for _, d in processed], seed) if num_fewshot else None
    out = []
    for doc_id, (origin, doc) in enumerate(processed[:limit]):
        ctx = ""
        if sampler:
            for fs in sampler.sample(num_fewshot, doc):
                ctx += task.text(fs) + TARGET_DELIMITER + answer_text(task, fs) + FEWSHOT_DELIMITER
        ctx += task.text(doc)
        target = task.target(doc)
        if task.output_type == "multiple_choice":
            choices = list(task.choices(doc))
            conts = [TARGET_DELIMITER + c for c in choices]
            gold = target
        else:
            choices, conts, gold = [target], [target], 0
        out.append(Question(doc_id, origin, doc, ctx, conts, choices, gold, target))
    return out
