"""Loss-reduction MI estimate with small MLP reconstructors, trained as one batched model.

I(X; Y) ~ L(f_empty, Y) - L(f(X), Y) (Covert et al. 2020): the drop in validation MSE that a
predictor of Y gains from X. Every comparison the engine makes shares L(f_empty), so the
engine compares validation losses directly. B independent MLPs (the R repeats, the
single-unit predictors, a block of candidates x R) train at once through `torch.baddbmm`;
Adam is element-wise, so one optimizer over the stacked weights equals B independent ones.

    mlps = BatchedMLP.create(n_models=5, d_in=16, hidden=32, d_out=10, generator=g)
    val_loss = fit(mlps, split, epochs=100, patience=3, lr=3e-3, batch_size=256, generator=g)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Split:
    """Standardised calibration activations split into train and validation rows.

    x_*: (n, d_in); y_*: (n, d_out). loss: "mse" (y standardised) or "ce" (y holds class
    probabilities, the models output logits: cross-entropy).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    loss: str = "mse"


class BatchedMLP(nn.Module):
    """B independent MLPs d_in -> hidden (ReLU) -> d_out.

    forward(x): x is (B, n, d_in) or (n, d_in) shared by all models; returns (B, n, d_out).
    """

    def __init__(self, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                 linear: bool = False):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(w1), nn.Parameter(b1)
        self.w2, self.b2 = nn.Parameter(w2), nn.Parameter(b2)
        self.linear = linear  # no ReLU: a linear reconstructor (two linear maps)

    @classmethod
    def create(cls, n_models: int, d_in: int, hidden: int, d_out: int, *,
               generator: torch.Generator, device: torch.device | str = "cpu",
               linear: bool = False) -> BatchedMLP:
        """Kaiming-uniform init like nn.Linear, drawn from `generator` (on the CPU, then moved)."""
        def uniform(shape, fan_in):
            bound = 1.0 / math.sqrt(fan_in)
            return (torch.rand(shape, generator=generator) * 2 - 1).mul_(bound).to(device)
        return cls(uniform((n_models, d_in, hidden), d_in), uniform((n_models, 1, hidden), d_in),
                   uniform((n_models, hidden, d_out), hidden), uniform((n_models, 1, d_out), hidden),
                   linear=linear)

    @property
    def n_models(self) -> int:
        return self.w1.shape[0]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask (B, d_in) of 0/1 hides input columns per model (applied to the weights)."""
        return _forward([self.w1, self.b1, self.w2, self.b2], x, mask, self.linear)

    def tiled(self, times: int) -> BatchedMLP:
        """A copy with every model repeated `times` times, consecutively:
        model index b*R + r of the copy is model r of `self` (R = self.n_models) for block b."""
        return BatchedMLP(*(p.detach().repeat(times, 1, 1).clone() for p in self.parameters()),
                          linear=self.linear)

    def pick(self, index: int) -> BatchedMLP:
        """A copy of model `index` alone."""
        return BatchedMLP(*(p.detach()[index:index + 1].clone() for p in self.parameters()),
                          linear=self.linear)

    def copy(self) -> BatchedMLP:
        return self.tiled(1)


def per_model_loss(pred: torch.Tensor, target: torch.Tensor, loss: str = "mse") -> torch.Tensor:
    """Loss per model: pred (B, n, d), target (n, d) or (B, n, d) -> (B,). "mse": mean squared
    error; "ce": cross-entropy of softmax(pred) against target probabilities, mean over rows."""
    if loss == "ce":
        return -(target * torch.log_softmax(pred, dim=-1)).sum(-1).mean(-1)
    return (pred - target).pow(2).mean(dim=(1, 2))


@torch.no_grad()
def evaluate(mlps: BatchedMLP, x: torch.Tensor, y: torch.Tensor,
             mask: torch.Tensor | None = None, chunk: int = 4096, loss: str = "mse"
             ) -> torch.Tensor:
    """Validation loss per model (B,); `mask` (B, d_in) zeroes input columns per model."""
    total = torch.zeros(mlps.n_models, device=x.device)
    for start in range(0, x.shape[0], chunk):
        xb, yb = x[start:start + chunk], y[start:start + chunk]
        total += per_model_loss(mlps(xb, mask), yb, loss) * xb.shape[0]
    return total / x.shape[0]


def epoch_orders(n: int, epochs: int, seed: int, device: torch.device | str = "cpu"
                 ) -> list[torch.Tensor]:
    """The minibatch order of each epoch, fixed by `seed` alone.

    Every fit that is given the same orders sees the same minibatches, however many models it
    trains at once and wherever it sits in a run: the sequential and the batched paths then
    give each model the same trajectory (up to float rounding), and a masked fine-tune and its
    control differ by the mask only.
    """
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g).to(device) for _ in range(epochs)]


def fit(mlps: BatchedMLP, split: Split, *, epochs: int, patience: int, lr: float,
        batch_size: int, generator: torch.Generator | None = None,
        mask: torch.Tensor | None = None, x_per_model: bool = False,
        orders: list[torch.Tensor] | None = None, min_delta: float = 0.0) -> torch.Tensor:
    """Train every model with Adam on the split's loss (MSE or cross-entropy), early stopping
    each on its own validation loss.

    Each model stops on its own: once it has waited `patience` epochs without improving it
    takes no more optimiser steps and its best loss no longer changes, exactly as if it had
    been fitted alone (stopped models leave the batch, so the batch also gets cheaper).
    min_delta: an epoch counts as an improvement for patience only when it lowers the model's
    loss by more than this fraction below its last counted improvement (0: any decrease);
    the best weights still follow every decrease.
    mask: (B, d_in) of 0/1, the input columns each model may see (masked columns are set to 0,
    the mean of a standardised column). x_per_model: split.x_* are (B, n, d_in), one input per
    model (the single-unit predictors). orders: the minibatch order per epoch (see
    `epoch_orders`; at least `epochs` of them); else drawn from `generator`. On return every
    model holds its best-validation weights; returns those validation losses, (B,).
    """
    n = split.x_train.shape[-2]
    device = split.x_train.device
    params = [p.detach().clone().requires_grad_(True) for p in mlps.parameters()]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    best_params = [p.detach().clone() for p in params]
    best = evaluate_split(mlps, split, mask, x_per_model)
    anchor = best.clone()  # loss at each model's last counted improvement
    alive = torch.arange(mlps.n_models, device=device)  # global index of each model still training
    waited = torch.zeros(mlps.n_models, dtype=torch.long, device=device)
    x_train, x_val, m = split.x_train, split.x_val, mask
    beta1, beta2, eps, step = 0.9, 0.999, 1e-8, 0
    for epoch in range(epochs):
        if orders is not None:
            order = orders[epoch]
        else:
            order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            xb = x_train[:, idx] if x_per_model else x_train[idx]
            pred = _forward(params, xb, m, mlps.linear)
            loss = per_model_loss(pred, split.y_train[idx], split.loss).sum()
            grads = torch.autograd.grad(loss, params)
            step += 1
            # Adam (torch.optim.Adam's update, written out so that a subset of models can
            # leave the batch with its moments).
            correction1, correction2 = 1 - beta1 ** step, 1 - beta2 ** step
            with torch.no_grad():  # the same element-wise ops, one call for all 4 tensors
                first, second = [m1 for m1, _ in moments], [m2 for _, m2 in moments]
                torch._foreach_mul_(first, beta1)
                torch._foreach_add_(first, grads, alpha=1 - beta1)
                torch._foreach_mul_(second, beta2)
                torch._foreach_addcmul_(second, grads, grads, value=1 - beta2)
                denom = torch._foreach_div(second, correction2)
                torch._foreach_sqrt_(denom)
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(params, first, denom, value=-lr / correction1)
        with torch.no_grad():
            if x_per_model:
                val = per_model_loss(_forward(params, x_val, None, mlps.linear), split.y_val,
                                     split.loss)
            else:
                val = _evaluate_params(params, x_val, split.y_val, m, loss=split.loss,
                                       linear=mlps.linear)
            improved = val < best[alive]
            best[alive] = torch.where(improved, val, best[alive])
            counted = val < anchor[alive] * (1 - min_delta) if min_delta > 0 else improved
            anchor[alive] = torch.where(counted, val, anchor[alive])
            waited[alive] = torch.where(counted, 0, waited[alive] + 1)
            if bool(improved.any()):
                rows = alive[improved]
                for saved, p in zip(best_params, params):
                    saved[rows] = p[improved]
            still = waited[alive] < patience
            if not bool(still.any()):
                break
            if not bool(still.all()):  # stopped models leave the batch: no more steps for them
                alive = alive[still]
                params = [p.detach()[still].clone().requires_grad_(True) for p in params]
                moments = [(m1[still].clone(), m2[still].clone()) for m1, m2 in moments]
                if x_per_model:
                    x_train, x_val = x_train[still], x_val[still]
                if m is not None:
                    m = m[still]
    with torch.no_grad():
        for saved, p in zip(best_params, mlps.parameters()):
            p.copy_(saved)
    return best


def _forward(params: list[torch.Tensor], x: torch.Tensor,
             mask: torch.Tensor | None = None, linear: bool = False) -> torch.Tensor:
    """BatchedMLP.forward on explicit (w1, b1, w2, b2)."""
    w1, b1, w2, b2 = params
    if mask is not None:
        w1 = w1 * mask.unsqueeze(-1)
    if x.dim() == 2:
        # Input shared by every model: one (n, d_in) x (d_in, B*hidden) product, not B small ones.
        n_models, d_in, width = w1.shape
        hidden = x @ w1.transpose(0, 1).reshape(d_in, n_models * width)
        hidden = hidden.view(x.shape[0], n_models, width).transpose(0, 1) + b1
    else:
        hidden = torch.baddbmm(b1, x, w1)
    return torch.baddbmm(b2, hidden if linear else torch.relu(hidden), w2)


@torch.no_grad()
def _evaluate_params(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                     mask: torch.Tensor | None, chunk: int = 4096, loss: str = "mse",
                     linear: bool = False) -> torch.Tensor:
    total = torch.zeros(params[0].shape[0], device=x.device)
    for start in range(0, x.shape[0], chunk):
        xb, yb = x[start:start + chunk], y[start:start + chunk]
        total += per_model_loss(_forward(params, xb, mask, linear), yb, loss) * xb.shape[0]
    return total / x.shape[0]


def evaluate_split(mlps: BatchedMLP, split: Split, mask: torch.Tensor | None = None,
                   x_per_model: bool = False) -> torch.Tensor:
    if x_per_model:
        with torch.no_grad():
            return per_model_loss(mlps(split.x_val), split.y_val, split.loss)
    return evaluate(mlps, split.x_val, split.y_val, mask, loss=split.loss)


def hidden_width(d_out: int, cap: int) -> int:
    """The spec's reconstructor width: 2 * d_out, capped."""
    return max(1, min(2 * d_out, cap))


def estimate_loss_reduction(x: torch.Tensor, y: torch.Tensor, *, repeats: int = 3,
                            epochs: int = 100, patience: int = 5, hidden_cap: int = 256,
                            lr: float = 3e-3, batch_size: int = 256, val_fraction: float = 0.2,
                            seed: int = 0) -> float:
    """Loss-reduction estimate of I(X; Y) in units of standardised MSE.

    x: (n, d_in), y: (n, d_out), both standardised by the caller. Returns
    L_empty - mean_r L_r on the validation rows, where L_empty is the constant predictor's loss
    (the training mean). Near 0 when y does not depend on x, positive when it does.
    """
    generator = torch.Generator().manual_seed(seed)
    split = split_rows(x, y, val_fraction, generator)
    mlps = BatchedMLP.create(repeats, x.shape[1], hidden_width(y.shape[1], hidden_cap), y.shape[1],
                             generator=generator, device=x.device)
    losses = fit(mlps, split, epochs=epochs, patience=patience, lr=lr, batch_size=batch_size,
                 generator=generator)
    return float(empty_loss(split) - losses.mean())


def empty_loss(split: Split) -> float:
    """Validation loss of the constant predictor (the training mean of y)."""
    mean = split.y_train.mean(0)
    if split.loss == "ce":  # the mean class probabilities, predicted for every row
        return float(-(split.y_val * mean.clamp_min(1e-12).log()).sum(-1).mean())
    return float((split.y_val - mean).pow(2).mean())


def split_rows(x: torch.Tensor, y: torch.Tensor, val_fraction: float,
               generator: torch.Generator, loss: str = "mse") -> Split:
    """Random train/validation split of rows (seeded)."""
    n = x.shape[0]
    order = torch.randperm(n, generator=generator).to(x.device)
    n_val = max(1, int(round(n * val_fraction)))
    val, train = order[:n_val], order[n_val:]
    return Split(x[train], y[train], x[val], y[val], loss)


def standardise(a: torch.Tensor, std_floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-standardise `a` (n, d) with each std floored at std_floor x the median std.

    The floor keeps near-dead units (a ReLU that fires on 1 sample in 5,000) from becoming huge
    outliers. Returns (standardised, constant) where `constant` (d,) marks exactly-constant
    columns (they become all-zero).
    """
    mean, std = a.mean(0), a.std(0)
    constant = std == 0
    live = std[~constant]
    floor = std_floor * live.median() if live.numel() else torch.tensor(1.0)
    scale = torch.where(constant, torch.ones_like(std), std.clamp_min(float(floor)))
    return (a - mean) / scale, constant


class Compensator:
    """Closed-form compensation of masked inputs in a reconstructor's first layer.

    Masking columns S of x removes x_S @ W1[S] from the first hidden layer's pre-activation.
    Least squares on the training rows re-expresses x_S through the kept columns K,
    x_S ~ x_K @ A + a0, so W1[K] += A @ W1[S] and b1 += a0 @ W1[S] keep the pre-activation (the
    refit's algebra, inside the estimator). An exact or scaled copy, or a sum of kept units, is
    then compensated exactly and its masked loss starts at the unmasked one; an informative unit
    is not, and starts higher. A small ridge (`ridge` x the mean variance) keeps A defined when
    the kept columns are collinear (both copies of a pair kept).

        comp = Compensator(split.x_train)
        start = comp.apply(models, removed=[3, 7])   # a compensated copy of `models`
    """

    def __init__(self, x_train: torch.Tensor, ridge: float = 1e-4):
        self.mean = x_train.mean(0)
        centred = x_train - self.mean
        self.cov = centred.T @ centred / max(1, x_train.shape[0] - 1)
        self.ridge = ridge * float(self.cov.diagonal().mean().clamp_min(1e-12))

    def coefficients(self, removed: list[int]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kept K, removed S, A (|K|, |S|), a0 (|S|,)) for the removal set `removed`; K and S
        are sorted index tensors (A's rows and columns follow them)."""
        d = self.cov.shape[0]
        drop = torch.zeros(d, dtype=torch.bool, device=self.cov.device)
        drop[removed] = True
        kept, gone = torch.nonzero(~drop).flatten(), torch.nonzero(drop).flatten()
        gram = self.cov[kept][:, kept] + self.ridge * torch.eye(len(kept), device=self.cov.device)
        a = torch.linalg.solve(gram, self.cov[kept][:, gone])
        a0 = self.mean[gone] - self.mean[kept] @ a
        return kept, gone, a, a0

    def apply(self, mlps: BatchedMLP, removed_sets: list[list[int]]) -> BatchedMLP:
        """A copy of `mlps` (len(removed_sets) x R models, block b = models b*R..b*R+R-1) with
        each block's first layer compensated for its removal set."""
        out = mlps.copy()
        per_block = mlps.n_models // len(removed_sets)
        with torch.no_grad():
            for b, removed in enumerate(removed_sets):
                if not removed:
                    continue
                kept, gone, a, a0 = self.coefficients(removed)
                rows = slice(b * per_block, (b + 1) * per_block)
                w_gone = out.w1[rows][:, gone]                    # (R, |S|, H)
                out.w1[rows, kept] += torch.matmul(a, w_gone)     # (R, |K|, H)
                out.b1[rows] += torch.matmul(a0, w_gone).unsqueeze(1)
                out.w1[rows, gone] = 0
        return out
