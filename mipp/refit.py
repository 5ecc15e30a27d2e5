"""Least-squares refit of the layers that lost inputs (ThiNet-style reconstruction).

MIPP keeps the information, not the current function: right after removal the next layer
still expects the removed inputs. The reconstructors already showed the next layer can be
rebuilt from the kept units, so each consumer's incoming weights are refit so that its
pre-activations (computed from the pruned network's own, already refit, upstream) match the
dense network's on the calibration set.

    refit_consumers(pruned, dense, names=["conv2", "fc1"], keep=keep, x=calibration_x)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from mipp.activations import capture_io

MAX_ROWS = 40_000  # rows of the normal equations (conv positions are subsampled)


def _design(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Rows of the linear map a module applies: (rows, in_features) without the bias column."""
    if isinstance(module, nn.Linear):
        return inputs.reshape(-1, inputs.shape[-1])
    patches = F.unfold(inputs, module.kernel_size, dilation=module.dilation,
                       padding=module.padding, stride=module.stride)  # (n, C*k*k, L)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _targets(module: nn.Module, outputs: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return outputs.reshape(-1, outputs.shape[-1])
    return outputs.flatten(2).transpose(1, 2).reshape(-1, outputs.shape[1])


def solve_ridge(a: torch.Tensor, z: torch.Tensor, bias: bool, ridge: float = 1e-4) -> torch.Tensor:
    """argmin_W ||[a, 1] W - z||^2 + ridge * tr(A^T A)/d ||W||^2, in float64. (d(+1), out)."""
    if bias:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
    a, z = a.double(), z.double()
    gram = a.T @ a
    damping = ridge * gram.diagonal().mean().clamp_min(1e-12)
    gram += damping * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, a.T @ z)


def refit_consumers(pruned: nn.Module, dense: nn.Module, names: Sequence[str],
                    keep: Mapping[str, Sequence[int]], owner: Mapping[str, str],
                    x: torch.Tensor, *, device: torch.device | str = "cpu",
                    seed: int = 0) -> list[str]:
    """Refit, in the given (forward) order, each named Conv2d/Linear of `pruned` in place.

    keep / owner map a group to its kept units and a module to the group its outputs belong
    to, so that a refit layer that also lost outputs matches only its kept outputs. Grouped
    convolutions are skipped. Returns the names refit.
    """
    generator = torch.Generator().manual_seed(seed)
    pruned_modules, done = dict(pruned.named_modules()), []
    for name in names:
        module = pruned_modules[name]
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            continue
        inputs, _ = capture_io(pruned, name, x, device=device)
        _, outputs = capture_io(dense, name, x, device=device)
        if name in owner and owner[name] in keep:
            outputs = outputs[:, list(keep[owner[name]])]
        a, z = _design(module, inputs), _targets(module, outputs)
        if a.shape[0] > MAX_ROWS:
            rows = torch.randperm(a.shape[0], generator=generator)[:MAX_ROWS]
            a, z = a[rows], z[rows]
        solution = solve_ridge(a, z, bias=module.bias is not None)
        weight = solution[:a.shape[1]].T.to(module.weight.dtype)
        with torch.no_grad():
            module.weight.copy_(weight.reshape(module.weight.shape))
            if module.bias is not None:
                module.bias.copy_(solution[a.shape[1]].to(module.bias.dtype))
        done.append(name)
    return done
