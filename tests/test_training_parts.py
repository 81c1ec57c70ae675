"""Units of the training loop: metrics, losses, schedules, checkpoint saving, device choice."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from custom_net.loss import CEDiceLoss, JaccardNLLLoss, SmoothJaccardNLLLoss, build_loss
from custom_net.config import build_parser
from custom_net.checkpoints import CheckpointSaver
from custom_net.hardware import resolve_amp, select_device
from custom_net.optim import SCHEDULE_OPTIONS, build_scheduler
from custom_net.validation import ConfusionMatrix


def test_confusion_matrix_metrics_on_known_masks():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 0]])
    cm = ConfusionMatrix(4)
    cm.update(target, pred)
    assert cm.matrix.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    m = cm.metrics(["__bg__", "a", "b", "never"])
    # IoU: bg 2/(3+3-2)=0.5, a 2/3, b 2/3; class 3 absent everywhere -> NaN, left out of the means.
    assert m["iou"]["__bg__"] == pytest.approx(0.5)
    assert m["iou"]["a"] == pytest.approx(2 / 3) and m["iou"]["b"] == pytest.approx(2 / 3)
    assert math.isnan(m["iou"]["never"])
    assert m["mean_fg_iou"] == pytest.approx(2 / 3)
    assert m["mean_iou"] == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
    assert m["dice"]["a"] == pytest.approx(0.8)
    assert m["mean_fg_dice"] == pytest.approx(0.8)
    assert m["pixel_accuracy"] == pytest.approx(6 / 8)


def test_confusion_matrix_accumulates_and_ignores_out_of_range():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1, 255]), torch.tensor([0, 1, 1]))
    cm.update(torch.tensor([1]), torch.tensor([0]))
    assert cm.matrix.tolist() == [[1, 0], [1, 1]]


def test_jaccard_nll_matches_the_original_formula():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    w = 0.3
    log_probs = F.log_softmax(logits, 1)
    expected = (1 - w) * F.nll_loss(log_probs, target)
    for c in range(3):  # the original app's per-class loop
        t, o = (target == c).float(), log_probs[:, c].exp()
        inter = (o * t).sum()
        expected -= w * torch.log((inter + 1e-15) / (o.sum() + t.sum() - inter + 1e-15))
    assert JaccardNLLLoss(3, w)(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_smooth_jaccard_is_bounded_when_a_class_is_absent_and_still_charges_its_false_positives():
    """A batch without class 2: the original's form adds about 0.5 * -log(1e-15 / area) for it even when it is
    barely predicted; the smoothed form adds 0.5 * log(1 + 100 * area / pixels), which grows with the share of
    the batch predicted as that class but never past 0.5 * log(101)."""
    torch.manual_seed(0)
    absent = torch.randint(0, 2, (2, 32, 32))  # classes 0 and 1 only
    original, smooth = JaccardNLLLoss(3, 0.5), SmoothJaccardNLLLoss(3, 0.5)
    quiet = F.one_hot(absent, 3).permute(0, 3, 1, 2).float() * 4  # class 2 at ~1.5% a pixel: ~30 pixels in all
    area = quiet.softmax(1)[:, 2].sum().item()
    assert original(quiet, absent).item() > 15
    assert smooth(quiet, absent).item() < 1
    loud = quiet.clone()
    loud[:, 2] = 6  # now class 2 wins every pixel: the smoothed loss charges it
    assert smooth(loud, absent).item() > smooth(quiet, absent).item() + 2
    gap = original(quiet, absent).item() - smooth(quiet, absent).item()  # the absent class's term only
    assert gap == pytest.approx(0.5 * (-math.log(1e-15 / area) - math.log(1 + 100 * area / absent.numel())), rel=1e-4)
    # Its term depends on the share of the batch, not on the batch's size: the same images twice over add as much
    # (a fixed 16-pixel smoothing would add 0.25 more; the present classes' terms move by under 0.001).
    doubled = smooth(quiet.repeat(2, 1, 1, 1), absent.repeat(2, 1, 1))
    assert doubled.item() == pytest.approx(smooth(quiet, absent).item(), abs=0.002)
    # However much of the batch it takes, the absent class adds at most 0.5 * log(101) to the present ones' terms.
    only_absent = torch.zeros(2, 3, 32, 32)
    only_absent[:, 2] = 30
    probs = only_absent.softmax(1)
    expected = 0.5 * F.nll_loss(probs.log(), absent).item() + 0.5 * math.log(101)
    for c in (0, 1):  # the present classes, smoothed by 16
        truth = (absent == c).float()
        inter = (probs[:, c] * truth).sum().item()
        expected -= 0.5 * math.log((inter + 16) / (probs[:, c].sum().item() + truth.sum().item() - inter + 16))
    assert smooth(only_absent, absent).item() == pytest.approx(expected, rel=1e-3)
    # Classes present with thousands of pixels, as in a real batch: smoothed by 16, nearly the original.
    every = torch.randint(0, 3, (2, 128, 128))
    logits = torch.randn(2, 3, 128, 128)
    assert smooth(logits, every).item() == pytest.approx(original(logits, every).item(), rel=0.01)


def test_losses_reward_correct_predictions_and_validate_weights():
    target = torch.randint(0, 3, (1, 16, 16))
    perfect = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 20
    wrong = F.one_hot((target + 1) % 3, 3).permute(0, 3, 1, 2).float() * 20
    for loss in (JaccardNLLLoss(3, 0.5), SmoothJaccardNLLLoss(3, 0.5), CEDiceLoss(3, 0.5)):
        assert loss(perfect, target) < loss(wrong, target)
    with pytest.raises(ValueError, match="--class-weights has 2 values for 3 classes"):
        build_loss("ce_dice", 3, 0.5, [1.0, 2.0])
    with pytest.raises(ValueError, match="jaccard_nll"):
        build_loss("focal", 3, 0.5)


def _schedule_args(**overrides):
    args = build_parser().parse_args(["--project-dir", "x", *overrides.pop("argv", [])])
    return args


def _lrs(args, iters=4):
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    sched, per_iter = build_scheduler(args.lr_schedule, opt, iters, **{k: getattr(args, k) for k in SCHEDULE_OPTIONS})
    lrs = []
    for _ in range(args.epochs):
        for _ in range(iters):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            if per_iter:
                sched.step()
        if sched is not None and not per_iter:
            sched.step()
    return lrs


def test_cosine_warms_up_then_decays_to_min_lr():
    args = _schedule_args(argv=["--lr", "0.1", "--epochs", "5", "--warmup-epochs", "1", "--min-lr", "0.001"])
    lrs = _lrs(args)
    assert lrs[0] < lrs[1] < lrs[2] < lrs[3] <= 0.1  # linear warmup over the first epoch
    assert lrs[4] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # then monotone decay
    assert 0.001 <= lrs[-1] < 0.005  # one step short of --min-lr


def test_epoch_schedules_step_after_each_epoch():
    args = _schedule_args(argv=["--lr", "1", "--epochs", "4", "--lr-schedule", "MultiStepLR", "--milestones", "2", "3",
                                "--gamma-step", "0.5"])
    assert args.milestones == [2, 3]
    lrs = _lrs(args, iters=2)
    assert lrs == [1, 1, 1, 1, 0.5, 0.5, 0.25, 0.25]  # epoch 1 trains at the initial LR
    args = _schedule_args(argv=["--lr", "1", "--epochs", "3", "--lr-schedule", "StepLR", "--step-size", "1"])
    assert _lrs(args, iters=1) == pytest.approx([1, 0.1, 0.01])


def test_checkpoint_saver_keeps_newest_and_best(tmp_path):
    model = torch.nn.Linear(2, 2)
    saver = CheckpointSaver(tmp_path, interval=1, max_keep=2, metric="val_loss", save_best=True, save_last=True)
    for epoch, loss in enumerate([0.9, 0.5, 0.7, 0.6], start=1):
        saver.on_epoch_end(model, epoch, {"val_loss": loss})
    saver.on_train_end(model, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model_002_best.pth", "model_003.pth", "model_004.pth", "model_004_last.pth"]
    assert set(torch.load(tmp_path / "model_002_best.pth")) == {"weight", "bias"}  # a plain state dict


def test_device_choice_never_refuses_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto").type == "cpu"
    assert select_device("cpu").type == "cpu"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert select_device("cuda:0").type == "cpu"
    assert any("no CUDA device" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="--gpu-id"):
        select_device("tpu")


def test_amp_modes():
    cpu = torch.device("cpu")
    assert resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    assert resolve_amp("fp16", cpu) is torch.float16
    with pytest.raises(ValueError, match="--amp"):
        resolve_amp("int8", cpu)


def test_auto_precision_follows_the_cpu(monkeypatch):
    """bf16 where the CPU computes it natively (AVX512-BF16 or AMX), else float32: emulated bf16 is slower."""
    from custom_net import hardware

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert resolve_amp("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: {"avx512f", "avx2"})
    assert resolve_amp("auto", cpu) is None
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AMX")
    assert resolve_amp("auto", cpu) is torch.bfloat16
