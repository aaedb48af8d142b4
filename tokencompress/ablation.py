"""`tokencompress ablate CONFIG`: a grid over compressors x settings on the shapes task (or a chat MLLM), with
the uncompressed baseline in the same run, fixed seeds, resumable results (CSV), a Markdown table and plots.

The config (YAML, or JSON by extension) is validated whole before any model work: unknown keys, unknown
compressor names, invalid parameters (every compressor is built up front) and, once the model is loaded but before
anything is evaluated, compressors that do not fit it. Each setting's latency is measured against the uncompressed
model batch by batch (interleaved, alternating which runs first), so a ratio stays fair when a run is resumed on
another day. An entry's `pretrained: DIR` loads trained routers (tc.save_pretrained) into its settings.
docs/ablations.md describes the config, the columns and resuming.
"""

from __future__ import annotations

import copy
import csv
import datetime
import itertools
import json
import math
import os
import platform
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import api, evaluation
from .compressors import Compressor, build, registry
from .synthetic import QUESTION_TYPES, TRAIN_SEED, Sample

TOP_KEYS = ("model", "samples", "batch", "seed", "device", "dtype", "threads", "warmup", "methods")
ENTRY_KEYS = ("name", "label", "grid", "match", "pretrained")
MATCH_KEYS = ("knob", "low", "high", "flops", "steps", "integer", "tolerance")
DTYPES = ("auto", "float32", "float16", "bfloat16")
VISUAL = "visual"  # a match bound: the model's visual tokens per prompt (e.g. MustDrop's budget)
SHIPPED = "shapes (shipped)"  # the model column for `model: null`
BASELINE = "uncompressed"

CSV_NAME, MD_NAME, MATCHES_NAME, MACHINE_NAME = "results.csv", "results.md", "matches.json", "machine.json"
PLOTS = {"pareto.png": "flops_ratio", "latency.png": "latency_ratio"}
COLUMNS = (
    "method",
    "label",
    "setting",
    "params",
    "pretrained",
    "target_flops",
    "flops_ratio",
    "latency_ratio",
    "kv_ratio",
    "visual_tokens",
    "accuracy",
    "accuracy_ci95",
    *(f"acc_{q}" for q in QUESTION_TYPES),
    "per_type",
    "samples",
    "seed",
    "model",
    "seconds",
    "baseline_seconds",
    "run",
)
KEY_COLUMNS = ("method", "params", "pretrained", "samples", "seed", "model")


class ConfigError(ValueError):
    """The ablation config is wrong; the message names the key or the methods entry."""


@dataclass(frozen=True)
class Match:
    """Set `knob` by bisection over [low, high] so the analytic prefill FLOPs ratio hits each target."""

    knob: str
    low: float | str
    high: float | str
    targets: tuple[float, ...]
    steps: int = 12
    integer: bool = False
    tolerance: float = evaluation.BUDGET_TOLERANCE

    def cast(self, value: float) -> float | int:
        return int(round(value)) if self.integer else float(value)


@dataclass(frozen=True)
class Entry:
    """One item of `methods`: a registered compressor, its label, a grid of parameters, an optional match, and
    optionally trained weights."""

    index: int
    name: str
    label: str
    grid: dict[str, list[Any]]
    match: Match | None
    pretrained: evaluation.Trained | None = None

    @property
    def where(self) -> str:
        return f"methods[{self.index}] ({self.name}, label {self.label!r})"


@dataclass(frozen=True)
class Setting:
    """One point of an entry's grid (and one FLOPs target when the entry matches a knob)."""

    entry: Entry
    params: dict[str, Any]
    target: float | None = None

    def build(self, knob: float | None = None) -> Compressor:
        """The setting's compressor from its parameters (trained weights are loaded by `with_weights`)."""
        params = {**(self.entry.pretrained.params if self.entry.pretrained else {}), **self.params}
        if self.entry.match is not None:
            params[self.entry.match.knob] = self.entry.match.cast(knob)
        return build(self.entry.name, **params)

    def describe(self, knob: float | None = None) -> str:
        parts = [f"{k}={_short(v)}" for k, v in self.params.items()]
        if self.entry.match is not None and knob is not None:
            parts.append(f"{self.entry.match.knob}={_short(self.entry.match.cast(knob))}")
        if self.entry.pretrained is not None:
            parts.append(f"trained ({Path(self.entry.pretrained.directory).name})")
        text = " ".join(parts) or "defaults"
        return text if self.target is None else f"{text} (FLOPs target {self.target:g})"

    @property
    def where(self) -> str:
        return f"{self.entry.where}, setting {self.describe() or 'defaults'}"


@dataclass
class Config:
    path: Path
    model: str | None = None
    samples: int = 600
    batch: int = 50
    seed: int = evaluation.TEST_SEED
    device: str = "cpu"
    dtype: str = "auto"
    threads: int | None = None
    warmup: int = 1
    entries: list[Entry] = field(default_factory=list)

    @property
    def model_name(self) -> str:
        return SHIPPED if self.model is None else str(self.model)

    def settings(self) -> list[Setting]:
        settings = []
        for entry in self.entries:
            targets: Iterable[float | None] = entry.match.targets if entry.match else (None,)
            for params in expand_grid(entry.grid):
                settings.extend(Setting(entry, params, target) for target in targets)
        return settings

    def identity(self) -> dict[str, Any]:
        """What the rows of a results directory depend on beyond each setting: a rerun must not change it."""
        return {"model": self.model_name, "samples": self.samples, "seed": self.seed, "dtype": self.dtype}


# -- the config -------------------------------------------------------------------------------------------------
def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The product of the grid's value lists, in the grid's key order (the last key varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The config as a mapping: JSON for .json, YAML for .yaml / .yml."""
    import yaml

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ConfigError(f"{path}: a config is YAML (.yaml, .yml) or JSON (.json), got {suffix!r}")
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = json.loads(path.read_text()) if suffix == ".json" else yaml.safe_load(path.read_text())
    except (ValueError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: not valid {'JSON' if suffix == '.json' else 'YAML'}: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config is a mapping with keys {', '.join(TOP_KEYS)}")
    return data


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a config; every compressor of the grid is built (no model is loaded)."""
    path = Path(path)
    data = read_config_file(path)
    _unknown(data, TOP_KEYS, f"{path}: unknown key")
    config = Config(path)
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise ConfigError(
            f"model: null (the shipped shapes model), a Hugging Face id or a directory; got {model!r}"
        )
    config.model = model
    config.samples = _integer(data, "samples", config.samples, minimum=1)
    config.batch = _integer(data, "batch", config.batch, minimum=1)
    config.seed = _integer(data, "seed", config.seed, minimum=0)
    config.warmup = _integer(data, "warmup", config.warmup, minimum=0)
    if data.get("threads") is not None:
        config.threads = _integer(data, "threads", 1, minimum=1)
    config.device = data.get("device", config.device)
    if not isinstance(config.device, str):
        raise ConfigError(f"device: a torch device such as 'cpu' or 'cuda', got {config.device!r}")
    try:
        device = torch.device(config.device)
    except RuntimeError as error:
        raise ConfigError(f"device: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {config.device!r}, but CUDA is not available here")
    config.dtype = data.get("dtype", config.dtype)
    if config.dtype not in DTYPES:
        raise ConfigError(f"dtype: one of {DTYPES} (hub models only), got {config.dtype!r}")
    methods = data.get("methods")
    if not isinstance(methods, list) or not methods:
        raise ConfigError("methods: a non-empty list of {name, label, grid, match} entries")
    config.entries = [_entry(index, item) for index, item in enumerate(methods)]
    labels: dict[str, Entry] = {}
    for entry in config.entries:
        if entry.label in labels:
            raise ConfigError(
                f"{entry.where}: the label is already used by {labels[entry.label].where}; give each entry its "
                "own label (one line per label in the plots)"
            )
        labels[entry.label] = entry
    seen: dict[str, Setting] = {}
    for setting in config.settings():
        knobs = _bounds(setting) if setting.entry.match else [None]
        checked = [_building(setting, knob) for knob in knobs]
        if setting.entry.match is None:
            key = (_canonical(checked[0]), _pretrained_name(setting))
            if (setting.entry.name, key) in seen:
                raise ConfigError(
                    f"{setting.where} is the same compressor as {seen[setting.entry.name, key].where}"
                )
            seen[setting.entry.name, key] = setting
    return config


def _entry(index: int, item: Any) -> Entry:
    where = f"methods[{index}]"
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: an entry is a mapping with keys {ENTRY_KEYS}, got {item!r}")
    _unknown(item, ENTRY_KEYS, f"{where}: unknown key")
    name = item.get("name")
    known = registry()
    if name not in known:
        raise ConfigError(
            f"{where}: unknown compressor name {name!r}; registered: {', '.join(sorted(known))}"
        )
    label = item.get("label", known[name].__name__)
    if not isinstance(label, str) or not label or label == BASELINE:
        raise ConfigError(f"{where} ({name}): label must be a non-empty string other than {BASELINE!r}")
    where = f"methods[{index}] ({name}, label {label!r})"
    grid = item.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(k, str) for k in grid):
        raise ConfigError(f"{where}: grid is a mapping of parameter -> value or list of values")
    grid = {k: (list(v) if isinstance(v, list) else [v]) for k, v in grid.items()}
    for key, values in grid.items():
        if not values:
            raise ConfigError(f"{where}: grid.{key} is an empty list (no setting)")
    pretrained = _pretrained(where, item["pretrained"], name) if "pretrained" in item else None
    entry = Entry(index, name, label, grid, _match(where, item.get("match"), grid), pretrained)
    parameters = _parameters(known[name])
    for key in grid:
        if key not in parameters:
            raise ConfigError(
                f"{where}: {known[name].__name__} has no parameter {key!r}; its parameters: {', '.join(parameters)}"
            )
    if entry.match is not None and entry.match.knob not in parameters:
        raise ConfigError(
            f"{where}: match.knob={entry.match.knob!r} is not a parameter of {known[name].__name__}; its "
            f"parameters: {', '.join(parameters)}"
        )
    return entry


def _pretrained(where: str, directory: Any, name: str) -> evaluation.Trained:
    """Read `pretrained: DIR`: one saved compressor of the entry's kind, with trained weights."""
    if not isinstance(directory, str) or not directory:
        raise ConfigError(
            f"{where}: pretrained is a directory written by tc.save_pretrained, got {directory!r}"
        )
    try:
        trained = evaluation.read_trained(directory)
    except ValueError as error:
        raise ConfigError(f"{where}: pretrained: {error}") from error
    if trained.name != name:
        raise ConfigError(
            f"{where}: pretrained: {directory} holds a {trained.name!r} compressor, not {name!r}"
        )
    return trained


def with_weights(model: nn.Module, setting: Setting, compressor: Compressor) -> Compressor:
    """The setting's compressor with its entry's trained weights (if any)."""
    pretrained = setting.entry.pretrained
    if pretrained is None:
        return compressor
    try:
        return evaluation.with_weights(model, compressor, pretrained.weights)
    except RuntimeError as error:
        raise ConfigError(
            f"{setting.where}: the weights in {pretrained.directory} do not fit: {error}"
        ) from error


def _pretrained_name(setting: Setting) -> str:
    return setting.entry.pretrained.directory if setting.entry.pretrained else ""


def _match(where: str, data: Any, grid: dict[str, list[Any]]) -> Match | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: match is a mapping with keys {MATCH_KEYS}")
    _unknown(data, MATCH_KEYS, f"{where}: unknown key in match")
    for key in ("knob", "low", "high", "flops"):
        if key not in data:
            raise ConfigError(f"{where}: match needs {key!r} (knob, low, high, flops)")
    knob = data["knob"]
    if not isinstance(knob, str):
        raise ConfigError(f"{where}: match.knob is a parameter name, got {knob!r}")
    if knob in grid:
        raise ConfigError(f"{where}: {knob!r} is both in grid and match.knob; the match sets it")
    bounds = []
    for key in ("low", "high"):
        value = data[key]
        if value != VISUAL and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(
                f"{where}: match.{key} is a number or {VISUAL!r} (the visual tokens), got {value!r}"
            )
        bounds.append(value)
    if all(isinstance(b, (int, float)) for b in bounds) and not bounds[0] < bounds[1]:
        raise ConfigError(f"{where}: match.low={bounds[0]} must be below match.high={bounds[1]}")
    targets = data["flops"] if isinstance(data["flops"], list) else [data["flops"]]
    if not targets or not all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t <= 1 for t in targets
    ):
        raise ConfigError(
            f"{where}: match.flops is a FLOPs ratio in (0, 1] or a list of them, got {data['flops']!r}"
        )
    if len(set(targets)) != len(targets):
        raise ConfigError(f"{where}: match.flops repeats a target: {targets}")
    steps = _integer(data, "steps", 12, minimum=1, where=f"{where}: match.")
    integer = data.get("integer", False)
    if not isinstance(integer, bool):
        raise ConfigError(f"{where}: match.integer is true or false, got {integer!r}")
    tolerance = data.get("tolerance", evaluation.BUDGET_TOLERANCE)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ConfigError(f"{where}: match.tolerance is a positive FLOPs-ratio difference, got {tolerance!r}")
    return Match(
        knob, bounds[0], bounds[1], tuple(float(t) for t in targets), steps, integer, float(tolerance)
    )


def _bounds(setting: Setting, visual: int | None = None) -> list[float]:
    """The match's bounds (VISUAL resolved against `visual`, or left out before the model is known)."""
    match = setting.entry.match
    assert match is not None
    values = [visual if b == VISUAL else b for b in (match.low, match.high)]
    return [float(v) for v in values if v is not None]


def _parameters(cls: type) -> list[str]:
    import inspect

    return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]


def _unknown(data: dict, allowed: Iterable[str], prefix: str) -> None:
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise ConfigError(f"{prefix} {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")


def _integer(data: dict, key: str, default: int, minimum: int, where: str = "") -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}{key}: an integer >= {minimum}, got {value!r}")
    return value


def _building(setting: Setting, knob: float | None = None) -> Compressor:
    try:
        return setting.build(knob)
    except (TypeError, ValueError) as error:
        hint = ""
        if any(isinstance(v, (int, float)) for v in setting.params.values()) and "list" in str(error):
            hint = " (a list-valued parameter is written in the grid as a list of lists, e.g. [[1, 3]])"
        raise ConfigError(f"{setting.where}: {error}{hint}") from error


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _canonical(compressor: Compressor) -> str:
    """The compressor's full parameters (defaults included, normalised by the compressor), as canonical JSON."""
    params = compressor.to_dict()
    params.pop("name", None)
    return json.dumps(_plain(params), sort_keys=True, separators=(",", ":"))


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_short(v) for v in value) + "]"
    return str(value)


# -- running ----------------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    """The model and the evaluation set of a run (loaded only when something is left to compute)."""

    model: nn.Module
    prompts: evaluation.Prompts
    batches: list[list[Sample]]
    visual: int

    @property
    def probe(self) -> list[Sample]:
        """The batch that budgets are matched on: the first one."""
        return self.batches[0]


def run(
    config_path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    fresh: bool = False,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> Path:
    """Validate the config, then evaluate the baseline and every setting not yet in `out`/results.csv; write the
    CSV (after each setting), the Markdown table, the plots and machine.json. Returns the output directory.

    A rerun skips the rows already there and the budget matches already in matches.json; when nothing is left,
    it rewrites the reports without loading the model."""
    from tqdm.auto import tqdm

    config = load_config(config_path)
    settings = config.settings()
    out = Path(out) if out is not None else Path("ablations") / config.path.stem
    if dry_run:
        echo(
            f"{config.path}: {len(settings)} settings + the uncompressed baseline; results would go to {out}"
        )
        for setting in settings:
            match = setting.entry.match
            echo(
                f"  {setting.entry.label}: {setting.describe()}"
                + (f", {match.knob} matched" if match else "")
            )
        return out
    _prepare_directory(config, out, fresh)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    notes = _split_warning(config)
    for note in notes:
        echo(f"warning: {note}")
    loaded: Loaded | None = None

    def load() -> Loaded:
        nonlocal loaded
        if loaded is None:
            loaded = _load(config, out, settings, started, echo)
        return loaded

    rows = _read_rows(out / CSV_NAME)
    done = {_key(row) for row in rows}
    matches: dict[str, list[float]] = _read_json(out / MATCHES_NAME, {})
    knobs: dict[int, float | None] = dict.fromkeys(range(len(settings)))
    matched = [i for i, s in enumerate(settings) if s.target is not None]
    missing = [i for i in matched if _match_key(settings[i], config.batch) not in matches]
    for index in tqdm(missing, desc="matching budgets", disable=not missing):
        setting, run_state = settings[index], load()
        low, high = _bounds(setting, run_state.visual)
        method = evaluation.Method(
            setting.entry.label,
            lambda knob, setting=setting, model=run_state.model: with_weights(
                model, setting, setting.build(knob)
            ),
            low,
            high,
        )
        value, ratio = evaluation.match_budget(
            run_state.model,
            run_state.prompts,
            method,
            setting.target,
            run_state.probe,
            setting.entry.match.steps,
        )
        matches[_match_key(setting, config.batch)] = [setting.entry.match.cast(value), ratio]
        _write_json(out / MATCHES_NAME, matches)
    for index in matched:
        setting = settings[index]
        knobs[index], ratio = matches[_match_key(setting, config.batch)]
        if abs(ratio - setting.target) > setting.entry.match.tolerance:
            notes.append(
                f"{setting.entry.label} {setting.describe(knobs[index])}: the closest FLOPs ratio on the probe "
                f"batch is {ratio:.3f} (match.low/high bound what {setting.entry.match.knob} can reach)"
            )
            echo(f"warning: {notes[-1]}")

    base = _baseline_row(config)
    todo: list[tuple[Setting | None, Compressor | None, dict[str, str]]] = []
    if _key(base) not in done:
        todo.append((None, None, base))
    shown: list[tuple[Setting, dict[str, str]]] = []
    keys = {_key(base)}
    for index, setting in enumerate(settings):
        compressor = setting.build(knobs[index])
        row = _setting_row(config, setting, compressor, knobs[index])
        if _key(row) in keys:
            notes.append(f"{setting.where}: the same compressor as an earlier setting; evaluated once")
            echo(f"warning: {notes[-1]}")
            continue
        keys.add(_key(row))
        shown.append((setting, row))
        if _key(row) not in done:
            todo.append((setting, compressor, row))
    if len(keys) > len(todo):
        echo(f"resuming: {len(keys) - len(todo)} of {len(keys)} rows are already in {out / CSV_NAME}")

    try:
        _evaluate(config, todo, load, rows, out, started)
    except KeyboardInterrupt:
        echo(f"\ninterrupted: {len(rows)} rows are in {out / CSV_NAME}; rerun the same command to go on")
        raise

    by_key = {_key(row): row for row in rows}
    table_rows = [by_key[_key(base)]]
    for setting, row in shown:
        table_rows.append({**by_key[_key(row)], "label": setting.entry.label})  # the current config's label
    if len(by_key) > len(table_rows):
        notes.append(
            f"{len(by_key) - len(table_rows)} rows of {CSV_NAME} are of settings no longer in the config (not shown)"
        )
    table = format_markdown(table_rows, config, notes)
    (out / MD_NAME).write_text(table)
    for name, column in PLOTS.items():
        plot(table_rows, column, out / name)
    echo("")
    echo(table)
    echo(f"results: {out / CSV_NAME}, {out / MD_NAME}, {', '.join(str(out / n) for n in PLOTS)}")
    return out


def _evaluate(
    config: Config,
    todo: list[tuple[Setting | None, Compressor | None, dict[str, str]]],
    load: Callable[[], Loaded],
    rows: list[dict[str, str]],
    out: Path,
    started: str,
) -> None:
    """The baseline (setting None) and the settings left, each appended to the CSV as soon as it is done."""
    from tqdm.auto import tqdm

    for setting, compressor, row in tqdm(todo, desc="settings", disable=not todo):
        run_state = load()
        torch.manual_seed(config.seed)  # what compress builds at random (untrained routers) is seeded
        if setting is None:
            result, reference = evaluation.Result(BASELINE, "-"), None
            for batch in tqdm(run_state.batches, desc=BASELINE, leave=False):
                evaluation.run_batch(run_state.model, run_state.prompts, batch, result)
        else:
            compressor = with_weights(run_state.model, setting, compressor)
            try:
                result, reference = paired(
                    run_state.model,
                    run_state.prompts,
                    compressor,
                    run_state.batches,
                    config.warmup,
                    tqdm,
                    setting.entry.label,
                )
            except (ValueError, RuntimeError) as error:
                raise RuntimeError(f"{setting.where}: {error}") from error
        _fill(row, result, reference, run_state.visual, started)
        _append_row(out / CSV_NAME, row)
        rows.append(row)


def _load(config: Config, out: Path, settings: list[Setting], started: str, echo: Callable) -> Loaded:
    """Load the model and the samples, check that every setting fits the model, write machine.json."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model, prompts = evaluation.load_model(config.model, config.device, config.dtype)
    samples = evaluation.held_out_samples(config.samples, prompts.image_size, config.seed)
    batches = [samples[i : i + config.batch] for i in range(0, len(samples), config.batch)]
    visual = evaluation.visual_tokens(model, prompts.inputs(batches[0]))
    num_layers = model.config.get_text_config().num_hidden_layers
    echo(
        f"{type(model).__name__} ({config.model_name}): {num_layers} decoder layers, {visual} visual tokens; "
        f"{len(samples)} held-out questions (seed {config.seed}) in batches of {config.batch}; "
        f"{len(settings)} settings; results in {out}"
    )
    _check_fit(model, settings, visual)
    _write_machine(out, config, model, started)
    return Loaded(model, prompts, batches, visual)


def paired(
    model: nn.Module,
    prompts: evaluation.Prompts,
    compressor: Compressor,
    batches: list[list[Sample]],
    warmup: int = 0,
    progress: Callable | None = None,
    label: str = "",
) -> tuple[evaluation.Result, evaluation.Result]:
    """The compressed model's `run_batch` on every batch, each next to a timed uncompressed prefill of the same
    batch (even batches uncompressed first, odd batches compressed first): the setting's result and the
    uncompressed timings it is compared with. `warmup` untimed prefills of each on the first batch precede them."""
    result, reference = evaluation.Result("", ""), evaluation.Result(BASELINE, "-")
    scratch = evaluation.Result("", "")
    for _ in range(warmup):
        evaluation.prefill(model, prompts, batches[0], scratch)
        with api.compressed(model, compressor):
            evaluation.prefill(model, prompts, batches[0], scratch)
    iterable = progress(batches, desc=label or compressor.name, leave=False) if progress else batches
    for index, batch in enumerate(iterable):
        for compressed in (False, True) if index % 2 == 0 else (True, False):
            if compressed:
                with api.compressed(model, compressor):
                    evaluation.run_batch(model, prompts, batch, result)
            else:
                evaluation.prefill(model, prompts, batch, reference)
    return result, reference


def _check_fit(model: nn.Module, settings: list[Setting], visual: int) -> None:
    """Compress (and undo) a copy of every setting's compressor (both match bounds), before any evaluation."""
    for setting in settings:
        for knob in _bounds(setting, visual) if setting.entry.match else [None]:
            compressor = copy.deepcopy(_building(setting, knob))
            try:
                api.compress(model, compressor)
            except (TypeError, ValueError) as error:
                raise ConfigError(f"{setting.where} does not fit this model: {error}") from error
            api.uncompress(model)
            with_weights(model, setting, compressor)


def _match_key(setting: Setting, probe_size: int) -> str:
    """What a matched knob value depends on besides the model, samples and seed (fixed for a directory)."""
    match = setting.entry.match
    assert match is not None and setting.target is not None
    spec = {
        "method": setting.entry.name,
        "params": _plain(setting.params),
        "knob": match.knob,
        "bounds": [match.low, match.high],
        "steps": match.steps,
        "integer": match.integer,
        "target": setting.target,
        "probe": probe_size,
    }
    if setting.entry.pretrained is not None:
        spec["pretrained"] = setting.entry.pretrained.directory
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


# -- rows -------------------------------------------------------------------------------------------------------
def _key(row: dict[str, str]) -> tuple[str, ...]:
    return tuple(row[c] for c in KEY_COLUMNS)


def _baseline_row(config: Config) -> dict[str, str]:
    row = dict.fromkeys(COLUMNS, "")
    row.update(method=BASELINE, label=BASELINE, setting="-", params="{}")
    row.update(samples=str(config.samples), seed=str(config.seed), model=config.model_name)
    return row


def _setting_row(
    config: Config, setting: Setting, compressor: Compressor, knob: float | None
) -> dict[str, str]:
    row = _baseline_row(config)
    row.update(
        method=setting.entry.name,
        label=setting.entry.label,
        setting=setting.describe(knob),
        params=_canonical(compressor),
        pretrained=_pretrained_name(setting),
        target_flops="" if setting.target is None else f"{setting.target:g}",
    )
    return row


def _fill(
    row: dict[str, str],
    result: evaluation.Result,
    reference: evaluation.Result | None,
    visual: int,
    started: str,
) -> None:
    count = sum(result.total.values())
    accuracy = result.accuracy
    row.update(
        flops_ratio=_number(result.flops_ratio),
        latency_ratio=_number(result.seconds / reference.seconds if reference and reference.seconds else 1.0),
        kv_ratio=_number(result.kv_ratio),
        visual_tokens=_number(result.average_visual_tokens if result.visual_tokens else float(visual)),
        accuracy=_number(accuracy),
        accuracy_ci95=_number(1.96 * math.sqrt(accuracy * (1 - accuracy) / max(count, 1))),
        per_type=json.dumps(
            {q: [result.right.get(q, 0), result.total[q]] for q in QUESTION_TYPES if q in result.total}
        ),
        seconds=_number(result.seconds),
        baseline_seconds=_number(reference.seconds if reference else result.seconds),
        run=started,
    )
    for qtype in QUESTION_TYPES:
        row[f"acc_{qtype}"] = _number(result.type_accuracy(qtype)) if result.total.get(qtype) else ""


def _number(value: float) -> str:
    return f"{value:.6g}"


def _read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of results.csv (a last row cut short by an interrupted write is dropped and the file rewritten)."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ConfigError(
                f"{path}: its columns are not this version's ({', '.join(COLUMNS)}); rerun with --fresh or "
                "another --out"
            )
        rows = list(reader)
    whole = [row for row in rows if None not in row.values() and None not in row]
    if len(whole) != len(rows):
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, COLUMNS)
            writer.writeheader()
            writer.writerows(whole)
    return whole


def _append_row(path: Path, row: dict[str, str]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)
        handle.flush()
        os.fsync(handle.fileno())


# -- the results directory --------------------------------------------------------------------------------------
def _prepare_directory(config: Config, out: Path, fresh: bool) -> None:
    """Create `out`, or check that a rerun keeps the model, samples, seed and dtype (--fresh: clear it instead);
    copy the config in."""
    copies = sorted(out.glob("config.*")) if out.is_dir() else []
    results = [out / name for name in (CSV_NAME, MATCHES_NAME) if (out / name).is_file()]
    if fresh:
        for name in (CSV_NAME, MD_NAME, MATCHES_NAME, MACHINE_NAME, *PLOTS):
            (out / name).unlink(missing_ok=True)
    elif results:
        if not copies:
            raise ConfigError(
                f"{out} holds results but no copy of their config; rerun with --fresh or give another --out"
            )
        try:
            previous = load_config(copies[0]).identity()
        except ConfigError as error:
            raise ConfigError(f"{copies[0]} (the config of the results in {out}): {error}") from error
        current = config.identity()
        changed = [key for key in current if previous[key] != current[key]]
        if changed:
            detail = ", ".join(f"{key} {previous[key]!r} -> {current[key]!r}" for key in changed)
            raise ConfigError(
                f"{out} holds results for another {' / '.join(changed)} ({detail}); rerun with --fresh to "
                "start over there, or give another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    for copied in copies:
        copied.unlink()
    shutil.copyfile(config.path, out / f"config{config.path.suffix.lower()}")


def _read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def _write_json(path: Path, data: Any) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=1) + "\n")
    temporary.replace(path)


def machine_info(config: Config, model: nn.Module, started: str) -> dict[str, Any]:
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.device(config.device)
    info = {
        "date": started,  # the run column of the rows this run wrote
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _write_machine(out: Path, config: Config, model: nn.Module, started: str) -> None:
    """machine.json: this run's machine; the machines of earlier runs into the same directory under
    `earlier_runs` (each CSV row names its run)."""
    path = out / MACHINE_NAME
    earlier: list[dict[str, Any]] = []
    if path.is_file():
        previous = json.loads(path.read_text())
        earlier = previous.pop("earlier_runs", []) + [previous]
    _write_json(path, {**machine_info(config, model, started), "earlier_runs": earlier})


def _split_warning(config: Config) -> list[str]:
    """A shapes model (benchmarks/train_shapes.py writes training.json beside it) evaluated on the split it was
    trained on is flagged."""
    directory = evaluation.ASSETS if config.model is None else Path(config.model)
    if not (directory / "training.json").is_file():
        return []
    if config.seed == TRAIN_SEED:
        return [f"seed {config.seed} is the split this model was trained on: accuracy is training accuracy"]
    return []


# -- reports ----------------------------------------------------------------------------------------------------
def _sorted(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    base = [r for r in rows if r["method"] == BASELINE]
    rest = sorted(
        (r for r in rows if r["method"] != BASELINE),
        key=lambda r: (r["method"], r["label"], -float(r["flops_ratio"])),
    )
    return base + rest


def format_markdown(rows: list[dict[str, str]], config: Config, notes: list[str]) -> str:
    """The results as a Markdown table (baseline first, then by method and decreasing FLOPs) with its context."""
    base = rows[0]
    counts = {q: total for q, (_, total) in json.loads(base["per_type"] or "{}").items()}
    header = ["label", "setting", "FLOPs", "latency", "KV", "visual/layer", "accuracy", *QUESTION_TYPES]
    lines = [
        f"# Ablation: {config.path.name}",
        "",
        f"Model: {config.model_name}; {config.samples} held-out shapes questions (seed {config.seed}), "
        f"batches of {config.batch}. Per question type: "
        + ", ".join(f"{q} {counts.get(q, 0)}" for q in QUESTION_TYPES)
        + ". FLOPs: analytic prefill FLOPs / uncompressed (encoder and LM head included); latency: prefill "
        "time / the uncompressed prefill timed beside it, batch by batch; KV: KV-cache bytes / uncompressed; "
        "visual/layer: visual tokens per decoder layer (mean); accuracy: ± half-width of a 95% normal interval.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in _sorted(rows):
        cells = [
            row["label"],
            row["setting"],
            f"{float(row['flops_ratio']):.3f}",
            f"{float(row['latency_ratio']):.3f}",
            f"{float(row['kv_ratio']):.3f}",
            f"{float(row['visual_tokens']):.1f}",
            f"{float(row['accuracy']):.3f} ± {float(row['accuracy_ci95']):.3f}",
            *(f"{float(row[f'acc_{q}']):.2f}" if row[f"acc_{q}"] else "-" for q in QUESTION_TYPES),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, str]], column: str, path: Path) -> None:
    """Accuracy against `column` (flops_ratio or latency_ratio), one line per label joining its points in FLOPs
    order, the baseline a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for row in rows:
        if row["method"] != BASELINE:
            point = (float(row["flops_ratio"]), float(row[column]), float(row["accuracy"]))
            lines.setdefault(row["label"], []).append(point)
    for label, points in lines.items():
        points.sort()  # joined in the order of their FLOPs, on either axis
        axes.plot([x for _, x, _ in points], [y for _, _, y in points], marker="o", label=label)
    base = rows[0]
    axes.scatter([1.0], [float(base["accuracy"])], marker="*", s=160, color="black", label=BASELINE, zorder=3)
    axes.set_xlabel(
        "prefill FLOPs / uncompressed (analytic, encoder included)"
        if column == "flops_ratio"
        else "prefill latency / uncompressed (measured, paired batch by batch)"
    )
    axes.set_ylabel(f"accuracy ({base['samples']} held-out questions)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
