"""A pairwise covering design: cases such that every pair of values of two factors that a
valid case can hold appears in at least one case (AETG's greedy construction, Cohen et al.
1997, with a validity predicate for the combinations the product refuses)."""

import itertools
import random


def all_pairs(factors: dict) -> set:
    return {
        ((a, va), (b, vb))
        for a, b in itertools.combinations(factors, 2)
        for va in factors[a]
        for vb in factors[b]
    }


def pairs_of(case: dict, names) -> set:
    return {((a, case[a]), (b, case[b])) for a, b in itertools.combinations(names, 2)}


def _decided(valid, partial: dict):
    """``valid(partial)`` where it reads only the factors ``partial`` has (then every
    completion of it is alike), else None."""
    try:
        return valid(partial)
    except KeyError:
        return None


def _completion(partial: dict, factors: dict, valid, rng, prune=True) -> dict:
    """A valid case extending ``partial`` (depth-first over the remaining factors; with
    ``prune``, a branch is cut where ``partial`` already decides it), or None."""
    rest = [n for n in factors if n not in partial]
    if not rest:
        return dict(partial) if valid(partial) else None
    if prune and _decided(valid, partial) is False:
        return None
    name = rest[0]
    for value in rng.sample(factors[name], len(factors[name])):
        case = _completion({**partial, name: value}, factors, valid, rng, prune)
        if case is not None:
            return case
    return None


def coverable_pairs(factors: dict, valid) -> set:
    """The pairs of values some valid case holds."""
    rng = random.Random(0)
    return {p for p in all_pairs(factors) if _completion(dict(p), factors, valid, rng)}


def covering(
    factors: dict, valid=lambda case: True, seed=0, tries=30, prune=False
) -> list:
    """Cases (dicts factor -> value), every one valid, covering every coverable pair.
    ``prune``: cut the search where a partial case is already refused (far faster where
    many pairs are; the random draws differ, so the design does too)."""
    rng = random.Random(seed)
    names = list(factors)
    todo = coverable_pairs(factors, valid)
    cases = []
    while todo:
        best, gain = None, -1
        for _ in range(tries):
            (a, va), (b, vb) = rng.choice(sorted(todo, key=repr))
            case = {a: va, b: vb}
            for name in rng.sample(names, len(names)):
                if name in case:
                    continue
                scored = []
                for value in factors[name]:
                    new = sum(
                        (((m, case[m]), (name, value)) in todo)
                        or (((name, value), (m, case[m])) in todo)
                        for m in case
                    )
                    scored.append((new, rng.random(), value))
                for _, _, value in sorted(scored, reverse=True):
                    trial = {**case, name: value}
                    if _completion(trial, factors, valid, rng, prune) is not None:
                        case = trial
                        break
            case = {n: case[n] for n in names}
            covered = len(pairs_of(case, names) & todo)
            if valid(case) and covered > gain:
                best, gain = case, covered
        cases.append(best)
        todo -= pairs_of(best, names)
    return cases
