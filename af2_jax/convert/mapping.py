"""Key-mapping tables between our flat parameter dicts and foreign state dicts, used in both directions.

A table is a list of rules built for one model config:

- `Tensor(ours, theirs, transform)`: one of our arrays <-> one foreign key. Placeholders in braces (`{i}`) that
  appear in both patterns are substituted; a placeholder that appears only in `theirs` indexes a leading (stacked
  layer) axis of our array, so `Tensor('layers/attn/q/kernel', 'model.layers.{i}.self_attn.q_proj.weight', LINEAR)`
  maps every layer's torch weight into one slice of our (L, in, out) array.
- `Alias(theirs, same_as)`: a foreign key that names the same tensor as another (tied heads, AF2's
  `old_decoder_blocks`). On import it is optional and, when present, must equal its twin; on export it is written
  only when `export=True`.
- `Derived(expected)`: foreign buffers we recompute instead of loading (RoPE inv_freq, Swin relative position
  index and masks). On import each one, when present, must equal the recomputed value; on export they are written.

`import_tensors` streams a foreign source key by key into preallocated arrays (one copy of the model in memory, plus
one foreign tensor) and `export_tensors` yields foreign (key, array) pairs one at a time. Both account for every key:
anything missing, unexpected, mis-shaped or unequal raises a `ConversionError` that names all of them at once.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from af2_jax.param_tree import ConversionError  # noqa: F401  (raised here; converters import it from here too)


@dataclasses.dataclass(frozen=True)
class Transform:
    """A pair of inverse array functions between the foreign layout and ours."""

    name: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_theirs: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda x: x, lambda x: x)
# torch Linear weight (out, in) <-> our kernel (in, out)
LINEAR = Transform("linear", lambda w: np.ascontiguousarray(w.T), lambda k: np.ascontiguousarray(k.T))
# torch Conv2d weight (O, I, kh, kw) <-> our kernel (kh, kw, I, O)
CONV2D = Transform("conv2d", lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0)),
                   lambda k: np.ascontiguousarray(k.transpose(3, 2, 0, 1)))


def reshape(ours_shape: Sequence[int], theirs_shape: Sequence[int]) -> Transform:
    return Transform(f"reshape{tuple(theirs_shape)}->{tuple(ours_shape)}",
                     lambda x: x.reshape(ours_shape), lambda x: x.reshape(theirs_shape))


@dataclasses.dataclass(frozen=True)
class Tensor:
    ours: str
    theirs: str
    transform: Transform = IDENTITY


@dataclasses.dataclass(frozen=True)
class Alias:
    theirs: str
    same_as: str
    export: bool = True


@dataclasses.dataclass(frozen=True)
class Derived:
    expected: Callable[[], Mapping[str, np.ndarray]]  # concrete foreign key -> recomputed value


Rule = Tensor | Alias | Derived


class TensorSource(Protocol):
    """Random access to a foreign state dict without loading it whole."""

    def keys(self) -> list[str]: ...

    def get(self, key: str) -> np.ndarray: ...

    def shape(self, key: str) -> tuple[int, ...]: ...


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _placeholders(pattern: str) -> list[str]:
    return _PLACEHOLDER.findall(pattern)


def _pattern_regex(pattern: str, sep: str) -> re.Pattern:
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(pattern):
        out.append(re.escape(pattern[pos:m.start()]))
        out.append(f"(?P<{m.group(1)}>\\d+)")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out) + "$")


@dataclasses.dataclass(frozen=True)
class _Compiled:
    rule: Tensor
    theirs_re: re.Pattern
    ours_re: re.Pattern
    stacked: tuple[str, ...]  # placeholders that index leading axes of our array, in order


def _compile(rules: Iterable[Rule]) -> tuple[list[_Compiled], list[Alias], list[Derived]]:
    tensors, aliases, derived = [], [], []
    for rule in rules:
        if isinstance(rule, Tensor):
            ours_names = set(_placeholders(rule.ours))
            stacked = tuple(n for n in _placeholders(rule.theirs) if n not in ours_names)
            tensors.append(_Compiled(rule, _pattern_regex(rule.theirs, "."), _pattern_regex(rule.ours, "/"),
                                     stacked))
        elif isinstance(rule, Alias):
            aliases.append(rule)
        else:
            derived.append(rule)
    return tensors, aliases, derived


def _fill(pattern: str, values: Mapping[str, int | str]) -> str:
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), pattern)


def _resolve_alias(key: str, aliases: Sequence[Alias]) -> str | None:
    for alias in aliases:
        m = _pattern_regex(alias.theirs, ".").match(key)
        if m:
            return _fill(alias.same_as, m.groupdict())
    return None


def _derived_values(derived: Sequence[Derived]) -> dict[str, np.ndarray]:
    values: dict[str, np.ndarray] = {}
    for rule in derived:
        values.update(rule.expected())
    return values


def _match(key: str, tensors: Sequence[_Compiled]) -> tuple[_Compiled, dict[str, str]] | None:
    for c in tensors:
        m = c.theirs_re.match(key)
        if m:
            return c, m.groupdict()
    return None


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


def import_tensors(rules: Iterable[Rule], source: TensorSource, targets: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                   *, progress: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """Reads every key of `source` into arrays shaped as `targets` (our flat path -> (shape, dtype)).

    Arrays are cast to the target dtype. Raises ConversionError naming every unexpected, missing, mis-shaped or
    inconsistent key; nothing is returned half-filled.
    """
    tensors, aliases, derived = _compile(rules)
    derived_values = _derived_values(derived)
    out: dict[str, np.ndarray] = {}
    filled: dict[str, np.ndarray] = {}  # our path -> bool mask over its stacked leading axes
    misshaped: set[str] = set()  # reported as mis-shaped, so not also as missing
    problems: dict[str, list[str]] = {"unexpected keys": [], "missing keys": [], "mis-shaped keys": [],
                                      "keys that differ from their twin": [], "buffers that differ from the recomputed value": []}
    for key in source.keys():
        if progress:
            progress(key)
        if key in derived_values:
            value = source.get(key)
            if value.shape != derived_values[key].shape or not np.array_equal(value, derived_values[key]):
                problems["buffers that differ from the recomputed value"].append(key)
            continue
        canonical = _resolve_alias(key, aliases)
        name = canonical if canonical is not None else key
        found = _match(name, tensors)
        if found is None:
            problems["unexpected keys"].append(key)
            continue
        compiled, groups = found
        path = _fill(compiled.rule.ours, groups)
        if path not in targets:
            problems["unexpected keys"].append(f"{key} (no parameter {path})")
            continue
        shape, dtype = targets[path]
        index = tuple(int(groups[n]) for n in compiled.stacked)
        stack_shape, slice_shape = tuple(shape[:len(index)]), tuple(shape[len(index):])
        if any(i >= n for i, n in zip(index, stack_shape)):
            problems["unexpected keys"].append(f"{key} (index {index} beyond stack {stack_shape} of {path})")
            continue
        try:
            value = compiled.rule.transform.to_ours(source.get(key))
        except ValueError as e:  # a reshape that cannot apply
            problems["mis-shaped keys"].append(f"{key}: {e}")
            misshaped.add(name)
            continue
        if tuple(value.shape) != slice_shape:
            problems["mis-shaped keys"].append(
                f"{key}: got {_shape_str(compiled.rule.transform.to_theirs(value).shape)}, expected "
                f"{_shape_str(compiled.rule.transform.to_theirs(np.empty(slice_shape, np.int8)).shape)}")
            misshaped.add(name)
            continue
        if path not in out:
            out[path] = np.empty(shape, dtype)
            filled[path] = np.zeros(stack_shape, bool)
        if filled[path][index]:
            if not np.array_equal(out[path][index], value.astype(dtype)):
                problems["keys that differ from their twin"].append(key)
            continue
        out[path][index] = value
        filled[path][index] = True
    for path, (shape, _) in targets.items():
        compiled = next((c for c in tensors if c.ours_re.match(path)), None)
        if compiled is None:
            problems["missing keys"].append(f"(no rule for our parameter {path})")
            continue
        if path in filled and filled[path].all():
            continue
        groups = compiled.ours_re.match(path).groupdict()
        stack_shape = tuple(shape[:len(compiled.stacked)])
        done = filled.get(path, np.zeros(stack_shape, bool))
        for index in zip(*np.nonzero(~done)) if stack_shape else [()]:
            values = dict(groups, **{n: int(i) for n, i in zip(compiled.stacked, index)})
            if _fill(compiled.rule.theirs, values) not in misshaped:
                problems["missing keys"].append(_fill(compiled.rule.theirs, values))
    if any(problems.values()):
        raise ConversionError(problems)
    return out


def export_tensors(rules: Iterable[Rule], params: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (foreign key, array) for every parameter, alias (with export=True) and derived buffer.

    Raises ConversionError, before yielding anything, if a parameter has no rule.
    """
    tensors, aliases, derived = _compile(rules)
    plan = []
    unmapped = []
    for path in params:
        compiled = next((c for c in tensors if c.ours_re.match(path)), None)
        if compiled is None:
            unmapped.append(path)
        else:
            plan.append((path, compiled))
    if unmapped:
        raise ConversionError({"parameters with no rule": unmapped})
    alias_res = [(a, _pattern_regex(a.same_as, ".")) for a in aliases if a.export]

    def emit(key: str, value: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        yield key, value
        for alias, same_as_re in alias_res:
            m = same_as_re.match(key)
            if m:
                yield _fill(alias.theirs, m.groupdict()), value

    for path, compiled in plan:
        array = np.asarray(params[path])
        groups = compiled.ours_re.match(path).groupdict()
        stack_shape = array.shape[:len(compiled.stacked)]
        for index in np.ndindex(*stack_shape):
            values = dict(groups, **{n: int(i) for n, i in zip(compiled.stacked, index)})
            yield from emit(_fill(compiled.rule.theirs, values), compiled.rule.transform.to_theirs(array[index]))
    for key, value in _derived_values(derived).items():
        yield key, value
