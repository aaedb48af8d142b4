"""`tokencompress ablate`: the grid, validation before any model work, resuming, paired latency, matched budgets
and the outputs, on the shipped shapes model with a few held-out questions (2 batches of 4)."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml
from forced_routers import save_forced_dpn

import tokencompress as tc
from tokencompress import ablation, api, evaluation
from tokencompress.cli import main

REPO = Path(__file__).resolve().parents[1]
SMALL = {"samples": 8, "batch": 4, "seed": 1, "warmup": 0}
RUN_METHODS = [
    {"name": "fastv", "grid": {"layer": 2, "keep": [0.25, 0.5]}},
    {"name": "random", "label": "Random", "grid": {"keep": 0.5, "seed": 3}},
]


def write(path: Path, **config) -> Path:
    path.write_text(json.dumps(config) if path.suffix == ".json" else yaml.safe_dump(config, sort_keys=False))
    return path


def rows(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def shipped():
    return evaluation.load_shapes_model()


class Spy:
    """Stands in for the model loader (hands out the module's shipped model) and counts evaluation calls; logs
    whether each prefill ran compressed; can interrupt the run at a given run_batch call."""

    def __init__(self, patch, shipped, interrupt_at: int | None = None):
        self.calls, self.prefills, self.interrupt_at = Counter(), [], interrupt_at
        run_batch, prefill = evaluation.run_batch, evaluation.prefill

        def load_model(name=None, device="cpu", dtype="auto"):
            self.calls["load"] += 1
            return shipped

        def counted_run_batch(*args, **kwargs):
            self.calls["run_batch"] += 1
            if self.calls["run_batch"] == self.interrupt_at:
                raise KeyboardInterrupt
            return run_batch(*args, **kwargs)

        def logged_prefill(model, *args, **kwargs):
            self.prefills.append(getattr(model, api.ATTRIBUTE, None) is not None)
            return prefill(model, *args, **kwargs)

        patch.setattr(evaluation, "load_model", load_model)
        patch.setattr(evaluation, "run_batch", counted_run_batch)
        patch.setattr(evaluation, "prefill", logged_prefill)


@pytest.fixture(scope="module")
def resumed(shipped, tmp_path_factory):
    """A JSON config run through the command, interrupted in its third setting, then run again twice."""
    directory = tmp_path_factory.mktemp("ablation")
    config = write(directory / "grid.json", **SMALL, methods=RUN_METHODS)
    out = directory / "out"
    spies = []
    for interrupt_at in (5, None, None):  # baseline 2 batches, FastV 0.25 2 batches, then FastV 0.5 breaks
        with pytest.MonkeyPatch.context() as patch:
            spies.append(Spy(patch, shipped, interrupt_at))
            if interrupt_at:
                with pytest.raises(SystemExit) as exited:
                    main(["ablate", str(config), "--out", str(out)])
                assert exited.value.code == 130
                interrupted = (out / "results.csv").read_text()
            else:
                main(["ablate", str(config), "--out", str(out)])
    return out, spies, interrupted


def test_grid_expands_to_the_exact_product(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "load_model", lambda *a, **k: pytest.fail("no model work expected"))
    methods = [
        {"name": "fastv", "grid": {"layer": [1, 2, 3], "keep": [0.25, 0.5], "query": "text"}},
        {"name": "static_pyramid", "grid": {"after_layers": [[1], [1, 3], 5], "kernels": [[2, 2]]}},
        {
            "name": "mustdrop",
            "grid": {"key_ratio": [0.05, 0.1]},
            "match": {"knob": "budget", "low": 1.0, "high": "visual", "flops": [0.7, 0.5]},
        },
    ]
    yaml_config = ablation.load_config(write(tmp_path / "grid.yaml", methods=methods))
    json_config = ablation.load_config(write(tmp_path / "grid.json", methods=methods))
    settings = yaml_config.settings()
    assert [(s.entry.label, s.params, s.target) for s in settings] == [
        (s.entry.label, s.params, s.target) for s in json_config.settings()
    ]
    fastv = [(s.params["layer"], s.params["keep"], s.params["query"]) for s in settings[:6]]
    assert fastv == list(itertools.product([1, 2, 3], [0.25, 0.5], ["text"]))
    assert [s.build().after_layers for s in settings[6:9]] == [(1,), (1, 3), (5,)]
    assert all(s.build().kernels == ((2, 2),) for s in settings[6:9])
    must = [(s.params["key_ratio"], s.target) for s in settings[9:]]
    assert must == list(itertools.product([0.05, 0.1], [0.7, 0.5]))
    assert len(settings) == 6 + 3 + 4
    assert {s.entry.label for s in settings} == {"FastV", "StaticPyramid", "MustDrop"}


@pytest.mark.parametrize(
    ("name", "settings", "matched"),
    [
        ("shapes.yaml", 19, {"keep": 6, "budget": 3}),
        ("shapes_batch1.yaml", 3, {}),
        ("shapes_qwen2_vl.yaml", 14, {"keep": 6, "budget": 3}),
    ],
)
def test_shipped_configs_are_valid(capsys, monkeypatch, name, settings, matched):
    """The configs in benchmarks/ablations validate (the shipped routers load) and list their settings without
    loading a model."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(evaluation, "load_model", lambda *a, **k: pytest.fail("no model work expected"))
    main(["ablate", str(REPO / "benchmarks/ablations" / name), "--dry-run"])
    out = capsys.readouterr().out
    assert f"{settings} settings + the uncompressed baseline" in out
    for knob, count in matched.items():
        assert out.count(f"{knob} matched") == count


GOOD = {"name": "fastv", "grid": {"keep": 0.5}}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"sample": 10}, ["unknown key 'sample'", "allowed: model, samples"]),
        ({"batch": 0}, ["batch: an integer >= 1"]),
        ({"dtype": "fp8"}, ["dtype: one of"]),
        (
            {"methods": [GOOD, {"name": "fastvv"}]},
            ["methods[1]: unknown compressor name 'fastvv'", "fastv, gamma_mod"],
        ),
        ({"methods": [GOOD, {"name": "fastv", "grids": {}}]}, ["methods[1]: unknown key 'grids'"]),
        (
            {"methods": [GOOD, {"name": "random", "grid": {"kepe": 0.5}}]},
            ["methods[1] (random, label 'RandomDrop')", "no parameter 'kepe'", "keep"],
        ),
        (
            {"methods": [GOOD, {"name": "fastv", "label": "B", "grid": {"keep": [0.25, 1.5]}}]},
            ["methods[1] (fastv, label 'B'), setting keep=1.5", "keep=1.5 is outside (0, 1]"],
        ),
        (
            {"methods": [GOOD, {"name": "static_pyramid", "grid": {"kernels": [2, 2]}}]},
            ["methods[1] (static_pyramid", "setting kernels=2", "list of lists"],
        ),
        (
            {"methods": [GOOD, {"name": "fastv"}]},
            ["methods[1] (fastv, label 'FastV')", "already used by methods[0]"],
        ),
        (
            {"methods": [GOOD, {"name": "fastv", "label": "B", "grid": {"keep": 0.5, "layer": 2}}]},
            ["methods[1] (fastv, label 'B'), setting keep=0.5 layer=2 is the same compressor as methods[0]"],
        ),
        (
            {"methods": [GOOD, {"name": "mustdrop", "grid": {"budget": 9.0}, "match": {"knob": "budget"}}]},
            ["methods[1] (mustdrop, label 'MustDrop'): match needs 'low'"],
        ),
        (
            {"methods": [{"name": "fastv", "match": {"knob": "keep", "low": 0.01, "high": 1, "flops": 1.5}}]},
            ["methods[0] (fastv, label 'FastV'): match.flops is a FLOPs ratio in (0, 1]"],
        ),
        (
            {
                "methods": [
                    {"name": "fastv", "match": {"knob": "kep", "low": 0.01, "high": 1.0, "flops": 0.5}}
                ]
            },
            ["methods[0] (fastv, label 'FastV'): match.knob='kep' is not a parameter of FastV"],
        ),
        (
            {
                "methods": [
                    {"name": "fastv", "match": {"knob": "keep", "low": 0.0, "high": 1.0, "flops": 0.5}}
                ]
            },
            ["methods[0] (fastv, label 'FastV'), setting defaults (FLOPs target 0.5)", "keep=0.0 is outside"],
        ),
    ],
)
def test_bad_configs_fail_before_any_model_work(tmp_path, monkeypatch, change, expected):
    monkeypatch.setattr(evaluation, "load_model", lambda *a, **k: pytest.fail("no model work expected"))
    config = write(tmp_path / "bad.yaml", **{**SMALL, "methods": [GOOD], **change})
    with pytest.raises(ablation.ConfigError) as error:
        ablation.load_config(config)
    for text in expected:
        assert text in str(error.value)
    with pytest.raises(SystemExit) as exited:
        main(["ablate", str(config), "--out", str(tmp_path / "out")])
    assert str(error.value) in str(exited.value.code)
    assert not (tmp_path / "out").exists()


def test_a_setting_that_does_not_fit_the_model_fails_before_evaluation(tmp_path, shipped, monkeypatch):
    spy = Spy(monkeypatch, shipped)
    methods = [GOOD, {"name": "static_pyramid", "grid": {"after_layers": [[1], [7]]}}]
    config = write(tmp_path / "fit.yaml", **SMALL, methods=methods)
    with pytest.raises(SystemExit) as exited:
        main(["ablate", str(config), "--out", str(tmp_path / "out")])
    message = str(exited.value.code)
    assert "methods[1] (static_pyramid, label 'StaticPyramid'), setting after_layers=[7]" in message
    assert "does not fit this model" in message and "allowed 0..6" in message
    assert spy.calls == Counter(load=1) and not spy.prefills
    assert not (tmp_path / "out" / "results.csv").exists()


def test_resume_skips_done_settings_and_keeps_their_rows(resumed):
    out, (first, second, third), interrupted = resumed
    assert first.calls["run_batch"] == 5  # interrupted in FastV keep=0.5's first batch
    done = interrupted.splitlines()
    assert len(done) == 3 and done[1].startswith("uncompressed,") and "keep=0.25" in done[2]
    assert second.calls == Counter(load=1, run_batch=2 * 2)  # the two settings left, two batches each
    lines = (out / "results.csv").read_text().splitlines()
    assert lines[:3] == done and len(lines) == 5
    assert third.calls == Counter()  # nothing left: the reports are rewritten without loading the model
    table = rows(out)
    assert len({ablation._key(row) for row in table}) == 4
    assert all(row["samples"] == "8" and row["seed"] == "1" for row in table)


def test_latency_is_paired_batch_by_batch(resumed):
    """Each setting's batches alternate with a timed uncompressed prefill of the same batch (U C, then C U)."""
    out, (_, second, _), _ = resumed
    assert second.prefills == [False, True, True, False] * 2
    for row in rows(out)[1:]:
        assert float(row["baseline_seconds"]) > 0
        assert float(row["latency_ratio"]) == pytest.approx(
            float(row["seconds"]) / float(row["baseline_seconds"]), rel=1e-4
        )
    assert rows(out)[0]["latency_ratio"] == "1"


def test_csv_agrees_with_evaluating_each_compressor_directly(resumed, shipped):
    """Accuracy (overall and per type), FLOPs, KV and visual tokens in the CSV equal run_batch on the same
    batches, with the compressor rebuilt from the CSV's params (padding, hence FLOPs, depends on the batches)."""
    model, prompts = shipped
    samples = evaluation.held_out_samples(8, prompts.image_size, seed=1)
    out = resumed[0]
    table = rows(out)
    assert [(r["method"], r["label"]) for r in table] == [
        ("uncompressed", "uncompressed"),
        ("fastv", "FastV"),
        ("fastv", "FastV"),
        ("random", "Random"),
    ]
    accuracies = set()
    for row in table:
        result = evaluation.Result(row["method"], "")
        if row["method"] == "uncompressed":
            for batch in (samples[:4], samples[4:]):
                evaluation.run_batch(model, prompts, batch, result)
        else:
            compressor = tc.build(row["method"], **json.loads(row["params"]))
            for batch in (samples[:4], samples[4:]):
                with tc.compressed(model, compressor):
                    evaluation.run_batch(model, prompts, batch, result)
            assert float(row["flops_ratio"]) == pytest.approx(result.flops_ratio, rel=1e-5)
            assert float(row["kv_ratio"]) == pytest.approx(result.kv_ratio, rel=1e-5)
            assert float(row["visual_tokens"]) == pytest.approx(result.average_visual_tokens, rel=1e-5)
        assert float(row["accuracy"]) == pytest.approx(result.accuracy, abs=1e-9)
        assert json.loads(row["per_type"]) == {q: [result.right[q], n] for q, n in result.total.items()}
        for qtype, total in result.total.items():
            assert float(row[f"acc_{qtype}"]) == pytest.approx(result.right[qtype] / total, rel=1e-5)
        accuracies.add(row["accuracy"])
    assert json.loads(table[1]["params"]) == {"keep": 0.25, "layer": 2, "query": "last"}
    assert len(accuracies) > 1  # the settings do differ in what they answer


def test_command_writes_table_plots_and_machine(resumed):
    out = resumed[0]
    assert json.loads((out / "config.json").read_text())["methods"] == RUN_METHODS
    table = (out / "results.md").read_text().splitlines()
    body = [line for line in table if line.startswith("| ")]
    assert body[0].startswith("| label | setting | FLOPs | latency |")
    assert body[1].startswith("| uncompressed | - | 1.000 | 1.000 | 1.000 | 144.0 |")
    assert [line.split(" | ")[1] for line in body[2:]] == [
        "layer=2 keep=0.5",
        "layer=2 keep=0.25",
        "keep=0.5 seed=3",
    ]
    for name in ("pareto.png", "latency.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    machine = json.loads((out / "machine.json").read_text())
    assert {"platform", "cpu", "cores", "torch", "transformers", "device", "threads", "date"} <= set(machine)
    assert len(machine["earlier_runs"]) == 1  # the interrupted run; the third loaded nothing
    assert {row["run"] for row in rows(out)} == {machine["earlier_runs"][0]["date"], machine["date"]}


def test_matched_budgets_reach_the_targets(tmp_path, shipped, monkeypatch):
    Spy(monkeypatch, shipped)
    methods = [
        {"name": "fastv", "match": {"knob": "keep", "low": 0.01, "high": 1.0, "flops": [0.6], "steps": 8}},
        {
            "name": "mustdrop",
            "match": {"knob": "budget", "low": 1.0, "high": "visual", "flops": 0.6, "steps": 8},
        },
        {
            "name": "fastv",
            "label": "far",
            "match": {"knob": "keep", "low": 0.01, "high": 1.0, "flops": 0.2, "steps": 3},
        },
    ]
    config = write(tmp_path / "match.yaml", **{**SMALL, "samples": 4}, methods=methods)
    out = ablation.run(config, tmp_path / "out", echo=lambda line: None)
    model, prompts = shipped
    samples = evaluation.held_out_samples(4, prompts.image_size, seed=1)
    fastv, mustdrop, far = rows(out)[1:]
    for row in (fastv, mustdrop):
        assert row["target_flops"] == "0.6"
        assert abs(float(row["flops_ratio"]) - 0.6) < 0.01
        compressor = tc.build(row["method"], **json.loads(row["params"]))
        assert evaluation.flops_ratio(model, prompts, compressor, samples) == pytest.approx(
            float(row["flops_ratio"]), rel=1e-5
        )
    assert float(far["flops_ratio"]) > 0.4  # out of FastV@2's reach: reported, not hidden
    report = (out / "results.md").read_text()
    assert (
        "- far keep=" in report and "(FLOPs target 0.2): the closest FLOPs ratio on the probe batch" in report
    )


def test_rerun_with_other_samples_is_refused_unless_fresh(resumed, tmp_path, shipped, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(resumed[0], out)
    spy = Spy(monkeypatch, shipped)
    changed = write(tmp_path / "grid.yaml", **{**SMALL, "samples": 4}, methods=RUN_METHODS[1:])
    with pytest.raises(SystemExit) as exited:
        main(["ablate", str(changed), "--out", str(out)])
    assert "holds results for another samples (samples 8 -> 4); rerun with --fresh" in str(exited.value.code)
    assert spy.calls == Counter()
    main(["ablate", str(changed), "--out", str(out), "--fresh"])
    assert [(row["method"], row["samples"]) for row in rows(out)] == [("uncompressed", "4"), ("random", "4")]
    assert sorted(p.name for p in out.glob("config.*")) == ["config.yaml"]


def test_pretrained_routers_are_loaded_into_every_setting(tmp_path, shipped, monkeypatch):
    """DPN routers forced to the identity expert answer exactly as the uncompressed model with all 144 tokens;
    forced to the 2 x 2 expert, exactly as StaticPyramid's 2 x 2 max pooling at the same layers (a compressor
    without routers); untrained routers do neither."""
    model, prompts = shipped
    save_forced_dpn(model, tmp_path / "identity", expert=0)
    save_forced_dpn(model, tmp_path / "pool", expert=2)
    Spy(monkeypatch, shipped)
    methods = [
        {"name": "dpn", "label": "identity", "pretrained": str(tmp_path / "identity")},
        {"name": "dpn", "label": "pool", "pretrained": str(tmp_path / "pool")},
        {"name": "static_pyramid", "grid": {"kernels": [[2, 2]], "pooling": "max"}},
    ]
    config = write(tmp_path / "trained.yaml", **SMALL, methods=methods)
    out = ablation.run(config, tmp_path / "out", echo=lambda line: None)
    base, identity, pool, static = rows(out)
    assert (
        identity["pretrained"] == str(tmp_path / "identity") and "trained (identity)" in identity["setting"]
    )
    assert float(identity["visual_tokens"]) == 144
    assert (identity["accuracy"], identity["per_type"]) == (base["accuracy"], base["per_type"])
    assert float(static["visual_tokens"]) < 144
    for column in ("accuracy", "per_type", "visual_tokens", "kv_ratio"):
        assert pool[column] == static[column], column
    assert not getattr(model, api.ATTRIBUTE, None)  # every compress was undone

    untrained = tc.DPN()  # the same pipeline with fresh routers: sampled, neither forced choice
    result = evaluation.Result("dpn", "")
    samples = evaluation.held_out_samples(8, prompts.image_size, seed=1)
    with tc.compressed(model, untrained):
        for batch in (samples[:4], samples[4:]):
            evaluation.run_batch(model, prompts, batch, result)
    assert result.average_visual_tokens not in (144, float(pool["visual_tokens"]))


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"name": "dpn", "pretrained": "{missing}"}, "no tokencompress_config.json in"),
        ({"name": "gamma_mod", "pretrained": "{pool}"}, "holds a 'dpn' compressor, not 'gamma_mod'"),
        ({"name": "dpn", "pretrained": "{bare}"}, "has no trained weights"),
        ({"name": "dpn", "pretrained": 3}, "pretrained is a directory written by tc.save_pretrained"),
    ],
)
def test_bad_pretrained_fails_before_any_model_work(tmp_path, shipped, monkeypatch, entry, expected):
    model, _ = shipped
    save_forced_dpn(model, tmp_path / "pool", expert=2)
    with tc.compressed(model, tc.FastV()):
        tc.save_pretrained(model, tmp_path / "fastv")  # a pipeline without weights
    (tmp_path / "bare").mkdir()
    config = json.loads((tmp_path / "fastv" / api.CONFIG_NAME).read_text())
    config["compressors"] = [tc.DPN().to_dict()]
    (tmp_path / "bare" / api.CONFIG_NAME).write_text(json.dumps(config))
    if isinstance(entry["pretrained"], str):
        entry = {
            **entry,
            "pretrained": entry["pretrained"].format(
                **{n: tmp_path / n for n in ("missing", "pool", "bare")}
            ),
        }
    monkeypatch.setattr(evaluation, "load_model", lambda *a, **k: pytest.fail("no model work expected"))
    with pytest.raises(ablation.ConfigError, match="methods\\[0\\]") as error:
        ablation.load_config(write(tmp_path / "bad.yaml", **SMALL, methods=[entry]))
    assert expected in str(error.value)


def test_pretrained_weights_that_do_not_fit_fail_before_evaluation(tmp_path, shipped, monkeypatch):
    model, _ = shipped
    save_forced_dpn(model, tmp_path / "pool", expert=2)
    spy = Spy(monkeypatch, shipped)
    methods = [{"name": "dpn", "pretrained": str(tmp_path / "pool"), "grid": {"experts": [[[1, 1], [2, 2]]]}}]
    with pytest.raises(SystemExit) as exited:
        main(
            [
                "ablate",
                str(write(tmp_path / "fit.yaml", **SMALL, methods=methods)),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    message = str(exited.value.code)
    assert (
        "methods[0] (dpn, label 'DPN')" in message and "do not fit" in message and "size mismatch" in message
    )
    assert not spy.prefills and not (tmp_path / "o" / "results.csv").exists()


@pytest.mark.parametrize(
    ("model", "seed", "flagged"), [(None, 0, True), (None, 1, False), ("org/chat", 0, False)]
)
def test_evaluating_a_shapes_model_on_its_training_split_is_flagged(tmp_path, model, seed, flagged):
    """Shapes models train on ShapesTask seed 0 whatever their init seed; hub models have no such split."""
    config = ablation.load_config(
        write(tmp_path / "c.yaml", **{**SMALL, "seed": seed}, model=model, methods=[GOOD])
    )
    notes = ablation._split_warning(config)
    assert bool(notes) is flagged
    assert not flagged or "seed 0 is the split this model was trained on" in notes[0]
