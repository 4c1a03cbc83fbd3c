"""Levenberg–Marquardt refinement of a few transformation parameters per pair.

Refinement mode 'lm' minimises a least-squares dissimilarity (MSE) of the source
sampled at mapped target points,

    f(θ) = mean_i r_i(θ)²,   r_i(θ) = S(φ_θ(x_i)) − T(x_i),

by damped Gauss–Newton steps. The Jacobian is the chain rule
``J_i = ∇S(φ_θ(x_i)) · ∂φ_θ(x_i)/∂θ``: the image gradient at the mapped points (one
backward pass per channel) times the point map's own Jacobian
(``Transformation.map_points_jacobian``: a closed form for the affine). Each pair has its
own damping ``λ`` (Marquardt's scaling by ``diag(JᵀJ)``, so translations and matrix
entries need no common step size) and stops on its own; a step is kept only where it
lowers that pair's ``f``. Tens of iterations reach what hundreds of Adam steps do,
for parameter counts where the ``P × P`` normal equations are trivial (an affine's 6
or 12), hence ``MAX_PARAMS``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Most parameters per pair that 'lm' optimises (an affine has 6 in 2D, 12 in 3D).
MAX_PARAMS = 64
# Damping: start, factors after a kept / refused step, and the value at which a pair
# counts as converged (no step lowers its loss any more).
LAMBDA_START, LAMBDA_DOWN, LAMBDA_UP, LAMBDA_MAX = 1e-3, 1 / 3, 4.0, 1e8


class LevenbergMarquardt:
    """The parameters of every pair [B, *shape] and their damping, updated in place."""

    def __init__(self, params: torch.Tensor):
        self.params = params.detach().clone()
        self.damping = params.new_full((len(params),), LAMBDA_START)

    def minimise(self, mapped: Callable[[torch.Tensor], torch.Tensor],
                 jacobian: Callable[[torch.Tensor], torch.Tensor],
                 residuals: Callable[[torch.Tensor], torch.Tensor], iterations: int,
                 tolerance: float, bar=None) -> int:
        """Run up to ``iterations`` steps; the number of steps taken.

        ``mapped(params)`` gives the mapped points [B, N, dim] of every pair,
        ``jacobian(params)`` their derivatives [B, N, dim, P] (params flattened),
        ``residuals(points)`` the residuals there [B, C, N]. A pair stops once a kept
        step lowers its loss by no more than ``tolerance`` times the loss (0: it never
        stops early) or no step lowers it; all stop after ``iterations``.
        """
        shape = self.params.shape
        theta = self.params.reshape(len(self.params), -1)

        def terms(t: torch.Tensor):
            with torch.no_grad():
                points, dpoints = mapped(t.view(shape)), jacobian(t.view(shape))
            return _terms(points, dpoints, residuals)

        loss, r, jac = terms(theta)
        active = torch.ones(len(theta), dtype=torch.bool, device=theta.device)
        damping = self.damping.clone()
        taken = 0
        for _ in range(iterations):
            if not bool(active.any()):
                break
            taken += 1
            step = _step(jac, r, damping) * active[:, None]
            new_loss, new_r, new_jac = terms(theta + step)
            kept = active & (new_loss < loss)
            gain = loss - new_loss
            k = kept[:, None]
            theta = torch.where(k, theta + step, theta)
            r = torch.where(k, new_r, r)
            jac = torch.where(k[:, :, None], new_jac, jac)
            small = kept & (gain <= tolerance * loss)
            loss = torch.where(kept, new_loss, loss)
            damping = torch.where(kept, damping * LAMBDA_DOWN, damping * LAMBDA_UP)
            active = active & ~small & (damping < LAMBDA_MAX)
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.update(iterations - taken)
        self.params = theta.view(shape).detach()
        # the next level starts from a moderate damping, not from where this one ended
        self.damping = damping.clamp(LAMBDA_START * 1e-3, LAMBDA_START)
        return taken


def _terms(points: torch.Tensor, dpoints: torch.Tensor,
           residuals: Callable[[torch.Tensor], torch.Tensor]
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss [B], residuals [B, M] and their Jacobian [B, M, P] for mapped ``points``
    [B, N, dim] with derivatives ``dpoints`` [B, N, dim, P]."""
    with torch.enable_grad():
        q = points.detach().requires_grad_(True)
        res = residuals(q)  # [B, C, N]
        grads = [torch.autograd.grad(res[:, c].sum(), q, retain_graph=c + 1 < res.shape[1])[0]
                 for c in range(res.shape[1])]  # each [B, N, dim]: one point per residual
    res = res.detach()
    grads = torch.stack(grads, 1)  # [B, C, N, dim]
    jac = (grads[..., None] * dpoints[:, None]).sum(3)  # [B, C, N, P]
    r = res.flatten(1)
    return r.pow(2).mean(1), r, jac.flatten(1, 2)


def _step(jac: torch.Tensor, r: torch.Tensor, damping: torch.Tensor) -> torch.Tensor:
    """The damped Gauss–Newton step of every pair [B, P]:
    ``-(JᵀJ + λ diag(JᵀJ))⁻¹ Jᵀr`` (a tiny ridge keeps unused parameters finite)."""
    a = jac.transpose(1, 2) @ jac
    g = (jac.transpose(1, 2) @ r[:, :, None])[..., 0]
    diag = torch.diagonal(a, dim1=1, dim2=2)
    ridge = 1e-9 * diag.mean(1, keepdim=True).clamp_min(1e-30)
    a = a + torch.diag_embed(damping[:, None] * diag + ridge)
    return -torch.linalg.solve(a, g)
