"""From (test example, predicted text) pairs to per-item scores and per-task summaries.

An example may have a closed answer set in two ways: its prompt lists MMAU-style options "(A) ...", so a letter
answers it; or it carries `choices` (a closed set asked without letters, e.g. "how many beeps?" over one..four),
so only the words count. Either way it gets an accuracy and a chance level; every example also gets exact match
and token F1, and captioning tasks get CIDEr-D over the task's examples.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

from af2_jax.evaluation import cider, metrics

MCQ, CLOSED, OPEN = "mcq", "closed", "open"


def is_captioning_task(task: str) -> bool:
    """Captioning tasks (synthetic 'caption', AF2 manifest names like 'Clotho-v2-AudioCaptioning') get CIDEr-D."""
    return "caption" in task.lower()


def score_item(example: Mapping[str, Any], prediction: str) -> dict[str, Any]:
    """One prediction's scores. `example` has 'id', 'task', 'prompt', 'answer' and optionally 'choices'."""
    prompt, answer = example["prompt"], example["answer"]
    note = None
    options = metrics.parse_options(prompt)
    if options:
        kind = MCQ
        chosen = metrics.match_option(prediction, options)
        gold = metrics.match_option(answer, options)
    elif example.get("choices"):
        kind = CLOSED
        options = metrics.options_from_choices(list(example["choices"]))
        chosen = metrics.match_option_text(prediction, options)
        gold = metrics.match_option_text(answer, options)
    else:
        kind, options, chosen, gold = OPEN, None, None, None
    if kind != OPEN and gold is None:
        # A data problem (the reference is none of the options), not a model error: score the item as open text
        # and say so, rather than stop a long evaluation or count it against the model.
        note = f"reference {answer!r} names none of the options; scored as open-ended"
        logging.warning("%s: %s", example["id"], note)
        kind, options, chosen = OPEN, None, None
    return {
        "id": example["id"],
        "task": example["task"],
        "prompt": prompt,
        "answer": answer,
        "references": list(example.get("references") or [answer]),
        "prediction": prediction,
        "kind": kind,
        "options": options,
        "chosen": chosen,
        "correct": None if kind == OPEN else float(chosen == gold),
        "chance": None if kind == OPEN else metrics.chance_accuracy(options),
        "exact_match": metrics.exact_match(prediction, answer),
        "token_f1": metrics.token_f1(prediction, answer),
        "note": note,
    }


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(items: Sequence[Mapping[str, Any]], *, captioning: bool) -> dict[str, Any]:
    """Means over `items` (one task, or all); accuracy/chance only over closed-set items, None if there are none."""
    closed = [it for it in items if it["kind"] != OPEN]
    summary = {
        "count": len(items),
        "closed_count": len(closed),
        "accuracy": _mean([it["correct"] for it in closed]),
        "chance": _mean([it["chance"] for it in closed]),
        # Closed-set predictions that chose no option at all: a model that has not learnt the answer format.
        "no_option_rate": _mean([float(it["chosen"] is None) for it in closed]),
        "exact_match": _mean([it["exact_match"] for it in items]),
        "token_f1": _mean([it["token_f1"] for it in items]),
        "cider_d": None,
    }
    if captioning and items:
        summary["cider_d"], _ = cider.cider_d([it["prediction"] for it in items], [it["references"] for it in items])
    return summary


def summarize_by_task(items: Sequence[Mapping[str, Any]]) -> tuple[dict[str, dict], dict[str, Any]]:
    """({task: summary}, overall summary). Overall means are over items; 'macro_accuracy' averages the tasks'."""
    by_task: dict[str, list] = {}
    for it in items:
        by_task.setdefault(it["task"], []).append(it)
    tasks = {task: summarize(group, captioning=is_captioning_task(task)) for task, group in sorted(by_task.items())}
    overall = summarize(items, captioning=False)
    overall["macro_accuracy"] = _mean([s["accuracy"] for s in tasks.values() if s["accuracy"] is not None])
    return tasks, overall
