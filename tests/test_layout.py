"""The shape of the code: one owner of the run folder's layout (the writer and every reader agree), no import
cycle, short functions, the apps importable as packages."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from custom_net import original_app
from custom_net.custom_weights import checkpoint_classes
from custom_net.inference import load_trained_model
from custom_net.quantize import load_calibration_images
from custom_net.run_folder import SPLITS, RunFolder, resolve_checkpoint
from custom_net.train import main
from tests.helpers import REPO, TINY_TRAIN_ARGS

SOURCES = [*REPO.glob("custom_net/*.py"), *REPO.glob("supervisely/*/src/*.py"), *REPO.glob("supervisely/*/src/*/*.py")]

# The artifact contract (the platform's Serve UNet and the original app's users read these names).
CONTRACT = {"checkpoints/train_args.json", "info/augs_config.json", "info/augs_preview.py", "info/model_classes.json",
            "info/ui_state.json", "info/train_set.json", "info/val_set.json", "info/train_vis_items.json",
            "info/val_vis_items.json"}


@pytest.fixture(scope="module")
def run(tiny_project, tmp_path_factory) -> RunFolder:
    out = tmp_path_factory.mktemp("layout") / "run"
    main(["--project-dir", str(tiny_project), *TINY_TRAIN_ARGS, "--sly-augs-path", "seg_simple", "--vis-count", "1",
          "--checkpoint-interval", "1", "--max-keep-ckpts", "-1", "--output", str(out)])
    return RunFolder(out)


def test_training_writes_exactly_what_run_folder_names(run):
    named = {run.train_args, run.resume_state, run.model_classes, run.ui_state, run.augs_config, run.augs_preview,
             run.metrics_log, run.summary, run.calibration, *run.checkpoint_files()}
    named |= {path for split in SPLITS for path in (run.split_set(split), run.vis_items(split))}
    named |= {run.preview(split, epoch) for split in SPLITS for epoch in (1, 2)}
    written = {p for p in run.root.rglob("*") if p.is_file()}
    charts, evaluation = {p for p in written if p.parent == run.charts}, {p for p in written if run.eval in p.parents}
    assert written - charts - evaluation == named
    assert {p.relative_to(run.root).as_posix() for p in named} >= CONTRACT
    assert [p.name for p in run.checkpoint_files("")] == ["model_001.pth", "model_002.pth"]
    assert [p.name for p in run.checkpoint_files("last")] == ["model_002_last.pth"]
    assert len(run.checkpoint_files("best")) == 1
    assert charts and (run.eval / "report.html").is_file()


def test_every_reader_finds_what_training_wrote(run):
    checkpoint = resolve_checkpoint(run.root)
    assert checkpoint == run.chosen_checkpoint() and checkpoint.parent == run.checkpoints
    assert RunFolder.of_checkpoint(checkpoint).root == run.root
    trained = load_trained_model(checkpoint)
    assert [c.name for c in trained.model_classes] == [c.name for c in run.read_model_classes()]
    images = load_calibration_images(run.calibration, trained.input_height, trained.input_width)
    assert images.dtype == np.uint8 and len(images)
    assert checkpoint_classes(str(checkpoint), None) == ([c.name for c in trained.model_classes], str(run.model_classes))
    assert RunFolder.onnx_for(checkpoint).parent == run.checkpoints
    values, note = original_app.translate_train_args(
        {"checkpoints_dir": "/agent/checkpoints", "sly": True, "classes_path": "/agent/info/model_classes.json"},
        run.train_args)
    assert values["classes_path"] == str(run.model_classes) and "classes_path" in note


def _string_constants(path: Path):
    """String constants of a module, docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_each_run_folder_path_is_defined_once():
    """No module but run_folder.py spells a file or folder name of the run's layout."""
    folder = RunFolder("run")
    paths = [folder.train_args, folder.resume_state, folder.model_classes, folder.ui_state, folder.augs_config,
             folder.augs_preview, folder.metrics_log, folder.summary, folder.calibration, folder.open_app_link,
             folder.upload_state, folder.experiment_info, folder.model_meta, folder.split_set("train"), folder.vis_items("val")]
    names = {p.name for p in paths} | {p.relative_to(folder.root).as_posix() for p in paths}
    spelled = [f"{path.relative_to(REPO)}:{line}: {value!r}" for path in SOURCES if path.name != "run_folder.py"
               for line, value in _string_constants(path)
               if value in names or any(value.endswith("/" + name) for name in names)]
    assert not spelled, spelled


def test_no_import_cycle_in_the_engine():
    graph = {}
    for path in REPO.glob("custom_net/*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "custom_net":
                deps |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("custom_net."):
                deps.add(node.module.split(".")[1])
        graph[path.stem] = deps
    visiting, done = set(), set()

    def visit(module, trail):
        assert module not in visiting, " -> ".join([*trail, module])
        if module in done or module not in graph:
            return
        visiting.add(module)
        for dep in graph[module]:
            visit(dep, [*trail, module])
        visiting.discard(module)
        done.add(module)

    for module in graph:
        visit(module, [])


def test_no_function_over_60_lines():
    long = [f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in SOURCES for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert not long, long


@pytest.mark.slow
def test_the_apps_import_as_packages_from_anywhere(tmp_path):
    """Installed (pip install -e .), the apps need no --app-dir or PYTHONPATH, and importing loads no model."""
    result = subprocess.run([sys.executable, "-c", "import serve_app.app, serve_app.checks, train_app.dashboard"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
