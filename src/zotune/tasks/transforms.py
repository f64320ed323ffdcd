"""Row transforms: datasets whose rows need reshaping before a template can use them (MeZO /
ZO-Bench prepare them in code). A task names its transform (``rows: copa`` in its YAML or inline
spec) and it applies to the rows whatever their source: the hub, the local Hugging Face cache, or a
local ``task.path`` / ``task.test_path`` file in the hub's column layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


def _row_snli(row: dict) -> dict | None:
    return None if row.get("label") == -1 else row  # -1: annotators did not agree on a gold label


def _row_boolq(row: dict) -> dict:
    q = str(row["question"]).strip()  # MeZO: "Does ethanol take more energy make that produces?"
    q = q if q.endswith("?") else q + "?"
    return {**row, "question": q[:1].upper() + q[1:]}


def _row_wsc(row: dict) -> dict:
    return {**row, "span2_text": str(row["span2_text"]).lower()}  # MeZO lower-cases the pronoun


def _row_copa(row: dict) -> dict:
    """MeZO: "<premise without its final period> because|so" + " <alternative, first word
    lower-cased unless it is "I">"."""
    premise = str(row["premise"]).rstrip()
    stem = premise[:-1] if premise.endswith(".") else premise

    def lower(text: str) -> str:
        first, sep, rest = str(text).partition(" ")
        return (first if first == "I" else first.lower()) + sep + rest

    return {**row, "stem": stem, "connective": {"cause": "because", "effect": "so"}[row["question"]],
            "alternatives": [lower(row["choice1"]), lower(row["choice2"])]}


def _row_record(row: dict) -> dict | None:
    """MeZO's GPT-3 style: passage with ``@highlight`` lines as "- " bullets, then "- <query with
    the candidate in place of @placeholder>". Gold: the first answer among the entities."""
    entities = list(dict.fromkeys(row["entities"]))
    gold = next((a for a in row.get("answers") or [] if a in entities), None)
    if gold is None:  # the test split has no answers
        return None
    left, _, right = str(row["query"]).partition("@placeholder")
    return {"passage": str(row["passage"]).replace("@highlight\n", "- "), "query": row["query"],
            "query_left": left, "query_right": right, "entities": entities, "answers": list(row["answers"]),
            "label": entities.index(gold)}


def _row_winogrande(row: dict) -> dict | None:
    """ZO-Bench (after T0): the sentence up to the blank is the prompt; each candidate is an
    option followed by the rest of the sentence. ``answer`` "1"/"2" -> label 0/1."""
    before, blank, after = str(row["sentence"]).partition("_")
    if not blank or str(row.get("answer")) not in ("1", "2"):  # the test split has no answers
        return None
    return {**row, "context": before.rstrip(), "candidates": [row["option1"] + after, row["option2"] + after],
            "label": int(row["answer"]) - 1}


def _row_squad(row: dict) -> dict:
    return {**row, "answers": list(row["answers"]["text"])}


def _row_drop(row: dict) -> dict:
    return {**row, "answers": list(row["answers_spans"]["spans"])}


# name (a task's ``rows`` key) -> transform; a transform returning None drops the row.
ROW_TRANSFORMS: dict[str, Callable[[dict], dict | None]] = {
    "snli": _row_snli, "boolq": _row_boolq, "wsc": _row_wsc, "copa": _row_copa, "record": _row_record,
    "winogrande": _row_winogrande, "squad": _row_squad, "drop": _row_drop,
}


def transform_rows(name: str | None, rows: Iterable[dict]) -> list[dict]:
    """``rows`` reshaped by the transform called ``name`` (as they are if None)."""
    if name is None:
        return [dict(r) for r in rows]
    fn = ROW_TRANSFORMS[name]
    return [out for r in rows if (out := fn(dict(r))) is not None]
