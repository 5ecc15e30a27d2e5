"""One methods contract: every method through the one allocator (min_units, counts, target,
ignored_layers, from:<method>), a method added in one place reaches the CLI and the API, the
pipeline alone decides what mode means, and the import graph is one-way."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mipp
from mipp.cli import cmd_prune
from mipp.config import PruneConfig, ReconstructorConfig, TrainConfig
from mipp.errors import ConfigError
from mipp.groups import find_unit_groups
from mipp.method_registry import (method_files, method_names, register_method, registered,
                                  unregister_method)
from mipp.methods.allocation import keep_top, select
from mipp.methods.context import SelectionContext
from mipp.methods.l1 import l1_scores
from mipp.zoo import build_model

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
EIGHT = ["mipp", "grasp", "l1", "random", "snip", "synflow", "taylor", "thinet"]
# A MIPP small enough for unit tests: few, short fits.
TINY = dict(repeats=2, calibration_samples=128, path="sequential",
            reconstructor=ReconstructorConfig(epochs=4, finetune_epochs=2, ordering_epochs=2,
                                              patience=1, hidden_cap=16))


def _mlp():
    torch.manual_seed(0)
    return build_model("mlp", (1, 6, 6), 4, widths=(16, 8))


def _data(n=128):
    generator = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 6, 6, generator=generator), torch.randint(0, 4, (n,), generator=generator)


def _context(model, **config):
    x, y = _data()
    groups = find_unit_groups(model, x[:1], ignored=config.get("ignored_layers", ()))
    return SelectionContext(model, groups, x, y, PruneConfig(**{**TINY, **config}))


def _counts(selection):
    return {name: len(kept) for name, kept in selection.keep.items()}


def test_the_registry_lists_one_file_per_method_without_torch():
    assert sorted(method_files()) == sorted(EIGHT) and method_names()[0] == "mipp"
    assert {n: m.kind for n, m in registered().items() if n in EIGHT} == {
        **{n: "scores" for n in ("grasp", "l1", "random", "snip", "synflow", "taylor")},
        "mipp": "chooses", "thinet": "chooses"}
    code = ("import sys, mipp.config, mipp.cli; mipp.cli.build_parser(); "
            "print(list(mipp.config.METHODS), 'torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.stdout.strip() == f"{EIGHT} False", run.stderr[-2000:]


@pytest.mark.parametrize("method", EIGHT)
def test_every_method_keeps_exactly_the_given_counts(method):
    counts = {"fc1": 5, "fc2": 3}
    selection = select(_context(_mlp(), method=method, counts=counts, target=0.5))
    assert _counts(selection) == counts


@pytest.mark.parametrize("method", EIGHT)
def test_every_method_honours_min_units(method):
    # target 0.95 of 16 + 8 units would leave one unit a layer; min_units says 6 (all of a
    # smaller layer); MIPP with a huge tol would also go to the floor.
    config = dict(method=method, min_units=6, target=0.95, allocation="uniform")
    if method == "mipp":
        config = dict(method="mipp", min_units=6, tol=100.0)
    selection = select(_context(_mlp(), **config))
    assert all(n >= 6 for n in _counts(selection).values()), _counts(selection)
    selection = select(_context(_mlp(), method=method, min_units=6, counts={"fc1": 2, "fc2": 1}))
    assert _counts(selection) == {"fc1": 6, "fc2": 6}  # counts below the floor are raised


@pytest.mark.parametrize("method", EIGHT)
def test_every_method_meets_the_target(method):
    # uniform: exactly round((1 - target) x size) a layer, for scorers and choosers alike.
    selection = select(_context(_mlp(), method=method, target=0.5, allocation="uniform"))
    assert _counts(selection) == {"fc1": 8, "fc2": 4}
    if method not in ("mipp", "thinet"):  # global ranks scores, so only scorers
        selection = select(_context(_mlp(), method=method, target=0.5, allocation="global"))
        assert sum(_counts(selection).values()) == 12


@pytest.mark.parametrize("method", EIGHT)
def test_every_method_leaves_ignored_layers_alone(method, tmp_path):
    data = mipp.load_dataset("digits").subset(256, 128, seed=0)
    model = build_model("mlp", data.input_shape, data.num_classes, seed=0, widths=(12, 8, 6))
    config = PruneConfig(**{**TINY, "method": method, "ignored_layers": ("fc2",),
                            "target": 0.5, "allocation": "uniform",
                            "retrain": TrainConfig(epochs=0)})
    result = mipp.prune(model, data, config)
    assert "fc2" not in result.masks
    assert result.model.fc2.out_features == 8
    assert result.model.fc1.out_features == 6 and result.model.fc3.out_features == 3


def test_from_mipp_takes_mipps_counts_and_l1s_units():
    model = _mlp()
    own = select(_context(model, method="mipp", tol=0.3))
    combined = select(_context(model, method="l1", tol=0.3, allocation="from:mipp"))
    assert _counts(combined) == _counts(own)
    ctx = _context(model, method="l1", target=0.5)
    assert combined.keep == keep_top(l1_scores(ctx), _counts(own))
    assert {row["counts_from"] for row in combined.layers.values()} == {"mipp"}


def test_bad_allocations_are_refused_naming_the_field_and_the_fix():
    with pytest.raises(ConfigError, match="allocation 'global'.*'uniform'"):
        select(_context(_mlp(), method="thinet", target=0.5, allocation="global"))
    with pytest.raises(ConfigError, match=r"counts: no unit count for layer\(s\) \['fc2'\]"):
        select(_context(_mlp(), method="l1", counts={"fc1": 3}))
    with pytest.raises(ConfigError, match=r"counts: \['fc9'\] are not prunable"):
        select(_context(_mlp(), method="l1", counts={"fc1": 3, "fc2": 2, "fc9": 1}))
    for bad, field in [(dict(allocation="from:nope"), "allocation"),
                       (dict(allocation="counts"), "counts"),
                       (dict(method="l1", allocation="uniform"), "target"),
                       (dict(method="l1", target=0.5, counts={"fc1": 1}, allocation="global"),
                        "allocation 'counts'")]:
        with pytest.raises(ValueError, match=field):
            PruneConfig(**bad)


@pytest.fixture
def tiny_method():
    @register_method("tiny-first", kind="scores")
    def first_unit_scores(ctx):
        """Tiny: keeps the lowest-numbered units (a test's method)."""
        return {g.name: -torch.arange(g.size, dtype=torch.float32) for g in ctx.groups}
    yield "tiny-first"
    unregister_method("tiny-first")


def test_a_method_registered_once_reaches_the_allocator_the_cli_and_the_api(tiny_method):
    from app.schemas import JobIn
    from mipp.cli import build_parser

    selection = select(_context(_mlp(), method=tiny_method, target=0.5, allocation="uniform"))
    assert selection.keep == {"fc1": list(range(8)), "fc2": list(range(4))}
    prune_parser = build_parser()._subparsers._group_actions[0].choices["prune"]
    assert tiny_method in prune_parser.format_help()
    job = JobIn.model_validate({"model_id": "m", "dataset_id": "d",
                                "config": {"method": tiny_method, "target": 0.5}})
    assert job.config.method == tiny_method
    assert tiny_method in PruneConfig.model_json_schema()["properties"]["method"]["enum"]
    unregister_method(tiny_method)
    with pytest.raises(ValueError, match="method 'tiny-first' is not one of"):
        PruneConfig(method=tiny_method, target=0.5)


def test_at_init_means_the_same_for_every_caller():
    """The pipeline re-initialises from config.seed: a trained model and a fresh one give the
    same pruned net at init (the CLI and the worker hand the pipeline the loaded model)."""
    data = mipp.load_dataset("digits").subset(256, 128, seed=0)
    fresh = build_model("mlp", data.input_shape, data.num_classes, seed=3, widths=(12, 6))
    trained = build_model("mlp", data.input_shape, data.num_classes, seed=3, widths=(12, 6))
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(5.0)  # as if trained: other weights
    config = PruneConfig(method="l1", target=0.5, mode="at-init", seed=3,
                         retrain=TrainConfig(epochs=0))
    a, b = mipp.prune(fresh, data, config), mipp.prune(trained, data, config)
    assert a.masks == b.masks
    assert a.metrics["accuracy"]["dense"] == b.metrics["accuracy"]["dense"]
    assert torch.equal(a.model.fc1.weight, b.model.fc1.weight)
    assert "at-init" not in inspect.getsource(cmd_prune)  # the CLI has no mode handling of its own


def _top_level_imports(path: Path, package: str) -> set[str]:
    """mipp modules a file imports when it is imported (not inside functions or TYPE_CHECKING)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] == package}


def test_the_import_graph_is_one_way():
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (ROOT / "mipp").rglob("*.py")}
    graph = {name: _top_level_imports(path, "mipp") & set(modules) - {name}
             for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, "import circle: " + " -> ".join(trail + [nxt])
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2
    for name in graph:
        if name not in state:
            visit(name, [name])
    assert "mipp.methods.mipp" in graph and "mipp.baselines" not in graph["mipp.methods.mipp"]
