"""Numerical faults: an infinite loss, or a finite loss with infinite gradients, stops the run with a message
naming epoch and iteration, and every checkpoint left behind holds finite weights.
(A NaN loss: tests/test_train_e2e.py::test_non_finite_loss_raises_and_keeps_checkpoints.)
"""
from __future__ import annotations

import json

import pytest
import torch

import custom_net.trainer as train_module
from custom_net.train import cli
from tests.helpers import TINY_TRAIN_ARGS

ARGS = [*TINY_TRAIN_ARGS, "--input-height", "32", "--input-width", "32", "--no-eval", "--epochs", "2",
        "--amp", "off", "--optimizer", "SGD", "--checkpoint-interval", "1", "--max-keep-ckpts", "-1"]


class _InfiniteGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class _FaultOnTrainingCall(torch.nn.Module):
    """The real loss, but on the ``at``-th training call an infinite loss or, with a finite loss, infinite
    gradients (validation runs without grad and is left alone)."""

    def __init__(self, inner, at: int, fault: str):
        super().__init__()
        self.inner, self.at, self.fault, self.calls = inner, at, fault, 0

    def forward(self, logits, target):
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.at:
                if self.fault == "inf-loss":
                    return self.inner(logits, target) * float("inf")
                return self.inner(_InfiniteGradient.apply(logits), target)
        return self.inner(logits, target)


@pytest.mark.parametrize("fault", ["inf-loss", "inf-gradient"])
def test_non_finite_stops_naming_epoch_and_iteration(tiny_project, tmp_path, monkeypatch, capsys, fault):
    message = {"inf-loss": "loss became inf", "inf-gradient": "gradient became nan"}[fault]
    real = train_module.build_loss
    # 3 iterations per epoch: call 6 is the last step of epoch 2, whose weights would be saved right after.
    monkeypatch.setattr(train_module, "build_loss", lambda *a, **k: _FaultOnTrainingCall(real(*a, **k), 6, fault))
    out = tmp_path / "run"
    assert cli(["--project-dir", str(tiny_project), *ARGS, "--output", str(out)]) == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"{message} at epoch 2, iteration 3" in errors[0], errors

    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.pth")) == ["model_001.pth", "model_001_best.pth"]
    state = torch.load(checkpoints / "resume_state.pt", weights_only=False)
    assert state["epoch"] == 1
    for weights in (torch.load(checkpoints / "model_001.pth"), state["model"]):
        assert all(torch.isfinite(t).all() for t in weights.values())
    summary = json.loads((out / "info" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["last_epoch"] == 2
