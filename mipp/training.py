"""Training, retraining and evaluation of classifiers on in-memory tensors.

    history = train(model, data, TrainConfig(epochs=3), device="auto", seed=0)
    evaluate(model, data.x_test, data.y_test) -> {"accuracy": 0.97, "loss": 0.09}
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from mipp.config import TrainConfig
from mipp.errors import ConfigError
from mipp.progress import Phase, ProgressCallback, no_progress


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when present; anything else is passed to torch.device."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"device: {device!r} is not a torch device ({exc}); use auto, cpu or cuda")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA device is present; use auto or cpu")
    return resolved


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, nesterov=config.momentum > 0)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _lr_factor(config: TrainConfig, step: int, total: int) -> float:
    if config.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))
    if config.schedule == "step":  # x0.1 at 50% and 75% of training
        return 0.1 ** sum(step >= total * m for m in (0.5, 0.75))
    return 1.0


def train(model: nn.Module, data, config: TrainConfig, *, device: str | torch.device = "auto",
          seed: int = 0, progress: ProgressCallback = no_progress,
          phase: str = Phase.TRAINING) -> list[dict]:
    """Train `model` in place with cross-entropy on data.x_train / data.y_train.

    Returns one {"epoch", "loss", "accuracy"} dict per epoch (test-set figures when the data
    has a test split). Progress is reported every batch as `phase`.
    """
    device = resolve_device(device)
    model.to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = _optimizer(model, config)
    n = data.x_train.shape[0]
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(config, step, total))
    history = []
    step = 0
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        running = 0.0
        for start in range(0, n, config.batch_size):
            idx = order[start:start + config.batch_size]
            xb, yb = data.x_train[idx].to(device), data.y_train[idx].to(device)
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item() * len(idx)
            step += 1
            progress(phase, step / total, f"epoch {epoch + 1}/{config.epochs} loss {loss.item():.3f}")
        record = {"epoch": epoch + 1, "train_loss": running / n}
        if getattr(data, "x_test", None) is not None:
            record.update(evaluate(model, data.x_test, data.y_test, device=device))
        history.append(record)
    if not config.epochs:
        progress(phase, 1.0, "no epochs")
    return history


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
             device: str | torch.device = "auto", batch_size: int = 1024) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of `model` on (x, y), in eval mode."""
    device = resolve_device(device)
    was_training = model.training
    model.eval().to(device)
    correct, loss = 0, 0.0
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        logits = model(xb)
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    n = max(x.shape[0], 1)
    return {"accuracy": correct / n, "loss": loss / n}
