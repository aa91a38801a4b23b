"""An independent reference for the matching gradients: plain torch.autograd, no torch.func.

``unrolled_reference`` builds the whole T-step student loop in one autograd graph
(``create_graph=True``) and differentiates L = ||theta_T - target||^2 / D. With
``first_order=True`` each g_i is evaluated at a *detached* copy of theta_i, so the only path from
X_i to theta_T is theta_T = theta_0 - beta * sum_i g(stopgrad(theta_i); X_i): the first-order
truncation (proofs/b_two_pass.md, Eq. B3) that TESLA's two-pass method computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call


def unrolled_reference(model, start, target, images, labels, beta, batches, augment=None,
                       first_order=False):
    x_all = images.detach().clone().requires_grad_(True)
    soft = labels.is_floating_point()
    y_all = labels.detach().clone().requires_grad_(soft)
    beta = torch.as_tensor(beta, dtype=images.dtype).detach().clone().requires_grad_(True)
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in start.items()}
    for step, index in enumerate(batches):
        x = x_all[index]
        if augment is not None:
            x = augment(x, step)
        at = {k: v.detach().requires_grad_(True) for k, v in theta.items()} if first_order else theta
        logits = functional_call(model, at, (x,))
        y = y_all[index]
        loss = F.cross_entropy(logits, F.softmax(y, -1) if soft else y)
        grads = torch.autograd.grad(loss, list(at.values()), create_graph=True)
        theta = {k: theta[k] - beta * g for k, g in zip(at, grads)}
    denom = sum(((start[k] - target[k]) ** 2).sum() for k in start)
    loss = sum(((theta[k] - target[k]) ** 2).sum() for k in theta) / denom
    wrt = [x_all, beta] + ([y_all] if soft else [])
    grads = torch.autograd.grad(loss, wrt)
    return loss.detach(), grads[0], (grads[2] if soft else None), grads[1]
