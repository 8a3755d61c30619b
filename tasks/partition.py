"""Federated clients from SNI tasks with controlled, recorded heterogeneity.

Everything here is a pure function of its arguments (one `numpy` generator seeded
by `seed`), so the same call always gives the same partition.

How `build_federated_split` cuts the examples (each example is in exactly one
place, or unused):
1. Every task instance becomes an `Example`; examples are grouped by category
   (a task's first SNI category) and shuffled within each category.
2. **Global test set**: the first `global_test_per_category` examples of every
   category, so it is category-balanced and fixed for a given seed. It is never
   given to a client.
3. **Client populations**: `num_clients` train clients, `num_validation_clients`
   validation clients (choose personalization hyperparameters) and
   `num_test_clients` test clients (report), as in Motley. Home categories are
   dealt round-robin over a seeded permutation of the categories, separately for
   each population, so each population covers the categories evenly.
4. **Scheme** (target category mix `q_i` of client i; `p` is the mix of the
   examples left after step 2, `C` the number of categories):
   - `NATURAL`: `q_i` = one-hot on the home category; the clients of a category
     share that category's examples equally (all of them, unless
     `examples_per_client` caps it).
   - `DIRICHLET`: `q_i ~ Dirichlet(alpha * C * p)` (equal to the common
     `Dirichlet(alpha * 1)` when categories are balanced); `alpha = inf` gives
     `q_i = p` (IID); small alpha concentrates each client on few categories.
     The home category is the client's dominant category.
   - `HOME_FRACTION`: `q_i = f * onehot(home) + (1 - f) * p` with
     `f = home_fraction`; f = 0 is IID, f = 1 is one category per client.
   For DIRICHLET and HOME_FRACTION every client gets the same number of examples,
   `examples_per_client` or else `floor(pool / total clients)`. The per-category
   counts are `n * q_i` rounded by largest remainder (no sampling noise, so
   alpha = inf matches `p` to within 1/n per category); where a category runs out,
   the missing slots go to the categories still available, in proportion to
   `q_i`. Clients are filled in a seeded random order so no population is
   systematically served last. Examples that no client receives are unused
   (`FederatedSplit.num_unused`).
5. Each validation/test client's examples are shuffled and split into
   `personalization_train` and `local_test` (`personalization_test_fraction` of
   them, rounded, at least one in each).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Iterable, Sequence, Union

import numpy as np

from tasks.sni import SniPositiveExample, SniTask


class PartitionScheme(enum.Enum):
    """How client category mixes are chosen (module docstring, step 4)."""

    NATURAL = "natural"
    DIRICHLET = "dirichlet"
    HOME_FRACTION = "home_fraction"


class Population(enum.Enum):
    TRAIN = "train"
    VALIDATION = "validation"
    TEST = "test"


@dataclasses.dataclass(frozen=True)
class Example:
    """One instance with what formatting needs from its task."""

    example_id: str
    task_name: str
    category: str
    definition: str
    positive_examples: tuple[SniPositiveExample, ...]
    input: str
    outputs: tuple[str, ...]
    output_language: tuple[str, ...] = ("English",)


@dataclasses.dataclass(frozen=True)
class TrainClient:
    client_id: str
    home_category: str
    examples: tuple[Example, ...]


@dataclasses.dataclass(frozen=True)
class EvaluationClient:
    """A validation or test client: personalizes on one split, is scored on the other."""

    client_id: str
    home_category: str
    personalization_train: tuple[Example, ...]
    local_test: tuple[Example, ...]

    @property
    def examples(self) -> tuple[Example, ...]:
        return self.personalization_train + self.local_test


@dataclasses.dataclass(frozen=True)
class FederatedSplit:
    """Clients and the global test set; `config` records the arguments used."""

    scheme: PartitionScheme
    categories: tuple[str, ...]
    train_clients: tuple[TrainClient, ...]
    validation_clients: tuple[EvaluationClient, ...]
    test_clients: tuple[EvaluationClient, ...]
    global_test: tuple[Example, ...]
    num_unused: int
    config: dict


def examples_from_tasks(tasks: Iterable[SniTask]) -> list[Example]:
    """Flattens tasks into `Example`s (task order, then instance order)."""
    examples = []
    for task in tasks:
        for instance in task.instances:
            examples.append(
                Example(
                    example_id=instance.id,
                    task_name=task.name,
                    category=task.category,
                    definition=task.definition,
                    positive_examples=task.positive_examples,
                    input=instance.input,
                    outputs=instance.outputs,
                    output_language=task.output_language,
                )
            )
    return examples


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")


def _round_counts(expected: np.ndarray, total: int) -> np.ndarray:
    """Integers summing to `total` closest to `expected` (largest remainder)."""
    floor = np.floor(expected).astype(np.int64)
    short = total - int(floor.sum())
    if short > 0:
        # Stable tie-break by index keeps the result deterministic.
        order = np.lexsort((np.arange(len(expected)), -(expected - floor)))
        floor[order[:short]] += 1
    return floor


def _parse_scheme(scheme: Union[PartitionScheme, str]) -> PartitionScheme:
    if isinstance(scheme, PartitionScheme):
        return scheme
    try:
        return PartitionScheme(scheme)
    except ValueError:
        raise ValueError(
            f"`scheme` must be one of {[s.value for s in PartitionScheme]} "
            f"(or a PartitionScheme), got {scheme!r}."
        ) from None


def _allocate(
    pools: list[list[Example]],
    targets: list[tuple[int, np.ndarray, int]],
    order: np.ndarray,
) -> dict[int, list[Example]]:
    """Gives client k `n_k` examples following mix `q_k`; `targets[k] = (k, q_k, n_k)`."""
    remaining = np.array([len(p) for p in pools], dtype=np.int64)
    cursor = np.zeros_like(remaining)
    # Error diffusion: rounding residue carried to the next client, so that clients
    # with the same mix do not all round the same categories up and exhaust them.
    carry = np.zeros(len(pools))
    result = {}
    for position in order:
        key, mix, size = targets[position]
        expected = np.clip(size * mix + carry, 0.0, None)
        expected *= size / expected.sum() if expected.sum() > 0 else 0.0
        take = np.minimum(_round_counts(expected, size), remaining)
        while take.sum() < size:
            available = remaining - take
            weights = np.where(available > 0, mix, 0.0)
            if weights.sum() <= 0:
                weights = available.astype(np.float64)
            deficit = size - int(take.sum())
            extra = np.minimum(_round_counts(deficit * weights / weights.sum(), deficit), available)
            if extra.sum() == 0:
                extra[int(np.argmax(weights))] += 1
            take += extra
        carry = np.where(remaining - take > 0, carry + size * mix - take, 0.0)
        chosen = []
        for c, count in enumerate(take):
            chosen.extend(pools[c][cursor[c] : cursor[c] + count])
        cursor += take
        remaining -= take
        result[key] = chosen
    return result


def build_federated_split(
    tasks: Sequence[SniTask],
    *,
    scheme: Union[PartitionScheme, str],
    num_clients: int,
    num_validation_clients: int,
    num_test_clients: int,
    alpha: float | None = None,
    home_fraction: float | None = None,
    seed: int = 0,
    global_test_per_category: int = 10,
    personalization_test_fraction: float = 0.5,
    examples_per_client: int | None = None,
) -> FederatedSplit:
    """Builds train / validation / test clients and a global test set (module docstring).

    Args:
      tasks: the tasks to partition (e.g. from `load_sni` or the synthetic suite);
        example ids must be unique across them.
      scheme: `PartitionScheme` or its value (`"natural"`, `"dirichlet"`,
        `"home_fraction"`).
      num_clients: train clients, >= 1.
      num_validation_clients, num_test_clients: evaluation clients, >= 0.
      alpha: Dirichlet concentration, > 0 (`math.inf` = IID); DIRICHLET only.
      home_fraction: in [0, 1]; HOME_FRACTION only.
      seed: the partition is a pure function of the arguments.
      global_test_per_category: held-out examples per category, >= 0.
      personalization_test_fraction: share of an evaluation client's examples in its
        `local_test`, in (0, 1).
      examples_per_client: fixed client size (>= 1 train, >= 2 evaluation); default
        as in the module docstring.

    Returns:
      A `FederatedSplit`; no example appears in two places.
    """
    scheme = _parse_scheme(scheme)
    _check_int("num_clients", num_clients, 1)
    _check_int("num_validation_clients", num_validation_clients, 0)
    _check_int("num_test_clients", num_test_clients, 0)
    _check_int("global_test_per_category", global_test_per_category, 0)
    if examples_per_client is not None:
        _check_int("examples_per_client", examples_per_client, 1)
    if not 0.0 < personalization_test_fraction < 1.0:
        raise ValueError(
            "`personalization_test_fraction` must be in (0, 1), got "
            f"{personalization_test_fraction!r}."
        )
    if scheme is PartitionScheme.DIRICHLET:
        if alpha is None or not alpha > 0:
            raise ValueError(
                f"`alpha` must be > 0 for scheme 'dirichlet' (math.inf = IID), got {alpha!r}."
            )
    elif alpha is not None:
        raise ValueError(
            f"`alpha` is only used by scheme 'dirichlet', got it with {scheme.value!r}."
        )
    if scheme is PartitionScheme.HOME_FRACTION:
        if home_fraction is None or not 0.0 <= home_fraction <= 1.0:
            raise ValueError(
                "`home_fraction` must be in [0, 1] for scheme 'home_fraction', "
                f"got {home_fraction!r}."
            )
    elif home_fraction is not None:
        raise ValueError(
            f"`home_fraction` is only used by scheme 'home_fraction', got it with {scheme.value!r}."
        )

    examples = examples_from_tasks(tasks)
    if not examples:
        raise ValueError("`tasks` has no instances; pass at least one non-empty task.")
    ids = [e.example_id for e in examples]
    if len(set(ids)) != len(ids):
        seen, duplicates = set(), []
        for i in ids:
            if i in seen:
                duplicates.append(i)
            seen.add(i)
        raise ValueError(
            f"example ids must be unique across `tasks`; duplicated: {duplicates[:5]}. "
            "Did you pass the same task twice?"
        )
    categories = tuple(dict.fromkeys(e.category for e in examples))
    num_categories = len(categories)
    rng = np.random.default_rng(seed)
    pools = []
    for category in categories:
        pool = [e for e in examples if e.category == category]
        pools.append([pool[i] for i in rng.permutation(len(pool))])

    for category, pool in zip(categories, pools):
        if len(pool) <= global_test_per_category:
            raise ValueError(
                f"category {category!r} has {len(pool)} examples, not more than "
                f"`global_test_per_category`={global_test_per_category}; lower it or add tasks."
            )
    global_test = tuple(e for pool in pools for e in pool[:global_test_per_category])
    pools = [pool[global_test_per_category:] for pool in pools]
    pool_sizes = np.array([len(p) for p in pools], dtype=np.float64)
    total = int(pool_sizes.sum())
    global_mix = pool_sizes / total

    populations = (
        [(Population.TRAIN, i) for i in range(num_clients)]
        + [(Population.VALIDATION, i) for i in range(num_validation_clients)]
        + [(Population.TEST, i) for i in range(num_test_clients)]
    )
    num_total = len(populations)
    homes = []
    for population, count in (
        (Population.TRAIN, num_clients),
        (Population.VALIDATION, num_validation_clients),
        (Population.TEST, num_test_clients),
    ):
        del population
        permutation = rng.permutation(num_categories)
        homes.extend(int(permutation[i % num_categories]) for i in range(count))
    minimum_sizes = [1 if p is Population.TRAIN else 2 for p, _ in populations]
    if sum(minimum_sizes) > total:
        raise ValueError(
            f"{num_total} clients (num_clients={num_clients}, num_validation_clients="
            f"{num_validation_clients}, num_test_clients={num_test_clients}) need at least "
            f"{sum(minimum_sizes)} examples, but only {total} remain after the global test set; "
            "use fewer clients or more tasks."
        )

    if scheme is PartitionScheme.NATURAL:
        targets = []
        for category_index in range(num_categories):
            members = [k for k in range(num_total) if homes[k] == category_index]
            if not members:
                continue
            supply = len(pools[category_index])
            if examples_per_client is None:
                sizes = [len(a) for a in np.array_split(np.arange(supply), len(members))]
            else:
                sizes = [examples_per_client] * len(members)
            minimums = [minimum_sizes[k] for k in members]
            needed = sum(max(s, m) for s, m in zip(sizes, minimums))
            if any(s < m for s, m in zip(sizes, minimums)) or sum(sizes) > supply:
                raise ValueError(
                    f"category {categories[category_index]!r} has {supply} examples for "
                    f"{len(members)} natural clients needing {needed} (>= 1 per train client, "
                    ">= 2 per evaluation client); use fewer clients, a smaller "
                    "`examples_per_client` or a smaller `global_test_per_category`."
                )
            one_hot = np.eye(num_categories)[category_index]
            targets.extend((k, one_hot, s) for k, s in zip(members, sizes))
        targets.sort(key=lambda t: t[0])
    else:
        size = examples_per_client if examples_per_client is not None else total // num_total
        if size * num_total > total or size < max(minimum_sizes):
            raise ValueError(
                f"{num_total} clients x {size} examples per client need {size * num_total} "
                f"examples (at least {max(minimum_sizes)} each), but {total} remain after the "
                "global test set; use fewer clients or a smaller `examples_per_client`."
            )
        targets = []
        for k in range(num_total):
            if scheme is PartitionScheme.DIRICHLET:
                if math.isinf(alpha):
                    mix = global_mix
                else:
                    mix = rng.dirichlet(alpha * num_categories * global_mix)
            else:
                mix = (
                    home_fraction * np.eye(num_categories)[homes[k]]
                    + (1.0 - home_fraction) * global_mix
                )
            targets.append((k, mix, size))
    # A (k -> position) map: targets are sorted by k in both branches.
    assigned = _allocate(pools, targets, rng.permutation(len(targets)))

    index_of = {c: i for i, c in enumerate(categories)}
    train, validation, test = [], [], []
    for k, (population, i) in enumerate(populations):
        chosen = assigned.get(k, [])
        if scheme is PartitionScheme.DIRICHLET and chosen:
            counts = np.bincount([index_of[e.category] for e in chosen], minlength=num_categories)
            home = categories[int(np.argmax(counts))]
        else:
            home = categories[homes[k]]
        client_id = f"{population.value}_{i:03d}"
        if population is Population.TRAIN:
            train.append(TrainClient(client_id, home, tuple(chosen)))
            continue
        shuffled = [chosen[j] for j in rng.permutation(len(chosen))]
        num_local = min(
            max(1, round(len(shuffled) * personalization_test_fraction)), len(shuffled) - 1
        )
        client = EvaluationClient(
            client_id,
            home,
            personalization_train=tuple(shuffled[num_local:]),
            local_test=tuple(shuffled[:num_local]),
        )
        (validation if population is Population.VALIDATION else test).append(client)
    used = sum(len(c.examples) for c in train + validation + test)
    config = {
        "scheme": scheme.value,
        "num_clients": num_clients,
        "num_validation_clients": num_validation_clients,
        "num_test_clients": num_test_clients,
        "alpha": None if alpha is None else float(alpha),
        "home_fraction": None if home_fraction is None else float(home_fraction),
        "seed": seed,
        "global_test_per_category": global_test_per_category,
        "personalization_test_fraction": personalization_test_fraction,
        "examples_per_client": examples_per_client,
    }
    return FederatedSplit(
        scheme=scheme,
        categories=categories,
        train_clients=tuple(train),
        validation_clients=tuple(validation),
        test_clients=tuple(test),
        global_test=global_test,
        num_unused=total - used,
        config=config,
    )


def category_histogram(examples: Iterable[Example], categories: Sequence[str]) -> dict[str, int]:
    counts = dict.fromkeys(categories, 0)
    for e in examples:
        counts[e.category] += 1
    return counts


def _total_variation(counts: dict[str, int], reference: np.ndarray) -> float:
    values = np.array(list(counts.values()), dtype=np.float64)
    if values.sum() == 0:
        return 0.0
    return float(0.5 * np.abs(values / values.sum() - reference).sum())


def partition_statistics(split: FederatedSplit) -> dict:
    """JSON-serializable summary of a split.

    Returns:
      `{"config", "categories", "global_mix", "global_test": {"size", "category_histogram"},
      "num_unused", "clients": [{"client_id", "population", "size", "home_category",
      "home_fraction", "category_histogram", "tv_from_global", and for evaluation clients
      "personalization_train_size", "local_test_size"}], "heterogeneity"}`, where
      `heterogeneity` is the mean over all clients of the total-variation distance
      between the client's category mix and the mix of all client examples (0 = IID,
      near 1 - 1/C = one category per client).
    """
    categories = split.categories
    clients = [(Population.TRAIN, c) for c in split.train_clients]
    clients += [(Population.VALIDATION, c) for c in split.validation_clients]
    clients += [(Population.TEST, c) for c in split.test_clients]
    all_examples = [e for _, c in clients for e in c.examples]
    overall = category_histogram(all_examples, categories)
    global_mix = np.array(list(overall.values()), dtype=np.float64) / max(1, len(all_examples))
    rows = []
    for population, client in clients:
        histogram = category_histogram(client.examples, categories)
        size = len(client.examples)
        row = {
            "client_id": client.client_id,
            "population": population.value,
            "size": size,
            "home_category": client.home_category,
            "home_fraction": histogram[client.home_category] / size if size else 0.0,
            "category_histogram": histogram,
            "tv_from_global": _total_variation(histogram, global_mix),
        }
        if isinstance(client, EvaluationClient):
            row["personalization_train_size"] = len(client.personalization_train)
            row["local_test_size"] = len(client.local_test)
        rows.append(row)
    return {
        "config": dict(split.config),
        "categories": list(categories),
        "global_mix": dict(zip(categories, (float(x) for x in global_mix))),
        "global_test": {
            "size": len(split.global_test),
            "category_histogram": category_histogram(split.global_test, categories),
        },
        "num_unused": split.num_unused,
        "clients": rows,
        "heterogeneity": float(np.mean([r["tv_from_global"] for r in rows])),
    }
