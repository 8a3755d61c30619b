"""A synthetic instruction suite in SNI format: fedprompt's offline default data.

Design (what it is for):
- 8 categories x 3 tasks = 24 tasks, like `../shared/data/sni-mini`, so every
  experiment runs offline, deterministically and fast on the tiny backbone.
- **Shared inputs, different rules.** Almost every task reads one of three input
  formats: a list of distinct letters (`"c a f d"`, from a-j, 3-6 items), a list
  of digits (`"3 7 1 7"`, 3-5 items, repeats allowed) or a list of distinct
  English words (`"red cat box"`, 2-4 items from a fixed 24-word vocabulary of
  animals, colours and objects). The same input `"c a f d"` must become `"a c d f"`
  (Sorting), `"d f a c"` (Reversal), `"c a"` (Selection), `"4"` (Counting),
  `"C A F D"` (Case Conversion) or `"no"` (Classification, "contains a?"). The
  output rule is given only by the definition (and the soft prompt), so a prompt
  personalised to one category pulls the model toward that category's rule on
  everyone else's inputs: local score up, global score down, which is the
  trade-off fedprompt measures. Inside a category the three tasks share the rule
  and vary the input format, so a category is a coherent "client domain".
- **Translation-like category**: word-by-word translation of English word lists
  into three invented languages (Zorbic, Kalani, Vexi) through fixed dictionaries
  over the same 24 words; three dictionaries = three tasks with the same inputs.
- **Small and learnable**: definitions are one short sentence, inputs at most 6
  items, outputs at most 11 characters except translation (at most ~24), ASCII
  only, so definition + input + output fit in about 64 byte-level BPE tokens, and
  each rule is a short algorithm (copy, permute, look up, count, add) that a 2-4
  layer GPT-2 with hidden 64-128 learns in minutes of pre-training.
- **Unambiguous exact match**: every instance has exactly one reference output,
  computed from its input (sorting of digits keeps repeats; letters and words are
  distinct within an input, so "contains" and "first/last" are well defined).
  Inputs are unique within a task, and positive examples never reuse an instance's
  input. Yes/no and even/odd tasks alternate their labels, so they are balanced.
- **Deterministic**: each task draws from its own `random.Random` seeded by
  SHA-256 of `(seed, task name)`, so the suite is a pure function of `seed` and
  `instances_per_task`, stable across Python versions and platforms, and adding a
  task never changes the others. The dictionaries and vocabulary are constants,
  identical for every seed.

`write_synthetic_suite` writes one SNI JSON file per task, readable by
`tasks.sni.load_sni` like any SNI directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import random
from typing import Callable, Sequence, Union

from tasks.sni import SniInstance, SniPositiveExample, SniTask

PathLike = Union[str, os.PathLike]

SOURCE = "fedprompt.tasks.synthetic"
LETTERS = tuple("abcdefghij")
DIGITS = tuple("0123456789")
ANIMALS = ("cat", "dog", "fox", "owl", "bee", "cow", "hen", "pig")
COLOURS = ("red", "blue", "green", "pink", "gray", "gold", "tan", "black")
OBJECTS = ("cup", "hat", "box", "key", "pen", "bag", "car", "map")
WORDS = ANIMALS + COLOURS + OBJECTS

# Fixed, invented vocabularies (one word per English word, all distinct across the
# three languages and from English), so translation is a pure lookup.
# Rows: (English, Zorbic, Kalani, Vexi).
_DICTIONARY_ROWS = (
    ("cat", "kazo", "ni", "xixys"),
    ("dog", "rur", "kani", "dex"),
    ("fox", "tor", "lihi", "xedis"),
    ("owl", "zar", "mena", "vis"),
    ("bee", "zozu", "ka", "xydis"),
    ("cow", "zuzo", "le", "sexex"),
    ("hen", "tur", "ki", "xixix"),
    ("pig", "rar", "mi", "syvyx"),
    ("red", "tuko", "li", "xixis"),
    ("blue", "ror", "hema", "pis"),
    ("green", "vur", "ne", "xex"),
    ("pink", "rata", "nina", "xys"),
    ("gray", "roku", "nala", "dys"),
    ("gold", "zur", "na", "xydex"),
    ("tan", "taru", "me", "vyx"),
    ("black", "ruzo", "ha", "xevix"),
    ("cup", "kaka", "haka", "dedis"),
    ("hat", "zuzu", "lemi", "xesis"),
    ("box", "ruru", "naki", "xyvex"),
    ("key", "tazo", "nima", "pyx"),
    ("pen", "vuzo", "ke", "sys"),
    ("bag", "tuva", "mile", "pevis"),
    ("car", "rova", "leha", "devis"),
    ("map", "zoro", "keme", "sis"),
)  # fmt: skip
DICTIONARIES = {
    language: {row[0]: row[column] for row in _DICTIONARY_ROWS}
    for column, language in enumerate(("Zorbic", "Kalani", "Vexi"), start=1)
}

CATEGORIES = (
    "Sorting",
    "Reversal",
    "Selection",
    "Counting",
    "Case Conversion",
    "Arithmetic",
    "Translation",
    "Classification",
)


def _letters(rng: random.Random) -> list[str]:
    return rng.sample(LETTERS, rng.randint(3, 6))


def _digits(rng: random.Random) -> list[str]:
    return [rng.choice(DIGITS) for _ in range(rng.randint(3, 5))]


def _words(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(2, 4))


def _words3(rng: random.Random) -> list[str]:
    # Selection of first/last needs at least 3 items to differ from the input.
    return rng.sample(WORDS, rng.randint(3, 4))


@dataclasses.dataclass(frozen=True)
class _Spec:
    name: str
    category: str
    definition: str
    sample: Callable[[random.Random], list[str]]
    rule: Callable[[list[str]], str]
    labels: tuple[str, ...] = ()  # Balanced by rejection sampling when set.
    output_language: str = "English"


def _join(items: Sequence[str]) -> str:
    return " ".join(items)


def _translate(language: str) -> Callable[[list[str]], str]:
    table = DICTIONARIES[language]
    return lambda items: _join(table[w] for w in items)


_SPECS = (
    _Spec("sort_letters_ascending", "Sorting", "Sort the letters in alphabetical order.",
          _letters, lambda x: _join(sorted(x))),
    _Spec("sort_letters_descending", "Sorting", "Sort the letters in reverse alphabetical order.",
          _letters, lambda x: _join(sorted(x, reverse=True))),
    _Spec("sort_digits_ascending", "Sorting", "Sort the digits from smallest to largest.",
          _digits, lambda x: _join(sorted(x))),
    _Spec("reverse_letters", "Reversal", "Write the letters in reverse order.",
          _letters, lambda x: _join(x[::-1])),
    _Spec("reverse_digits", "Reversal", "Write the digits in reverse order.",
          _digits, lambda x: _join(x[::-1])),
    _Spec("reverse_words", "Reversal", "Write the words in reverse order.",
          _words, lambda x: _join(x[::-1])),
    _Spec("first_two_letters", "Selection", "Write only the first two letters.",
          _letters, lambda x: _join(x[:2])),
    _Spec("last_two_digits", "Selection", "Write only the last two digits.",
          _digits, lambda x: _join(x[-2:])),
    _Spec("first_and_last_word", "Selection", "Write only the first and the last word.",
          _words3, lambda x: _join([x[0], x[-1]])),
    _Spec("count_letters", "Counting", "Count the letters.",
          _letters, lambda x: str(len(x))),
    _Spec("count_digits", "Counting", "Count the digits.",
          _digits, lambda x: str(len(x))),
    _Spec("count_words", "Counting", "Count the words.",
          _words, lambda x: str(len(x))),
    _Spec("uppercase_letters", "Case Conversion", "Write the letters in upper case.",
          _letters, lambda x: _join(c.upper() for c in x)),
    _Spec("uppercase_words", "Case Conversion", "Write the words in upper case.",
          _words, lambda x: _join(w.upper() for w in x)),
    _Spec("capitalize_words", "Case Conversion", "Capitalize the first letter of each word.",
          _words, lambda x: _join(w.capitalize() for w in x)),
    _Spec("sum_digits", "Arithmetic", "Add the digits.",
          _digits, lambda x: str(sum(int(d) for d in x))),
    _Spec("max_digit", "Arithmetic", "Write the largest digit.",
          _digits, lambda x: max(x)),
    _Spec("min_digit", "Arithmetic", "Write the smallest digit.",
          _digits, lambda x: min(x)),
    _Spec("translate_english_zorbic", "Translation", "Translate the words into Zorbic.",
          _words, _translate("Zorbic"), output_language="Zorbic"),
    _Spec("translate_english_kalani", "Translation", "Translate the words into Kalani.",
          _words, _translate("Kalani"), output_language="Kalani"),
    _Spec("translate_english_vexi", "Translation", "Translate the words into Vexi.",
          _words, _translate("Vexi"), output_language="Vexi"),
    _Spec("contains_letter_a", "Classification", "Answer yes if the letter a is in the list, else no.",
          _letters, lambda x: "yes" if "a" in x else "no", labels=("yes", "no")),
    _Spec("digit_sum_parity", "Classification", "Answer even if the digits add up to an even number, else odd.",
          _digits, lambda x: "even" if sum(int(d) for d in x) % 2 == 0 else "odd",
          labels=("even", "odd")),
    _Spec("contains_animal", "Classification", "Answer yes if an animal is in the list, else no.",
          _words, lambda x: "yes" if set(x) & set(ANIMALS) else "no", labels=("yes", "no")),
)  # fmt: skip

NUM_POSITIVE_EXAMPLES = 2


def synthetic_task_names() -> tuple[str, ...]:
    """Names of the suite's tasks (`synth<NN>_<rule>`), in generation order."""
    return tuple(f"synth{i:02d}_{spec.name}" for i, spec in enumerate(_SPECS, start=1))


def _task_rng(seed: int, task_name: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{task_name}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _draw(rng: random.Random, spec: _Spec, label: str | None, seen: set[str]):
    # 10_000 tries is far beyond what any task needs at the sizes we allow (the
    # smallest input space, digit lists, has 111,000 members).
    for _ in range(10_000):
        items = spec.sample(rng)
        text = _join(items)
        output = spec.rule(items)
        if text in seen or (label is not None and output != label):
            continue
        seen.add(text)
        return text, output
    raise RuntimeError(f"could not draw a new input for synthetic task {spec.name!r}")


def generate_synthetic_suite(*, seed: int = 0, instances_per_task: int = 120) -> list[SniTask]:
    """The 24 synthetic tasks (8 categories x 3), a pure function of the arguments.

    Args:
      seed: selects the instances (the rules, dictionaries and definitions do not
        depend on it).
      instances_per_task: instances in each task, >= 1 and <= 2000.

    Returns:
      `SniTask`s in `synthetic_task_names()` order; instance ids are
      `<task name>-<index>`; each task has 2 positive examples.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__} {seed!r}.")
    if not isinstance(instances_per_task, int) or not 1 <= instances_per_task <= 2000:
        raise ValueError(
            f"`instances_per_task` must be an int in [1, 2000], got {instances_per_task!r}. "
            "The smallest task input space keeps larger suites from staying unique per task."
        )
    tasks = []
    for name, spec in zip(synthetic_task_names(), _SPECS):
        rng = _task_rng(seed, name)
        seen: set[str] = set()
        instances = []
        for index in range(instances_per_task):
            label = spec.labels[index % len(spec.labels)] if spec.labels else None
            text, output = _draw(rng, spec, label, seen)
            instances.append(SniInstance(id=f"{name}-{index:04d}", input=text, outputs=(output,)))
        positives = []
        for index in range(NUM_POSITIVE_EXAMPLES):
            label = spec.labels[index % len(spec.labels)] if spec.labels else None
            text, output = _draw(rng, spec, label, seen)
            positives.append(
                SniPositiveExample(
                    input=text, output=output, explanation=f"{spec.definition} Answer: {output}"
                )
            )
        tasks.append(
            SniTask(
                name=name,
                definition=spec.definition,
                categories=(spec.category,),
                positive_examples=tuple(positives),
                instances=tuple(instances),
                input_language=("English",),
                output_language=(spec.output_language,),
                source_path=None,
            )
        )
    return tasks


def write_synthetic_suite(
    directory: PathLike, *, seed: int = 0, instances_per_task: int = 120
) -> list[pathlib.Path]:
    """Writes the suite as SNI JSON files `<directory>/tasks/<task>.json`.

    Also writes `<directory>/splits.json` (`{"tasks": [...], "categories": {...}}`,
    the sni-mini layout), so `load_sni(directory)` finds categories without parsing
    task files. Existing files with the same names are overwritten.

    Returns:
      The task file paths, in `synthetic_task_names()` order.
    """
    root = pathlib.Path(directory)
    (root / "tasks").mkdir(parents=True, exist_ok=True)
    tasks = generate_synthetic_suite(seed=seed, instances_per_task=instances_per_task)
    paths = []
    for task in tasks:
        path = root / "tasks" / f"{task.name}.json"
        path.write_text(
            json.dumps(task.to_json_dict(source=SOURCE), indent=1, ensure_ascii=True) + "\n",
            encoding="ascii",
        )
        paths.append(path)
    categories: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    for task in tasks:
        categories[task.category].append(task.name)
    splits = {"tasks": [t.name for t in tasks], "categories": categories, "seed": seed}
    (root / "splits.json").write_text(json.dumps(splits, indent=1) + "\n", encoding="ascii")
    return paths
