"""The ablation plan (SPEC §3): YAML parsing and strict validation.

Every problem names its YAML path (`ablate[2].sparsity`) and says what is allowed; all problems of
a file are reported together, in one line, before anything is read from the model or written.
Checks that need the model or the measurement file (layer ranges, measured layers, directions)
happen in lib/ablate/resolution.py, also before anything is written.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import yaml

from lib.ablate.architectures import DEFAULT_COMPONENTS, LAYER_COMPONENTS
from lib.core.errors import UserError

# A measured layer, a fractional layer (interpolated), or several of those (mean of unit directions).
MeasurementSpec = int | float | tuple[int | float, ...]

OPTION_KEYS = ("scale", "sparsity", "components", "projected", "norm_preserve", "invert")
TOP_LEVEL_KEYS = ("model", "measurements", "output", *OPTION_KEYS, "embeddings", "ablate")
ENTRY_KEYS = ("layer", "measurement", *OPTION_KEYS)
EMBEDDING_KEYS = ("measurement", "scale", "sparsity", "projected", "norm_preserve", "invert")
_LAYER_RANGE = re.compile(r"\s*(\d+)\s*-\s*(\d+)\s*")

# Where the direction is orthogonalised against a harmless mean (SPEC §4, projected direction):
# not at all, at the measurement layer (what `measure.py --projected` bakes into a file), at each
# edited layer, or at both in that order. `true` in a plan means "edited", as it always has.
NOT_PROJECTED = "none"
PROJECTED_AT_MEASUREMENT = "measurement"
PROJECTED_AT_EDITED_LAYER = "edited"
PROJECTED_AT_BOTH = "both"
PROJECTION_CHOICES = (NOT_PROJECTED, PROJECTED_AT_MEASUREMENT, PROJECTED_AT_EDITED_LAYER, PROJECTED_AT_BOTH)


@dataclass(frozen=True)
class Options:
    """How one entry's direction is prepared and applied; entries inherit the top level's options."""

    scale: float = 1.0  # the entry's own scale; the effective scale multiplies in the global one
    sparsity: float = 1.0
    components: frozenset[str] = DEFAULT_COMPONENTS
    projected: str = NOT_PROJECTED  # one of PROJECTION_CHOICES
    norm_preserve: bool = False
    invert: bool = False

    @property
    def projected_at_measurement(self) -> bool:
        return self.projected in (PROJECTED_AT_MEASUREMENT, PROJECTED_AT_BOTH)

    @property
    def projected_at_edited_layer(self) -> bool:
        return self.projected in (PROJECTED_AT_EDITED_LAYER, PROJECTED_AT_BOTH)


@dataclass(frozen=True)
class PlanEntry:
    path: str  # where it came from, e.g. "ablate[2]" or "embeddings"
    # As written: "2-30000000" stays one range, never a list of 30 million numbers; resolution keeps
    # only the layers the model has. Empty for the embeddings entry.
    layer_ranges: tuple[range, ...]
    measurement: MeasurementSpec | None  # None: each layer uses its own measurement
    options: Options


@dataclass(frozen=True)
class Plan:
    source: Path
    model: str
    measurements: Path
    output: Path
    global_scale: float
    entries: tuple[PlanEntry, ...]
    embeddings: PlanEntry | None
    text: str = field(default="", repr=False)  # the YAML as written, kept for the model card

    def effective_scale(self, entry: PlanEntry) -> float:
        """Global scale times the entry's scale; `invert` turns removal into addition."""
        scale = self.global_scale * entry.options.scale
        return -scale if entry.options.invert else scale

    def with_overrides(
        self, projected: bool = False, norm_preserve: bool = False, invert: bool = False
    ) -> Plan:
        """Command-line switches win over the YAML, for every entry (`projected`: at each edited layer)."""
        switched: dict[str, Any] = {
            key: value
            for key, value, on in (
                ("projected", PROJECTED_AT_EDITED_LAYER, projected),
                ("norm_preserve", True, norm_preserve),
                ("invert", True, invert),
            )
            if on
        }
        if not switched:
            return self

        def override(entry: PlanEntry) -> PlanEntry:
            return replace(entry, options=replace(entry.options, **switched))

        return replace(
            self,
            entries=tuple(override(entry) for entry in self.entries),
            embeddings=override(self.embeddings) if self.embeddings else None,
        )


class _Problems:
    """Collects every validation problem so that one run reports them all."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.messages.append(f"{path}: {message}" if path else message)

    def raise_if_any(self, source: Path) -> None:
        raise_problems(source, self.messages)


def raise_problems(source: Path, messages: list[str]) -> None:
    """All problems found in a plan, as one UserError line naming the plan file."""
    if len(messages) == 1:
        raise UserError(f"{source}: {messages[0]}")
    if messages:
        raise UserError(f"{source}: {len(messages)} problems: " + "; ".join(messages))


def load_plan(path: Path) -> Plan:
    """Read and validate a plan file; any problem is a UserError naming the YAML path."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: plan file not found")
    text = path.read_text()
    loader = _PlanLoader(text)
    try:
        document = loader.get_single_data()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "cannot be parsed"
        raise UserError(f"{path}: not valid YAML{where}: {problem}") from None
    finally:
        loader.dispose()
    raise_problems(path, loader.duplicate_keys)
    return parse_plan(document, path, text)


class _PlanLoader(yaml.SafeLoader):
    """Safe YAML read by the YAML 1.2 core schema, refusing a key given twice in one mapping.

    PyYAML follows YAML 1.1, where `010` is octal 8, `5e-1` is a string and `yes`/`on` are booleans,
    and where a repeated key silently replaces the earlier one; in a plan each of those edits other
    weights than the user wrote. Under the core schema numbers read as written (`010` is 10, `0o10`
    is 8), only true/false are booleans, and everything else unquoted is a string. Merge keys
    (`<<: *defaults`) keep working.
    """

    yaml_implicit_resolvers: ClassVar[dict] = {}

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.duplicate_keys: list[str] = []

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        # Checked on the composed node, before merge keys are flattened into it.
        node = super().compose_mapping_node(anchor)
        lines_by_key: dict[tuple[str, str], list[int]] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
                lines_by_key.setdefault((key.tag, key.value), []).append(key.start_mark.line + 1)
        for (_, key), lines in lines_by_key.items():
            if len(lines) > 1:
                times = "twice" if len(lines) == 2 else f"{len(lines)} times"
                listed = ", ".join(map(str, lines[:-1])) + f" and {lines[-1]}"
                self.duplicate_keys.append(f"key '{key}' appears {times} (lines {listed}); keep one")
        return node

    def construct_core_int(self, node: yaml.ScalarNode) -> int:
        text = self.construct_scalar(node)
        if text.startswith(("0o", "0x")):
            return int(text[2:], 8 if text[1] == "o" else 16)
        return int(text, 10)  # leading zeros are decimal


_MERGE_TAG = "tag:yaml.org,2002:merge"
# The YAML 1.2 core schema's plain scalars (spec 1.2.2, section 10.3.2), in the order they are tried.
_CORE_SCHEMA = (
    ("tag:yaml.org,2002:null", r"~|null|Null|NULL|"),
    ("tag:yaml.org,2002:bool", r"true|True|TRUE|false|False|FALSE"),
    ("tag:yaml.org,2002:int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+"),
    (
        "tag:yaml.org,2002:float",
        r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)",
    ),
    (_MERGE_TAG, r"<<"),
)
for tag, pattern in _CORE_SCHEMA:
    _PlanLoader.add_implicit_resolver(tag, re.compile(rf"^(?:{pattern})$"), None)
_PlanLoader.add_constructor("tag:yaml.org,2002:int", _PlanLoader.construct_core_int)


def parse_plan(document: Any, source: Path, text: str = "") -> Plan:
    problems = _Problems()
    if not isinstance(document, dict):
        raise UserError(f"{source}: the plan must be a YAML mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    _check_keys(document, TOP_LEVEL_KEYS, "", problems)
    model = _required_text(document, "model", problems)
    measurements = _required_text(document, "measurements", problems)
    output = _required_text(document, "output", problems)
    global_scale = _scale(document.get("scale", 1.0), "scale", problems)
    defaults = _options(document, "", Options(), problems, allow_scale=False)
    entries = _entries(document.get("ablate"), defaults, problems)
    embeddings = _embeddings(document.get("embeddings"), defaults, problems)
    if not entries and embeddings is None and "ablate" in document:
        problems.add("ablate", "is empty: list at least one entry (or give an 'embeddings' entry)")
    elif "ablate" not in document and embeddings is None:
        problems.add("ablate", "missing: list the layers to edit, e.g. '- layer: 10'")
    _check_duplicate_layers(entries, problems)
    problems.raise_if_any(source)
    return Plan(
        source, model, Path(measurements), Path(output), global_scale, tuple(entries), embeddings, text
    )


def _check_keys(mapping: dict, allowed: tuple[str, ...], path: str, problems: _Problems) -> None:
    for key in mapping:
        if key not in allowed:
            suggestion = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{suggestion[0]}'?)" if suggestion else ""
            where = f"{path}." if path else ""
            problems.add(f"{where}{key}", f"unknown key{hint}; allowed here: {', '.join(allowed)}")


def _required_text(document: dict, key: str, problems: _Problems) -> str:
    value = document.get(key)
    if not isinstance(value, str) or not value.strip():
        problems.add(key, f"required: a non-empty path or hub id, got {value!r}")
        return ""
    return value.strip()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scale(value: Any, path: str, problems: _Problems) -> float:
    if not _is_number(value) or not math.isfinite(value):
        problems.add(
            path,
            f"must be a finite number (1.0 removes the direction, 0 keeps it, negative adds it), got {value!r}",
        )
        return 1.0
    return float(value)


def _sparsity(value: Any, path: str, problems: _Problems) -> float:
    if not _is_number(value) or not 0.0 < value <= 1.0:
        hint = " (older tools wrote 0.0 for 'no sparsity'; that is 1.0 here)" if value == 0 else ""
        problems.add(
            path, f"must be in (0, 1], the fraction of direction components kept, got {value!r}{hint}"
        )
        return 1.0
    return float(value)


def _flag(value: Any, path: str, problems: _Problems, default: bool) -> bool:
    if not isinstance(value, bool):
        problems.add(path, f"must be true or false, got {value!r}")
        return default
    return value


def _projection(value: Any, path: str, problems: _Problems) -> str:
    if value is True:
        return PROJECTED_AT_EDITED_LAYER
    if value is False:
        return NOT_PROJECTED
    if value not in PROJECTION_CHOICES:
        problems.add(
            path,
            f"must be one of {', '.join(PROJECTION_CHOICES)} (true means edited, false none), got {value!r}",
        )
        return NOT_PROJECTED
    return value


def _components(value: Any, path: str, problems: _Problems) -> frozenset[str]:
    allowed = ", ".join(LAYER_COMPONENTS)
    if not isinstance(value, list) or not value:
        problems.add(path, f"must be a non-empty list of: {allowed}; got {value!r}")
        return DEFAULT_COMPONENTS
    for position, name in enumerate(value):
        if name not in LAYER_COMPONENTS:
            hint = (
                " (embeddings are edited by the top-level 'embeddings' entry)"
                if name in ("embeddings", "embedding")
                else ""
            )
            problems.add(f"{path}[{position}]", f"unknown component {name!r}; allowed: {allowed}{hint}")
    return frozenset(name for name in value if name in LAYER_COMPONENTS)


def _options(
    mapping: dict, path: str, inherited: Options, problems: _Problems, allow_scale: bool = True
) -> Options:
    where = f"{path}." if path else ""
    options = inherited
    if allow_scale and "scale" in mapping:
        options = replace(options, scale=_scale(mapping["scale"], f"{where}scale", problems))
    if "sparsity" in mapping:
        options = replace(options, sparsity=_sparsity(mapping["sparsity"], f"{where}sparsity", problems))
    if "components" in mapping:
        options = replace(
            options, components=_components(mapping["components"], f"{where}components", problems)
        )
    if "projected" in mapping:
        options = replace(options, projected=_projection(mapping["projected"], f"{where}projected", problems))
    for key in ("norm_preserve", "invert"):
        if key in mapping:
            options = replace(
                options, **{key: _flag(mapping[key], f"{where}{key}", problems, getattr(inherited, key))}
            )
    return options


def _layers(value: Any, path: str, problems: _Problems) -> tuple[range, ...]:
    """An int, an inclusive range "A-B", or a list of those."""
    items = value if isinstance(value, list) and value else [value]
    layers: list[range] = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            layers.append(range(item, item + 1))
            continue
        matched = _LAYER_RANGE.fullmatch(item) if isinstance(item, str) else None
        if matched and int(matched[1]) <= int(matched[2]):
            layers.append(range(int(matched[1]), int(matched[2]) + 1))
            continue
        problems.add(
            path,
            f'must be a layer number >= 0, an inclusive range like "10-20", or a list of those; got {item!r}',
        )
    return tuple(layers)


def format_layers(layers: Iterable[int]) -> str:
    """Layer numbers in the plan's own syntax, the inverse of `_layers`: [1, 2, 3, 7] -> "1-3, 7"."""
    return format_layer_ranges(range(layer, layer + 1) for layer in layers)


def merge_layer_ranges(ranges: Iterable[range]) -> list[range]:
    """The layers as contiguous runs, ascending, merged where they touch or overlap:
    [range(3, 4), range(1, 3), range(7, 8)] -> [range(1, 4), range(7, 8)]."""
    spans: list[list[int]] = []  # [first, stop)
    for layers in sorted((layers for layers in ranges if layers), key=lambda layers: layers.start):
        if spans and layers.start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], layers.stop)
        else:
            spans.append([layers.start, layers.stop])
    return [range(first, stop) for first, stop in spans]


def format_layer_ranges(ranges: Iterable[range]) -> str:
    """Ranges of layers in the plan's syntax, merged where they touch: [range(1, 3), range(3, 4)] -> "1-3"."""
    return ", ".join(
        str(run.start) if len(run) == 1 else f"{run.start}-{run.stop - 1}"
        for run in merge_layer_ranges(ranges)
    )


def layers_are(ranges: Sequence[range]) -> str:
    """The subject of a sentence about these layers: "layer 4 is" or "layers 4-9, 12 are"."""
    listed = format_layer_ranges(ranges)
    return f"layer {listed} is" if sum(len(layers) for layers in ranges) == 1 else f"layers {listed} are"


def _measurement(value: Any, path: str, problems: _Problems) -> MeasurementSpec | None:
    """An int, a float (interpolated between neighbouring layers) or a list of those (mean)."""
    allowed = "a measured layer (int), a fractional layer like 20.5 (interpolated), or a list of those (mean)"

    def single(item: Any, item_path: str) -> int | float | None:
        if not _is_number(item) or not math.isfinite(item) or item < 0:
            problems.add(item_path, f"must be {allowed}; got {item!r}")
            return None
        return int(item) if float(item).is_integer() else float(item)

    if isinstance(value, list):
        if not value:
            problems.add(path, f"must be {allowed}; got an empty list")
            return None
        parsed = [single(item, f"{path}[{position}]") for position, item in enumerate(value)]
        return None if any(item is None for item in parsed) else tuple(parsed)
    return single(value, path)


def _entries(value: Any, defaults: Options, problems: _Problems) -> list[PlanEntry]:
    if value is None:
        return []
    if not isinstance(value, list):
        problems.add(
            "ablate", f"must be a list of entries with 'layer' (and optionally {', '.join(ENTRY_KEYS[1:])})"
        )
        return []
    entries = []
    for position, item in enumerate(value):
        path = f"ablate[{position}]"
        if not isinstance(item, dict):
            problems.add(
                path,
                f"must be a mapping with 'layer' (and optionally {', '.join(ENTRY_KEYS[1:])}), got {item!r}",
            )
            continue
        _check_keys(item, ENTRY_KEYS, path, problems)
        if "layer" not in item:
            problems.add(
                path,
                "missing 'layer': the decoder layer (or range \"A-B\", or list) whose weights are edited",
            )
            continue
        layers = _layers(item["layer"], f"{path}.layer", problems)
        measurement = (
            _measurement(item["measurement"], f"{path}.measurement", problems)
            if "measurement" in item
            else None
        )
        options = _options(item, path, replace(defaults, scale=1.0), problems)
        entries.append(PlanEntry(path, layers, measurement, options))
    return entries


def _embeddings(value: Any, defaults: Options, problems: _Problems) -> PlanEntry | None:
    if value is None:
        return None
    if not isinstance(value, dict) or "measurement" not in value:
        problems.add(
            "embeddings",
            f"must be a mapping with 'measurement' (and optionally {', '.join(EMBEDDING_KEYS[1:])})",
        )
        return None
    _check_keys(value, EMBEDDING_KEYS, "embeddings", problems)
    measurement = _measurement(value["measurement"], "embeddings.measurement", problems)
    options = _options(value, "embeddings", replace(defaults, scale=1.0), problems)
    return PlanEntry("embeddings", (), measurement, options)


def _check_duplicate_layers(entries: list[PlanEntry], problems: _Problems) -> None:
    """One entry per layer: a layer listed twice is almost always an editing slip.

    Compared range by range, never layer by layer: a range may be as long as a typo makes it.
    """
    seen: list[tuple[range, str]] = []
    for entry in entries:
        for layers in entry.layer_ranges:
            for earlier, path in seen:
                overlap = range(max(layers.start, earlier.start), min(layers.stop, earlier.stop))
                if overlap:
                    where = "earlier in this entry" if path == entry.path else f"by {path}"
                    problems.add(
                        f"{entry.path}.layer",
                        f"{layers_are([overlap])} already planned {where}; "
                        "plan each layer once (use a list 'measurement' to combine directions)",
                    )
            seen.append((layers, entry.path))
