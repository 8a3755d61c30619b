"""Super-NaturalInstructions (SNI) task files: records, a lazy loader, schema checks.

An SNI task is one JSON file (`natural-instructions/tasks/<task>.json`) with
`Definition` (a list of one string), `Categories` (a list of strings),
`Positive Examples` (`[{"input", "output", "explanation"}]`), `Instances`
(`[{"id", "input", "output": [str, ...]}]`) and language keys.

Layouts `load_sni` understands:
- the full `natural-instructions` clone: `<dir>/tasks/*.json`, and the split lists
  `<dir>/splits/default/{train,test}_tasks.txt` (`split="train"`/`"test"` selects);
- a subset such as `../shared/data/sni-mini`: `<dir>/tasks/*.json` plus a
  `splits.json` `{"tasks": [...], "categories": {category: [task, ...]}}`;
- a flat directory of task JSON files (`<dir>/*.json`), e.g. what
  `tasks.synthetic.write_synthetic_suite` writes.

Reading is lazy: `SniCollection` lists file names up front and parses a task file
only when that task is selected. Category lookup uses, in order, `splits.json`'s
category table, an index file `<dir>/fedprompt_category_index.json` (written by
`write_category_index`), and otherwise reads only the `Categories` key of each file
(a full parse of each file, done once per collection and cached).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Iterable, Mapping, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]

CATEGORY_INDEX_FILE = "fedprompt_category_index.json"
_REQUIRED_KEYS = ("Definition", "Categories", "Instances")


class SniFormatError(ValueError):
    """A task file does not follow the SNI schema (message names file, key and fix)."""


@dataclasses.dataclass(frozen=True)
class SniInstance:
    """One instance: an input and its reference outputs (at least one)."""

    id: str
    input: str
    outputs: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SniPositiveExample:
    """One demonstration from a task's `Positive Examples`."""

    input: str
    output: str
    explanation: str = ""


@dataclasses.dataclass(frozen=True)
class SniTask:
    """One parsed SNI task.

    `categories` is SNI's list; the first entry is the task's category for client
    partitions (`category`). `source_path` is None for generated tasks.
    """

    name: str
    definition: str
    categories: tuple[str, ...]
    positive_examples: tuple[SniPositiveExample, ...]
    instances: tuple[SniInstance, ...]
    input_language: tuple[str, ...] = ("English",)
    output_language: tuple[str, ...] = ("English",)
    source_path: Optional[str] = None

    @property
    def category(self) -> str:
        return self.categories[0]

    def to_json_dict(self, *, source: str = "") -> dict:
        """The task in SNI's JSON layout (what `parse_task_dict` reads back)."""
        return {
            "Contributors": [],
            "Source": [source] if source else [],
            "Categories": list(self.categories),
            "Definition": [self.definition],
            "Input_language": list(self.input_language),
            "Output_language": list(self.output_language),
            "Instruction_language": ["English"],
            "Positive Examples": [
                {"input": p.input, "output": p.output, "explanation": p.explanation}
                for p in self.positive_examples
            ],
            "Negative Examples": [],
            "Instances": [
                {"id": i.id, "input": i.input, "output": list(i.outputs)} for i in self.instances
            ],
        }


def _string_list(value, *, where: str, key: str, allow_empty: bool = False) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SniFormatError(
            f"{where}: key `{key}` must be a list of strings, got {type(value).__name__} "
            f"{str(value)[:80]!r}. Fix the file (SNI writes e.g. `\"{key}\": [\"...\"]`)."
        )
    if not value and not allow_empty:
        raise SniFormatError(f"{where}: key `{key}` is an empty list; give at least one string.")
    return tuple(value)


def parse_task_dict(
    data: Mapping,
    *,
    name: str,
    source_path: Optional[str] = None,
    max_instances: Optional[int] = None,
) -> SniTask:
    """Validates one task's JSON object and returns the `SniTask`.

    Raises:
      SniFormatError: a required key is missing or has the wrong type, or the task
        has no instances. The message names the file (or task) and key.
    """
    where = f"task file {source_path}" if source_path else f"task `{name}`"
    if not isinstance(data, Mapping):
        raise SniFormatError(
            f"{where}: the top level must be a JSON object with keys {list(_REQUIRED_KEYS)}, "
            f"got {type(data).__name__}."
        )
    for key in _REQUIRED_KEYS:
        if key not in data:
            raise SniFormatError(
                f"{where}: missing required key `{key}` (present: {sorted(data)}). "
                "SNI task files need `Definition`, `Categories` and `Instances`; "
                "point `directory` at SNI task files or add the key."
            )
    definition = " ".join(_string_list(data["Definition"], where=where, key="Definition"))
    categories = _string_list(data["Categories"], where=where, key="Categories")
    raw_instances = data["Instances"]
    if not isinstance(raw_instances, list):
        raise SniFormatError(
            f"{where}: key `Instances` must be a list of "
            f'{{"id", "input", "output"}} objects, got {type(raw_instances).__name__}.'
        )
    if not raw_instances:
        raise SniFormatError(
            f"{where}: `Instances` is empty; a task needs at least one instance. "
            "Remove the task from the selection (`task_names=`) or from the directory."
        )
    if max_instances is not None:
        raw_instances = raw_instances[:max_instances]
    instances = []
    for index, raw in enumerate(raw_instances):
        if not isinstance(raw, Mapping) or "input" not in raw or "output" not in raw:
            raise SniFormatError(
                f"{where}: `Instances[{index}]` must be an object with `input` and `output`, "
                f"got {str(raw)[:80]!r}."
            )
        if not isinstance(raw["input"], str):
            raise SniFormatError(f"{where}: `Instances[{index}].input` must be a string.")
        outputs = _string_list(raw["output"], where=where, key=f"Instances[{index}].output")
        instance_id = raw.get("id", f"{name}-{index}")
        instances.append(SniInstance(id=str(instance_id), input=raw["input"], outputs=outputs))
    positives = []
    for index, raw in enumerate(data.get("Positive Examples", []) or []):
        if not isinstance(raw, Mapping) or "input" not in raw or "output" not in raw:
            raise SniFormatError(
                f"{where}: `Positive Examples[{index}]` must be an object with `input` and "
                f"`output`, got {str(raw)[:80]!r}."
            )
        output = raw["output"]
        if isinstance(output, list):  # A few SNI files store a list here.
            output = output[0] if output else ""
        positives.append(
            SniPositiveExample(
                input=str(raw["input"]),
                output=str(output),
                explanation=str(raw.get("explanation", "")),
            )
        )
    return SniTask(
        name=name,
        definition=definition,
        categories=categories,
        positive_examples=tuple(positives),
        instances=tuple(instances),
        input_language=_string_list(
            data.get("Input_language", ["English"]), where=where, key="Input_language", allow_empty=True
        ),
        output_language=_string_list(
            data.get("Output_language", ["English"]),
            where=where,
            key="Output_language",
            allow_empty=True,
        ),
        source_path=source_path,
    )
