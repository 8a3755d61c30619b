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
import difflib
import json
import os
import pathlib
import re
from typing import Iterable, Mapping, Sequence, Union

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
    source_path: str | None = None

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
            f'{str(value)[:80]!r}. Fix the file (SNI writes e.g. `"{key}": ["..."]`).'
        )
    if not value and not allow_empty:
        raise SniFormatError(f"{where}: key `{key}` is an empty list; give at least one string.")
    return tuple(value)


def parse_task_dict(
    data: Mapping,
    *,
    name: str,
    source_path: str | None = None,
    max_instances: int | None = None,
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
            data.get("Input_language", ["English"]),
            where=where,
            key="Input_language",
            allow_empty=True,
        ),
        output_language=_string_list(
            data.get("Output_language", ["English"]),
            where=where,
            key="Output_language",
            allow_empty=True,
        ),
        source_path=source_path,
    )


# SNI files put `Categories` near the top (before the large `Instances` list), so
# the category of a task can be read from the first bytes without a full parse.
_CATEGORIES_RE = re.compile(r'"Categories"\s*:\s*(\[[^\]]*\])')
_HEAD_BYTES = 1 << 16


def _read_json(path: pathlib.Path):
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SniFormatError(f"task file {path}: not UTF-8 ({e}). Re-save it as UTF-8.") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SniFormatError(
            f"task file {path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}. "
            "Fix the file (check with `python -m json.tool FILE`) or remove it from the directory."
        ) from e


class SniCollection:
    """The SNI task files of one directory, parsed lazily and cached.

    Construction lists file names only. `categories()` reads category tables (see
    the module docstring), `load_task` parses one file.
    """

    def __init__(self, directory: PathLike):
        root = pathlib.Path(directory).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"`directory` {str(root)!r} is not a directory. Point it at a clone of "
                "https://github.com/allenai/natural-instructions, a subset such as "
                "../shared/data/sni-mini, or a folder of SNI task JSON files."
            )
        self.directory = root
        task_dir = root / "tasks" if (root / "tasks").is_dir() else root
        files = {p.stem: p for p in task_dir.glob("*.json") if p.name != CATEGORY_INDEX_FILE}
        files.pop("splits", None)  # sni-mini style `splits.json` in a flat directory.
        if not files:
            raise FileNotFoundError(
                f"no task files (*.json) in {task_dir}. Expected `<directory>/tasks/*.json` "
                "(natural-instructions layout) or `<directory>/*.json`."
            )
        self._files = files
        self._splits_json = None
        splits_path = root / "splits.json"
        if splits_path.is_file():
            self._splits_json = _read_json(splits_path)
        order = None
        if self._splits_json and isinstance(self._splits_json.get("tasks"), list):
            order = [n for n in self._splits_json["tasks"] if n in files]
        listed = set(order or [])
        self._names = tuple((order or []) + sorted(n for n in files if n not in listed))
        self._category_of: dict[str, str] | None = None
        self._cache: dict[tuple[str, int | None], SniTask] = {}

    @property
    def task_names(self) -> tuple[str, ...]:
        """Every task in the directory (splits.json order, else sorted)."""
        return self._names

    def task_path(self, name: str) -> pathlib.Path:
        self._check_names([name])
        return self._files[name]

    def split_task_names(self, split: str) -> tuple[str, ...]:
        """Tasks of SNI's `splits/default/<split>_tasks.txt` that are present here."""
        path = self.directory / "splits" / "default" / f"{split}_tasks.txt"
        if not path.is_file():
            raise FileNotFoundError(
                f"`split`={split!r} needs {path}, which does not exist. SNI's clone has "
                "`splits/default/train_tasks.txt` and `test_tasks.txt`; use split=None for "
                "other directories."
            )
        wanted = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return tuple(n for n in wanted if n and n in self._files)

    def _lookup_categories(self) -> dict[str, str]:
        if self._category_of is not None:
            return self._category_of
        category_of: dict[str, str] = {}
        table = (self._splits_json or {}).get("categories")
        index_path = self.directory / CATEGORY_INDEX_FILE
        if not isinstance(table, Mapping) and index_path.is_file():
            table = _read_json(index_path).get("categories")
        if isinstance(table, Mapping):
            for category, names in table.items():
                for name in names:
                    category_of[name] = category
        for name in self._names:
            if name not in category_of:
                category_of[name] = self._read_category(name)
        self._category_of = category_of
        return category_of

    def _read_category(self, name: str) -> str:
        path = self._files[name]
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES).decode("utf-8", errors="ignore")
        match = _CATEGORIES_RE.search(head)
        if match:
            try:
                values = json.loads(match.group(1))
                if values and all(isinstance(v, str) for v in values):
                    return values[0]
            except json.JSONDecodeError:
                pass
        return self.load_task(name, max_instances=None).category

    def category_of(self, name: str) -> str:
        self._check_names([name])
        return self._lookup_categories()[name]

    def categories(self) -> dict[str, list[str]]:
        """`{category: [task names]}` over every task, in task order."""
        table: dict[str, list[str]] = {}
        for name, category in self._lookup_categories().items():
            table.setdefault(category, []).append(name)
        return {c: [n for n in self._names if n in set(v)] for c, v in table.items()}

    def _check_names(self, names: Iterable[str]) -> None:
        unknown = [n for n in names if n not in self._files]
        if unknown:
            hints = {n: difflib.get_close_matches(n, self._names, n=2) for n in unknown}
            raise KeyError(
                f"`task_names` has unknown task(s) {unknown} for {self.directory} "
                f"(close matches: {hints}; {len(self._names)} tasks available, e.g. "
                f"{list(self._names[:3])}). Fix the names or the directory."
            )

    def select(
        self,
        *,
        task_names: Sequence[str] | None = None,
        categories: Sequence[str] | None = None,
        split: str | None = None,
    ) -> tuple[str, ...]:
        """Task names matching all given filters (None = no filter), in task order."""
        if isinstance(task_names, str) or isinstance(categories, str):
            raise TypeError("`task_names` and `categories` must be sequences of strings, not str.")
        names = list(self._names)
        if split is not None:
            keep = set(self.split_task_names(split))
            names = [n for n in names if n in keep]
        if task_names is not None:
            self._check_names(task_names)
            keep = set(task_names)
            names = [n for n in names if n in keep]
        if categories is not None:
            table = self.categories()
            unknown = [c for c in categories if c not in table]
            if unknown:
                raise KeyError(
                    f"`categories` has unknown categor(y/ies) {unknown} for {self.directory}; "
                    f"available: {sorted(table)}."
                )
            keep = {n for c in categories for n in table[c]}
            names = [n for n in names if n in keep]
        if not names:
            raise ValueError(
                f"no task of {self.directory} matches task_names={task_names}, "
                f"categories={categories}, split={split}; relax the filters."
            )
        return tuple(names)

    def load_task(self, name: str, *, max_instances: int | None = None) -> SniTask:
        """Parses (once) and validates one task file."""
        self._check_names([name])
        key = (name, max_instances)
        if key not in self._cache:
            path = self._files[name]
            self._cache[key] = parse_task_dict(
                _read_json(path), name=name, source_path=str(path), max_instances=max_instances
            )
        return self._cache[key]


def open_sni(directory: PathLike) -> SniCollection:
    """A lazy view of the SNI task files in `directory` (see module docstring)."""
    return SniCollection(directory)


def load_sni(
    directory: PathLike,
    *,
    task_names: Sequence[str] | None = None,
    categories: Sequence[str] | None = None,
    max_instances_per_task: int | None = None,
    split: str | None = None,
) -> list[SniTask]:
    """Parses the selected SNI tasks of `directory`; other task files are not read.

    Args:
      directory: an SNI clone, a subset like sni-mini, or a flat folder of task files.
      task_names: tasks to load (default all); unknown names raise `KeyError`.
      categories: keep only tasks whose first category is listed.
      max_instances_per_task: keep the first N instances of each task (>= 1).
      split: `"train"` or `"test"` to use the clone's `splits/default/` lists.

    Returns:
      `SniTask`s in directory order.
    """
    if max_instances_per_task is not None and max_instances_per_task < 1:
        raise ValueError(
            f"`max_instances_per_task` must be >= 1 or None, got {max_instances_per_task}."
        )
    collection = SniCollection(directory)
    names = collection.select(task_names=task_names, categories=categories, split=split)
    return [collection.load_task(n, max_instances=max_instances_per_task) for n in names]


def write_category_index(
    directory: PathLike, *, output_path: PathLike | None = None
) -> pathlib.Path:
    """Writes `{"categories": {category: [task, ...]}}` so later loads skip file reads.

    Defaults to `<directory>/fedprompt_category_index.json`, which `SniCollection`
    reads when there is no `splits.json` category table.
    """
    collection = SniCollection(directory)
    path = pathlib.Path(output_path) if output_path else collection.directory / CATEGORY_INDEX_FILE
    path.write_text(
        json.dumps({"categories": collection.categories()}, indent=1) + "\n", encoding="utf-8"
    )
    return path
