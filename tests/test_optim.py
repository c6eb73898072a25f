"""digitrec.optim.AdamW must take the very steps torch.optim.AdamW takes, and resume from its state dict."""

import subprocess
import sys

import torch
from torch import nn

from digitrec import optim
from digitrec.optim import AdamW, WeightAverage


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)).to(
        memory_format=torch.channels_last
    )


def _groups(model: nn.Module) -> list[dict]:
    return [
        {"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.05},
        {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0},
    ]


def _train(model: nn.Module, optimizer, steps: range, lrs=(3e-3, 1e-3, 2e-3, 5e-4, 1e-3, 4e-3)) -> None:
    for step in steps:
        x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(step))
        for group in optimizer.param_groups:
            group["lr"] = lrs[step % len(lrs)]
        loss = model(x).logsumexp(1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def test_matches_torch_adamw():
    ours, theirs = _model(), _model()
    _train(ours, AdamW(_groups(ours), lr=1e-3, betas=(0.9, 0.99)), range(6))
    kernel = {"fused": True} if optim._FUSED else {"foreach": False}  # torch's AdamW with the same arithmetic
    _train(theirs, torch.optim.AdamW(_groups(theirs), lr=1e-3, betas=(0.9, 0.99), **kernel), range(6))
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_multi_tensor_update_matches_torch_adamw(monkeypatch):
    """The path taken where torch has no fused AdamW kernel."""
    monkeypatch.setattr(optim, "_FUSED", False)
    ours, theirs = _model(), _model()
    _train(ours, AdamW(_groups(ours), lr=1e-3, betas=(0.9, 0.99)), range(6))
    _train(theirs, torch.optim.AdamW(_groups(theirs), lr=1e-3, betas=(0.9, 0.99), foreach=False), range(6))
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_state_dict_resumes_exactly():
    straight = _model()
    _train(straight, AdamW(_groups(straight), lr=1e-3), range(6))
    resumed = _model()
    first = AdamW(_groups(resumed), lr=1e-3)
    _train(resumed, first, range(3))
    second = AdamW(_groups(resumed), lr=1e-3)
    second.load_state_dict(first.state_dict())
    _train(resumed, second, range(3, 6))
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_does_not_import_the_compiler():
    code = "import torch, digitrec.optim as o; m = torch.nn.Linear(2, 2); opt = o.AdamW([{'params': m.parameters()}], lr=0.1); m(torch.ones(1, 2)).sum().backward(); opt.step(); import sys; print('torch._dynamo' in sys.modules)"
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "False"
    )


def test_weight_average_moves_a_share_toward_the_trained_weights():
    model = _model()
    average = WeightAverage(model, decay=0.9)
    before = [t.clone() for t in average.model.state_dict().values()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(4, 1, 28, 28))  # BatchNorm's running statistics and batch count move too
    average.update(step=1000)  # decay_at(1000) = 0.9
    for (name, trained), old, averaged in zip(
        model.state_dict().items(), before, average.model.state_dict().values(), strict=True
    ):
        if trained.is_floating_point():
            torch.testing.assert_close(averaged, 0.9 * old + 0.1 * trained, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(averaged, trained), name
    assert not any(p.requires_grad for p in average.model.parameters())


def test_weight_average_forgets_the_first_steps_fast():
    average = WeightAverage(_model(), decay=0.999)
    assert average.decay_at(0) == 0.1
    assert average.decay_at(90) == 0.91
    assert average.decay_at(100_000) == 0.999


def test_zero_grad_keeps_torch_optimizers_meaning_of_set_to_none():
    """zero_grad(set_to_none=False) set the gradients to None all the same."""
    layer = nn.Linear(3, 2)
    optimizer = AdamW([{"params": layer.parameters()}], lr=0.1)
    layer(torch.ones(1, 3)).sum().backward()
    optimizer.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in layer.parameters())
    optimizer.zero_grad()
    assert all(p.grad is None for p in layer.parameters())
