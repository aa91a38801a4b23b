"""Executable checks of the claims in proofs/ (equations (A1)-(D6)).

Independent of the library on purpose: it imports only torch, sympy and hypothesis, so it checks
the mathematics, not our implementation of it. Four kinds of check:

* exact, sympy: the expansion (A) with symbolic vectors; the adjoint recursion (C), the
  two-pass / first-order formula (B) and its truncation error on a polynomial toy problem unrolled
  symbolically for T = 2 (polynomials over QQ, so equality is decided exactly);
* numeric, float64 torch.autograd on a tiny tanh MLP with soft labels, Hypothesis drawing T, beta,
  seed and whether all steps share one image batch: the same identities to rtol 1e-10 (they hold to
  about 1e-13); a difference of two nearly equal gradients (B4, B5) to 1e-9 of that difference;
* memory (D): bytes held by autograd's saved tensors, counted with saved_tensors_hooks, as a
  function of T for each method; the reference ConvNet's sizes;
* the public TESLA code's image gradient as it executes (A), on the same MLP.

Every check also asserts that a wrong variant (a coefficient without its 2, a flipped sign, a
dropped or truncated term, a product in the wrong order, a linearised bound, a non-reproducible
recomputation, a wrong size) is rejected by the same check, so none passes vacuously.

Run:  python -m pytest tests/test_proofs.py      (about 10 s on one core, imports aside)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import sympy as sp
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sympy import QQ
from sympy.polys.rings import ring
from torch import Tensor, nn

# --------------------------------------------------------------------------------------------
# (A) the expansion of the squared trajectory error, symbolic vectors in R^3, T = 3
# --------------------------------------------------------------------------------------------

N_DIM, T_SYM = 3, 3


def _vec(name: str, n: int = N_DIM) -> sp.Matrix:
    return sp.Matrix(sp.symbols(f"{name}_0:{n}"))


def _dot(a: sp.Matrix, b: sp.Matrix) -> sp.Expr:
    return (a.T * b)[0, 0]


def test_expansion_identity_A1_A2() -> None:
    """(A2): ||theta_T - theta*||^2
    = ||theta_0 - theta*||^2 - 2 beta (theta_0 - theta*)^T G + beta^2 ||G||^2."""
    beta = sp.Symbol("beta")
    theta0, target = _vec("theta0"), _vec("target")
    gs = [_vec(f"g{i}") for i in range(T_SYM)]
    G = sum(gs, sp.zeros(N_DIM, 1))
    theta = theta0
    for g in gs:  # (A1): T SGD steps
        theta = theta - beta * g
    lhs = _dot(theta - target, theta - target)
    d0 = theta0 - target
    correct = _dot(d0, d0) - 2 * beta * _dot(d0, G) + beta**2 * _dot(G, G)
    assert sp.expand(lhs - correct) == 0
    # negative: the paper's printed linear coefficient (beta instead of 2 beta) is wrong,
    # and the error is exactly the missing -beta (theta_0 - theta*)^T G.
    paper = _dot(d0, d0) - beta * _dot(d0, G) + beta**2 * _dot(G, G)
    assert sp.expand(lhs - paper) != 0
    assert sp.expand(lhs - paper + beta * _dot(d0, G)) == 0


def test_expansion_cross_term_derivative_A3_A4() -> None:
    """(A3)/(A4): d/dX_i beta^2||G||^2 = 2 beta^2 G^T J_i
    = beta^2 d||g_i||^2/dX_i + 2 beta^2 (G - g_i)^T J_i.

    g_i(X_i) are arbitrary smooth functions (sympy Functions) of a 2-dim X_i; the other g_j are
    held fixed.
    """
    beta = sp.Symbol("beta")
    xs = [sp.symbols(f"x{i}_0:2") for i in range(T_SYM)]
    gs = [sp.Matrix([sp.Function(f"g{i}_{c}")(*xs[i]) for c in range(N_DIM)]) for i in range(T_SYM)]
    G = sum(gs, sp.zeros(N_DIM, 1))
    quad = beta**2 * _dot(G, G)
    for i in range(T_SYM):
        J = gs[i].jacobian(sp.Matrix(xs[i]))  # (N_DIM, 2) = d g_i / d X_i
        lhs = sp.Matrix([[sp.diff(quad, x) for x in xs[i]]])
        rest = G - gs[i]
        self_term = sp.Matrix([[beta**2 * sp.diff(_dot(gs[i], gs[i]), x) for x in xs[i]]])
        assert sp.expand(lhs - 2 * beta**2 * G.T * J) == sp.zeros(1, 2)  # (A3)
        assert sp.expand(lhs - self_term - 2 * beta**2 * rest.T * J) == sp.zeros(1, 2)  # (A4)
        # negative: the printed cross term without the 2 is wrong
        assert sp.expand(lhs - self_term - beta**2 * rest.T * J) != sp.zeros(1, 2)


def test_expansion_total_gives_two_pass_vector_A5() -> None:
    """(A5): d/dX_i of (A2) at fixed theta_i is -2 beta (theta_T - theta*)^T J_i = D v^T J_i."""
    beta = sp.Symbol("beta")
    theta0, target = _vec("theta0"), _vec("target")
    xs = [sp.symbols(f"x{i}_0:2") for i in range(T_SYM)]
    gs = [sp.Matrix([sp.Function(f"g{i}_{c}")(*xs[i]) for c in range(N_DIM)]) for i in range(T_SYM)]
    G = sum(gs, sp.zeros(N_DIM, 1))
    d0 = theta0 - target
    expansion = _dot(d0, d0) - 2 * beta * _dot(d0, G) + beta**2 * _dot(G, G)
    err_T = d0 - beta * G  # theta_T - theta*
    for i in range(T_SYM):
        J = gs[i].jacobian(sp.Matrix(xs[i]))
        lhs = sp.Matrix([[sp.diff(expansion, x) for x in xs[i]]])
        assert sp.expand(lhs - (-2 * beta * err_T.T * J)) == sp.zeros(1, 2)
        assert sp.expand(lhs - (-beta * err_T.T * J)) != sp.zeros(1, 2)  # negative: no factor 2


# --------------------------------------------------------------------------------------------
# (B), (C) exact, on a polynomial toy problem unrolled symbolically for T = 2
#   theta = (w1, w2), scalar image x and label y, l = (w2*w1*x - y)^2 / 2 (a depth-2 linear net:
#   its Hessian depends on theta, so evaluating H at the wrong state would be caught).
#   Everything is a polynomial over QQ; L carries the constant factor 1/D, and every gradient is
#   linear in 1/D, so we compare D times each side: L_D = ||theta_T - theta*||^2, lam_T^D = 2 e.
# --------------------------------------------------------------------------------------------

T_TOY = 2


@dataclass(frozen=True)
class Toy:
    R: object
    beta: object
    xs: list
    ys: list
    thetas: list  # theta_0 .. theta_T as pairs of ring elements
    err: list  # theta_T - theta*
    g: object  # g(theta; x, y) -> pair of ring elements
    H: object  # Hessian at (theta; x, y) -> 2x2
    Jx: object  # d g / d x -> pair
    Jy: object  # d g / d y -> pair
    sg: list  # fresh generators standing for stop_gradient(theta_i)


@pytest.fixture(scope="module")
def toy() -> Toy:
    T = T_TOY
    names = ["w1", "w2", "beta", "t1", "t2"]
    names += [f"x{i}" for i in range(T)] + [f"y{i}" for i in range(T)]
    names += [f"s{i}_{c}" for i in range(T) for c in (1, 2)] + ["a1", "a2", "X", "Y"]
    R, *gens = ring(",".join(names), QQ)
    w1, w2, beta, t1, t2 = gens[:5]
    xs, ys = gens[5 : 5 + T], gens[5 + T : 5 + 2 * T]
    sg = [gens[5 + 2 * T + 2 * i : 7 + 2 * T + 2 * i] for i in range(T)]
    a1, a2, X, Y = gens[-4:]
    loss = QQ(1, 2) * (a2 * a1 * X - Y) ** 2
    g_generic = [loss.diff(a1), loss.diff(a2)]

    def at(p, th, x, y):
        return p.compose([(a1, th[0]), (a2, th[1]), (X, x), (Y, y)])

    def g(th, x, y):
        return [at(p, th, x, y) for p in g_generic]

    def H(th, x, y):
        return [[at(p.diff(a), th, x, y) for a in (a1, a2)] for p in g_generic]

    def Jx(th, x, y):
        return [at(p.diff(X), th, x, y) for p in g_generic]

    def Jy(th, x, y):
        return [at(p.diff(Y), th, x, y) for p in g_generic]

    thetas = [[w1, w2]]
    for i in range(T):  # (A1)
        gi = g(thetas[i], xs[i], ys[i])
        thetas.append([thetas[i][c] - beta * gi[c] for c in range(2)])
    err = [thetas[T][0] - t1, thetas[T][1] - t2]
    return Toy(R, beta, list(xs), list(ys), thetas, err, g, H, Jx, Jy, sg)


def _toy_full(toy: Toy):
    """D * (dL/dx_i, dL/dy_i, dL/dbeta): sympy differentiates the composed polynomial (truth)."""
    LD = toy.err[0] ** 2 + toy.err[1] ** 2
    return [LD.diff(x) for x in toy.xs], [LD.diff(y) for y in toy.ys], LD.diff(toy.beta)


def _toy_adjoint(toy: Toy, hessian_sign: int = -1):
    """(C1)-(C4) with lam scaled by D. hessian_sign=+1 is a deliberately wrong variant."""
    b, T = toy.beta, T_TOY
    lam = [2 * toy.err[0], 2 * toy.err[1]]  # (C1) times D
    dx, dy, dbeta = [None] * T, [None] * T, toy.R(0)
    for i in reversed(range(T)):
        th, x, y = toy.thetas[i], toy.xs[i], toy.ys[i]
        Jx, Jy, H, g = toy.Jx(th, x, y), toy.Jy(th, x, y), toy.H(th, x, y), toy.g(th, x, y)
        dx[i] = -b * (Jx[0] * lam[0] + Jx[1] * lam[1])  # (C2)
        dy[i] = -b * (Jy[0] * lam[0] + Jy[1] * lam[1])
        dbeta = dbeta - (g[0] * lam[0] + g[1] * lam[1])  # (C3)
        lam = [lam[r] + hessian_sign * b * (H[r][0] * lam[0] + H[r][1] * lam[1]) for r in range(2)]
    return dx, dy, dbeta


def test_adjoint_symbolic_equals_full_derivative_C1_C4(toy: Toy) -> None:
    full_x, full_y, full_b = _toy_full(toy)
    dx, dy, db = _toy_adjoint(toy)
    assert dx == full_x and dy == full_y and db == full_b
    wrong_x, _, _ = _toy_adjoint(toy, hessian_sign=+1)  # negative: lam_i = lam + beta H lam
    assert wrong_x[0] != full_x[0]


def test_two_pass_symbolic_equals_stop_gradient_unroll_B1_B3(toy: Toy) -> None:
    """(B1) = (B3): v^T J_i is d/dx_i of L(theta_T^FO), sg(theta_i) being independent symbols."""
    b, T, R = toy.beta, T_TOY, toy.R
    # theta_T^FO = theta_0 - beta sum_i g(sg(theta_i); x_i, y_i)   (B3)
    G_sg = [R(0), R(0)]
    for i in range(T):
        gi = toy.g(toy.sg[i], toy.xs[i], toy.ys[i])
        G_sg = [G_sg[c] + gi[c] for c in range(2)]
    theta_fo = [toy.thetas[0][c] - b * G_sg[c] for c in range(2)]
    target = [toy.thetas[T][c] - toy.err[c] for c in range(2)]
    err_fo = [theta_fo[c] - target[c] for c in range(2)]
    L_fo = err_fo[0] ** 2 + err_fo[1] ** 2
    unstop = [(toy.sg[i][c], toy.thetas[i][c]) for i in range(T) for c in range(2)]
    assert [p.compose(unstop) for p in theta_fo] == toy.thetas[T]  # same forward value
    full_x, full_y, full_b = _toy_full(toy)
    vD = [-2 * b * toy.err[0], -2 * b * toy.err[1]]  # D * v
    for i in range(T):
        th, x, y = toy.thetas[i], toy.xs[i], toy.ys[i]
        Jx, Jy = toy.Jx(th, x, y), toy.Jy(th, x, y)
        assert L_fo.diff(x).compose(unstop) == vD[0] * Jx[0] + vD[1] * Jx[1]  # (B1), images
        assert L_fo.diff(y).compose(unstop) == vD[0] * Jy[0] + vD[1] * Jy[1]  # (B1), labels
    # (B8) TESLA's beta gradient -2 e^T G is the stop-gradient unroll's beta gradient
    gs = [toy.g(toy.thetas[i], toy.xs[i], toy.ys[i]) for i in range(T)]
    G = [sum((gi[c] for gi in gs), R(0)) for c in range(2)]
    tesla_b = -2 * (toy.err[0] * G[0] + toy.err[1] * G[1])
    assert L_fo.diff(b).compose(unstop) == tesla_b
    assert tesla_b != full_b  # negative: it is not the full beta gradient for T >= 2
    # exact at the last batch (empty sum in (B4)); not at batch 0
    J_last = toy.Jx(toy.thetas[T - 1], toy.xs[T - 1], toy.ys[T - 1])
    assert full_x[T - 1] == vD[0] * J_last[0] + vD[1] * J_last[1]
    J_first = toy.Jx(toy.thetas[0], toy.xs[0], toy.ys[0])
    assert full_x[0] != vD[0] * J_first[0] + vD[1] * J_first[1]


def test_two_pass_symbolic_truncation_error_B4_B5(toy: Toy) -> None:
    """(B5), T = 2, i = 0: full - first-order = (2 beta^2/D) (theta_T - theta*)^T H_1 J_0."""
    b, e = toy.beta, toy.err
    full_x, full_y, _ = _toy_full(toy)
    th0, th1 = toy.thetas[0], toy.thetas[1]
    H1 = toy.H(th1, toy.xs[1], toy.ys[1])
    eH1 = [e[0] * H1[0][c] + e[1] * H1[1][c] for c in range(2)]  # (H_1 e)^T, H symmetric
    for J, full in ((toy.Jx, full_x), (toy.Jy, full_y)):
        J0 = J(th0, toy.xs[0], toy.ys[0])
        fo = -2 * b * (e[0] * J0[0] + e[1] * J0[1])
        dropped = 2 * b**2 * (eH1[0] * J0[0] + eH1[1] * J0[1])
        assert full[0] - fo == dropped
        assert dropped != 0  # negative: the first-order gradient really is different
        assert full[0] - fo != dropped * QQ(1, 2)


def test_adjoint_symbolic_beta_forward_sensitivity_B7(toy: Toy) -> None:
    """(B7): s_0 = 0, s_{i+1} = (I - beta H_i) s_i - g_i, dL/dbeta = (2/D) e^T s_T."""
    b, R = toy.beta, toy.R
    s = [R(0), R(0)]
    for i in range(T_TOY):
        th, x, y = toy.thetas[i], toy.xs[i], toy.ys[i]
        H, g = toy.H(th, x, y), toy.g(th, x, y)
        s = [s[r] - b * (H[r][0] * s[0] + H[r][1] * s[1]) - g[r] for r in range(2)]
    assert 2 * (toy.err[0] * s[0] + toy.err[1] * s[1]) == _toy_full(toy)[2]
    s = [R(0), R(0)]  # negative: the same recursion with the wrong sign on H
    for i in range(T_TOY):
        th, x, y = toy.thetas[i], toy.xs[i], toy.ys[i]
        H, g = toy.H(th, x, y), toy.g(th, x, y)
        s = [s[r] + b * (H[r][0] * s[0] + H[r][1] * s[1]) - g[r] for r in range(2)]
    assert 2 * (toy.err[0] * s[0] + toy.err[1] * s[1]) != _toy_full(toy)[2]


# --------------------------------------------------------------------------------------------
# numeric: float64 autograd on a tiny tanh MLP with soft labels
# --------------------------------------------------------------------------------------------

DT = torch.float64  # explicit everywhere: the test sets no global default dtype
D_IN, HIDDEN, K, BATCH = 3, 4, 3, 5
P = D_IN * HIDDEN + HIDDEN + HIDDEN * K + K  # 31 parameters, one flat vector theta


def _logits(theta: Tensor, X: Tensor) -> Tensor:  # (P,), (B, D_IN) -> (B, K)
    o = D_IN * HIDDEN
    W1, b1 = theta[:o].view(HIDDEN, D_IN), theta[o : o + HIDDEN]
    o += HIDDEN
    W2, b2 = theta[o : o + HIDDEN * K].view(K, HIDDEN), theta[o + HIDDEN * K :]
    return torch.tanh(X @ W1.T + b1) @ W2.T + b2


def _inner_loss(theta: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    """l(theta; X, Y): cross-entropy against the soft labels softmax(Y), mean over the batch."""
    return -(torch.softmax(Y, -1) * torch.log_softmax(_logits(theta, X), -1)).sum(-1).mean()


def _g(theta: Tensor, X: Tensor, Y: Tensor, create_graph: bool = False) -> Tensor:
    if not theta.requires_grad:
        theta = theta.detach().requires_grad_()
    return torch.autograd.grad(_inner_loss(theta, X, Y), theta, create_graph=create_graph)[0]


@dataclass(frozen=True)
class Problem:
    theta0: Tensor  # (P,) expert checkpoint theta*_t
    target: Tensor  # (P,) theta*_{t+M}
    X: list  # image batches (B, D_IN); step i uses X[idx[i]]
    Y: list  # label logits (B, K)
    idx: list  # batch used by step i
    beta: float

    @property
    def T(self) -> int:
        return len(self.idx)

    @property
    def D(self) -> float:
        return float((self.theta0 - self.target).pow(2).sum())


def _problem(T: int, beta: float, seed: int, shared: bool) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    n = 1 if shared else T
    theta0 = torch.randn(P, generator=gen, dtype=DT)
    return Problem(
        theta0=theta0,
        target=theta0 + 0.5 * torch.randn(P, generator=gen, dtype=DT),
        X=[torch.randn(BATCH, D_IN, generator=gen, dtype=DT) for _ in range(n)],
        Y=[2 * torch.randn(BATCH, K, generator=gen, dtype=DT) for _ in range(n)],
        idx=[0] * T if shared else list(range(T)),
        beta=beta,
    )


def unrolled(pb: Problem, first_order: bool = False):
    """MTT: autograd through all T steps. first_order=True detaches theta_i inside g_i (B3)."""
    X = [x.clone().requires_grad_() for x in pb.X]
    Y = [y.clone().requires_grad_() for y in pb.Y]
    beta = torch.tensor(pb.beta, dtype=DT, requires_grad=True)
    theta = pb.theta0.clone().requires_grad_()
    for i, j in enumerate(pb.idx):
        s = theta.detach().requires_grad_() if first_order else theta
        theta = theta - beta * _g(s, X[j], Y[j], create_graph=True)
    L = (theta - pb.target).pow(2).sum() / pb.D
    grads = torch.autograd.grad(L, X + Y + [beta])
    return list(grads[: len(X)]), list(grads[len(X) : -1]), grads[-1]


def two_pass(pb: Problem):
    """TESLA (B1): pass 1 sums G without graphs; pass 2 back-propagates v through each g_i."""
    theta, G = pb.theta0, torch.zeros(P, dtype=DT)
    for j in pb.idx:
        g = _g(theta, pb.X[j], pb.Y[j])
        G, theta = G + g, theta - pb.beta * g
    err = theta - pb.target
    v = -2 * pb.beta * err / pb.D
    dX, dY = [torch.zeros_like(x) for x in pb.X], [torch.zeros_like(y) for y in pb.Y]
    theta = pb.theta0
    for j in pb.idx:  # forward again, one step graph alive at a time, theta_i regenerated
        s = theta.detach().requires_grad_()
        Xi, Yi = pb.X[j].clone().requires_grad_(), pb.Y[j].clone().requires_grad_()
        g = _g(s, Xi, Yi, create_graph=True)
        gx, gy = torch.autograd.grad(g, (Xi, Yi), grad_outputs=v)
        dX[j], dY[j] = dX[j] + gx, dY[j] + gy
        theta = theta - pb.beta * g.detach()
        del g, gx, gy
    return dX, dY, -2 / pb.D * (err @ G)  # (B8)


def adjoint(pb: Problem, k: int = 1, hessian_sign: int = -1, recompute_noise: float = 0.0):
    """Exact adjoint (C1)-(C4), one vjp (C6) per step; keeps theta_i every k steps and
    recomputes the segment (C7).

    k=1 stores all states. hessian_sign=+1 (wrong sign in (C4)) and recompute_noise > 0 (a
    recomputation that is not bitwise reproducible) are deliberately wrong, for negative checks.
    """
    beta, T = pb.beta, pb.T

    def step(theta, i):
        return theta - beta * _g(theta, pb.X[pb.idx[i]], pb.Y[pb.idx[i]])

    ckpt, theta = {0: pb.theta0}, pb.theta0
    for i in range(T):
        theta = step(theta, i)
        if (i + 1) % k == 0:
            ckpt[i + 1] = theta
    lam = 2 * (theta - pb.target) / pb.D  # (C1)
    dX, dY = [torch.zeros_like(x) for x in pb.X], [torch.zeros_like(y) for y in pb.Y]
    dbeta, seg = torch.zeros((), dtype=DT), {}
    for i in reversed(range(T)):
        if i not in seg:  # recompute the segment [c, i] from its checkpoint
            c = (i // k) * k
            seg = {c: ckpt[c]}
            for m in range(c, i):
                seg[m + 1] = step(seg[m], m) * (1 + recompute_noise)
        j = pb.idx[i]
        s = seg.pop(i).detach().requires_grad_()
        Xi, Yi = pb.X[j].clone().requires_grad_(), pb.Y[j].clone().requires_grad_()
        g = _g(s, Xi, Yi, create_graph=True)
        # one vjp with cotangent -beta*lam returns (-beta H lam, -beta Jx^T lam, -beta Jy^T lam)
        h, gx, gy = torch.autograd.grad(g, (s, Xi, Yi), grad_outputs=-beta * lam)
        dX[j], dY[j] = dX[j] + gx, dY[j] + gy  # (C2)
        dbeta = dbeta - g.detach() @ lam  # (C3)
        lam = lam + h if hessian_sign < 0 else lam - h  # (C4)
        del g, h, gx, gy
    return dX, dY, dbeta


def _flat(res) -> Tensor:
    dX, dY, db = res
    return torch.cat([t.reshape(-1) for t in dX + dY] + [db.reshape(1)])


RTOL = 1e-10  # float64 identities: measured at most 6e-14 relative over 300 random problems


def _close(a: Tensor, b: Tensor, rtol: float = RTOL) -> bool:
    return float((a - b).norm()) <= rtol * float(b.norm()) + 1e-300


problems = st.builds(
    _problem,
    T=st.integers(1, 5),
    beta=st.sampled_from([1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]),
    seed=st.integers(0, 2**31 - 1),
    shared=st.booleans(),
)


@settings(max_examples=20, deadline=None)
@given(pb=problems)
def test_adjoint_equals_unrolled_numeric_C5_C6(pb: Problem) -> None:
    full = _flat(unrolled(pb))
    assert _close(_flat(adjoint(pb)), full)
    if pb.T >= 2:  # negative: a sign error in (C4) is caught
        assert not _close(_flat(adjoint(pb, hessian_sign=+1)), full, rtol=1e-6)


@settings(max_examples=20, deadline=None)
@given(pb=problems)
def test_two_pass_equals_first_order_unrolled_numeric_B1_B3(pb: Problem) -> None:
    tp = _flat(two_pass(pb))
    assert _close(tp, _flat(unrolled(pb, first_order=True)))
    full = _flat(unrolled(pb))
    if pb.T == 1:  # (B6) with empty sums: every method agrees at one step
        assert _close(tp, full) and _close(_flat(adjoint(pb)), full)
    else:  # negative: two-pass is not the full gradient once T >= 2
        assert not _close(tp, full, rtol=1e-6)


@settings(max_examples=10, deadline=None)
@given(pb=problems, data=st.data())
def test_adjoint_checkpointed_is_bitwise_equal_C7(pb: Problem, data) -> None:
    k = data.draw(st.integers(1, pb.T))
    ref = _flat(adjoint(pb, k=1))
    assert torch.equal(_flat(adjoint(pb, k=k)), ref)
    if k >= 2:  # negative: a recomputation off by a few ulps is no longer bitwise equal
        noisy = _flat(adjoint(pb, k=k, recompute_noise=1e-15))
        assert not torch.equal(noisy, ref) and _close(noisy, ref, rtol=1e-9)


def _jac_theta(theta: Tensor, X: Tensor, Y: Tensor) -> Tensor:  # H: (P, P)
    return torch.autograd.functional.jacobian(
        lambda t: _g(t, X, Y, create_graph=True), theta, vectorize=True
    )


def _jac_X(theta: Tensor, X: Tensor, Y: Tensor) -> Tensor:  # J_i: (P, B*D_IN)
    J = torch.autograd.functional.jacobian(
        lambda x: _g(theta, x, Y, create_graph=True), X, vectorize=True
    )
    return J.reshape(P, -1)


def _b2_dtheta(Hs: list, J: Tensor, beta: float, i: int, T: int) -> list:
    """dtheta_k/dX_i for k = i+1..T by the recursion behind (B2): dtheta_{i+1} = -beta J_i,
    dtheta_{k+1} = (I - beta H_k) dtheta_k. Entries k <= i are None."""
    eye = torch.eye(J.shape[0], dtype=DT)
    dtheta = [None] * (T + 1)
    dtheta[i + 1] = -beta * J
    for m in range(i + 1, T):
        dtheta[m + 1] = (eye - beta * Hs[m]) @ dtheta[m]
    return dtheta


def _b4_dropped(Hs: list, dtheta: list, e: Tensor, beta: float, D: float, i: int, T: int) -> Tensor:
    """(B4): what the two-pass gradient drops, (2/D) e^T (-beta sum_{k>i} H_k dtheta_k/dX_i)."""
    zero = torch.zeros(dtheta[i + 1].shape[1], dtype=DT)
    return sum((2 / D * e @ (-beta * Hs[m] @ dtheta[m]) for m in range(i + 1, T)), zero)


def _b6_bound(beta: float, D: float, e: Tensor, J: Tensor, later_h: list) -> float:
    """(B6): (2 beta / D) ||e|| ||J_i||_2 (prod_{k>i} (1 + beta h_k) - 1), h_k = ||H_k||_2."""
    scale = (2 * beta / D) * float(e.norm()) * float(torch.linalg.matrix_norm(J, 2))
    return scale * (math.prod(1 + beta * h for h in later_h) - 1)


def _within(error: Tensor, bound: float, slack: float = 0.0) -> bool:
    """The (B6) check: ||error|| <= bound, up to rounding."""
    return float(error.norm()) <= bound * (1 + 1e-9) + slack


@settings(max_examples=10, deadline=None)
@given(pb=problems)
@example(pb=_problem(4, 0.1, seed=4, shared=False))  # T - 1 - i >= 2 occurs in every run
def test_two_pass_dropped_hessian_terms_B2_B4_B6(pb: Problem) -> None:
    """Explicit matrices: (B2) product formula, (B4) exact dropped terms, (B6) the error bound."""
    thetas = [pb.theta0]
    for j in pb.idx:
        thetas.append(thetas[-1] - pb.beta * _g(thetas[-1], pb.X[j], pb.Y[j]))
    T, beta, D, e = pb.T, pb.beta, pb.D, thetas[-1] - pb.target
    Hs = [_jac_theta(thetas[i], pb.X[j], pb.Y[j]) for i, j in enumerate(pb.idx)]
    Js = [_jac_X(thetas[i], pb.X[j], pb.Y[j]) for i, j in enumerate(pb.idx)]
    eye = torch.eye(P, dtype=DT)
    full_X, _, _ = unrolled(pb)
    fo_X, _, _ = unrolled(pb, first_order=True)
    full_per_step = []
    for i in range(T):
        dtheta = _b2_dtheta(Hs, Js[i], beta, i, T)  # dtheta_k / dX_i, (P, B*D_IN)
        prod = eye
        for m in range(i + 1, T):
            prod = (eye - beta * Hs[m]) @ prod  # prod_{k=T-1}^{i+1}, latest factor on the left
        assert torch.allclose(dtheta[T], -beta * prod @ Js[i], rtol=1e-10, atol=1e-14)  # (B2)
        if T - 1 - i >= 2:  # negative: the product in the wrong order (H_k do not commute)
            wrong = eye
            for m in range(i + 1, T):
                wrong = wrong @ (eye - beta * Hs[m])
            assert not torch.allclose(dtheta[T], -beta * wrong @ Js[i], rtol=1e-12, atol=0)
        full_i = 2 / D * e @ dtheta[T]
        fo_i = -2 * beta / D * e @ Js[i]
        dropped = _b4_dropped(Hs, dtheta, e, beta, D, i, T)
        # (B4), to 1e-9 of the difference (a difference of two nearly equal gradients)
        assert _close(full_i - fo_i, dropped, rtol=1e-9) or float(dropped.norm()) == 0.0
        if T - 1 - i >= 2:  # negative: (B5)'s leading term, dtheta_k ~ -beta J_i, is not exact
            leading = 2 * beta**2 / D * e @ sum(Hs[m] for m in range(i + 1, T)) @ Js[i]
            assert not _close(full_i - fo_i, leading, rtol=1e-9)
        if i == T - 1:
            assert float(dropped.norm()) == 0.0  # exact for the last batch
        h = [float(torch.linalg.matrix_norm(Hs[m], 2)) for m in range(i + 1, T)]
        slack = 1e-12 * float(fo_i.norm())  # full_i and fo_i are rounded differently
        assert _within(full_i - fo_i, _b6_bound(beta, D, e, Js[i], h), slack)  # (B6)
        full_per_step.append((full_i, fo_i))
    if not len(set(pb.idx)) < T:  # distinct batches: compare per step with autograd
        for i in range(T):
            assert _close(full_per_step[i][0], full_X[i].reshape(-1))
            assert _close(full_per_step[i][1], fo_X[i].reshape(-1))


@settings(max_examples=20, deadline=None)
@given(
    beta=st.sampled_from([1e-3, 1e-2, 1e-1, 1.0]),
    h=st.floats(0.1, 10.0),
    later=st.integers(2, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_two_pass_bound_B6_is_attained_and_its_linearisation_is_not_a_bound(
    beta: float, h: float, later: int, seed: int
) -> None:
    """(B6) is sharp; the first-order estimate beta (T-1-i) ||H|| of the relative error is no bound.

    (B2)-(B6) are statements about the matrices H_k, J_i and the vector e, so explicit ones will do:
    H_k = -h u u^T (||H_k||_2 = h), J_0 = u w^T, e = c u with ||u|| = 1. Then
    prod_{k>0} (I - beta H_k) J_0 = (1 + beta h)^(T-1) J_0, and the error of the two-pass gradient
    of batch 0, relative to that gradient, is (1 + beta h)^(T-1) - 1: the bound (B6) exactly.
    """
    gen = torch.Generator().manual_seed(seed)
    T = later + 1
    u = torch.randn(P, generator=gen, dtype=DT)
    u = u / u.norm()
    w = torch.randn(BATCH * D_IN, generator=gen, dtype=DT)
    c, D = 0.5 + float(torch.rand((), generator=gen, dtype=DT)), 0.7
    Hs = [torch.zeros(P, P, dtype=DT)] + [-h * torch.outer(u, u) for _ in range(later)]
    J, e = torch.outer(u, w), c * u
    dtheta = _b2_dtheta(Hs, J, beta, 0, T)
    error = 2 / D * e @ dtheta[T] - (-2 * beta / D) * e @ J  # (B2) minus (B1)
    assert _close(error, _b4_dropped(Hs, dtheta, e, beta, D, 0, T), rtol=1e-9)  # (B4)
    bound = _b6_bound(beta, D, e, J, [h] * later)
    assert _within(error, bound)  # (B6) ...
    assert float(error.norm()) >= bound * (1 - 1e-9)  # ... with equality: it cannot be tightened
    # negative: the linearised bound, (2 beta/D) ||e|| ||J_0|| * beta (T-1) h -- i.e. relative
    # error <= beta (T-1-i) ||H|| -- is exceeded as soon as two later steps curve the same way
    linearised = (2 * beta / D) * float(e.norm()) * float(torch.linalg.matrix_norm(J, 2))
    linearised *= beta * (T - 1) * h
    assert not _within(error, linearised)


@settings(max_examples=10, deadline=None)
@given(
    beta=st.sampled_from([1e-3, 1e-2, 1e-1, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_two_pass_truncation_error_two_steps_B5(beta: float, seed: int) -> None:
    """(B5) at T=2 with vjp/hvp only: dX_0 full - first-order = (2 beta^2/D) J_0^T H_1 e."""
    pb = _problem(2, beta, seed, shared=False)
    full_X, full_Y, _ = unrolled(pb)
    fo_X, fo_Y, _ = unrolled(pb, first_order=True)
    theta1 = pb.theta0 - beta * _g(pb.theta0, pb.X[0], pb.Y[0])
    theta2 = theta1 - beta * _g(theta1, pb.X[1], pb.Y[1])
    e = theta2 - pb.target
    s1 = theta1.detach().requires_grad_()
    H1e = torch.autograd.grad(_g(s1, pb.X[1], pb.Y[1], create_graph=True), s1, grad_outputs=e)[0]
    X0, Y0 = pb.X[0].clone().requires_grad_(), pb.Y[0].clone().requires_grad_()
    g0 = _g(pb.theta0, X0, Y0, create_graph=True)
    pred_X, pred_Y = torch.autograd.grad(g0, (X0, Y0), grad_outputs=2 * beta**2 / pb.D * H1e)
    # a difference of two gradients that agree to O(beta h): 1e-9 of the difference is ~1e-12 of
    # either gradient (measured at most 2e-11 of the difference, at beta = 1e-3)
    assert _close(full_X[0] - fo_X[0], pred_X, rtol=1e-9)
    assert _close(full_Y[0] - fo_Y[0], pred_Y, rtol=1e-9)
    assert not _close(full_X[0] - fo_X[0], pred_X / 2, rtol=1e-3)  # negative: coefficient
    assert _close(full_X[1], fo_X[1], rtol=1e-12)  # exact for the last batch


@settings(max_examples=15, deadline=None)
@given(pb=problems)
def test_adjoint_beta_gradient_B7_B8_C3(pb: Problem) -> None:
    """(B7) forward sensitivity = autograd = adjoint (C3); TESLA's (B8) = stop-gradient unroll."""
    _, _, full_b = unrolled(pb)
    _, _, fo_b = unrolled(pb, first_order=True)
    theta, s = pb.theta0, torch.zeros(P, dtype=DT)
    for j in pb.idx:
        t = theta.detach().requires_grad_()
        g = _g(t, pb.X[j], pb.Y[j], create_graph=True)
        Hs = torch.autograd.grad(g, t, grad_outputs=s)[0]
        s, theta = s - pb.beta * Hs - g.detach(), theta - pb.beta * g.detach()
    sens_b = 2 / pb.D * (theta - pb.target) @ s
    assert math.isclose(float(sens_b), float(full_b), rel_tol=RTOL, abs_tol=1e-300)
    assert math.isclose(float(adjoint(pb)[2]), float(full_b), rel_tol=RTOL, abs_tol=1e-300)
    tesla_b = two_pass(pb)[2]
    assert math.isclose(float(tesla_b), float(fo_b), rel_tol=RTOL, abs_tol=1e-300)
    if pb.T >= 2:  # negative
        assert not math.isclose(float(tesla_b), float(full_b), rel_tol=1e-6)


# --------------------------------------------------------------------------------------------
# (A) as the public TESLA code executes it: distill.py of github.com/justincui03/tesla (commit
#   488842e, lines 416-420) forms (-beta d_0 + beta^2 G)^T g_i / D, takes its gradient with
#   respect to the images with torch.autograd.grad, multiplies the result by 2 and applies
#   element [0]. autograd.grad returns a tuple, and 2 * tuple repeats the tuple.
# --------------------------------------------------------------------------------------------


def test_two_times_a_gradient_tuple_repeats_it() -> None:
    x = torch.tensor([0.5, -1.5], dtype=DT, requires_grad=True)
    y = (x**3).sum()
    plain = torch.autograd.grad(y, x, retain_graph=True)[0]
    as_written = 2 * torch.autograd.grad(y, x, retain_graph=True)  # the public code's form
    assert isinstance(as_written, tuple) and len(as_written) == 2
    assert torch.equal(as_written[0], plain) and torch.equal(as_written[1], plain)
    intended = 2 * torch.autograd.grad(y, x)[0]
    assert torch.equal(intended, 2 * plain)
    assert not torch.equal(as_written[0], intended)  # negative: element [0] is not doubled


def _public_tesla_image_grads(pb: Problem) -> list:
    """The image gradient the public TESLA code applies, rewritten for this file's MLP."""
    theta, G, thetas = pb.theta0, torch.zeros(P, dtype=DT), []
    for j in pb.idx:  # pass 1 without graphs: the states theta_i (the code keeps them) and G
        thetas.append(theta)
        g = _g(theta, pb.X[j], pb.Y[j])
        G, theta = G + g, theta - pb.beta * g
    coeff = pb.beta * (pb.target - pb.theta0) + pb.beta**2 * G  # -beta d_0 + beta^2 G
    dX = [torch.zeros_like(x) for x in pb.X]
    for i, j in enumerate(pb.idx):
        Xi = pb.X[j].clone().requires_grad_()
        g_i = _g(thetas[i], Xi, pb.Y[j], create_graph=True)
        gradients = 2 * torch.autograd.grad(coeff @ g_i / pb.D, Xi)  # a tuple, repeated
        assert len(gradients) == 2 and gradients[0] is gradients[1]
        dX[j] = dX[j] + gradients[0]
    return dX


@settings(max_examples=10, deadline=None)
@given(pb=problems)
def test_public_tesla_code_applies_half_the_first_order_gradient_A5(pb: Problem) -> None:
    """As executed, the public code's image gradient is half of (A5)/(B1); doubled, it is (A5)."""
    applied = torch.cat([t.reshape(-1) for t in _public_tesla_image_grads(pb)])
    first_order = torch.cat([t.reshape(-1) for t in two_pass(pb)[0]])
    assert _close(2 * applied, first_order)  # what the explicit 2 was meant to give
    assert not _close(applied, first_order, rtol=0.1)  # negative: as executed, half of it


# --------------------------------------------------------------------------------------------
# (D) memory: bytes held in autograd's saved tensors (a deterministic stand-in for the graph size)
# --------------------------------------------------------------------------------------------


class _SavedBytes:
    """Pack hook object: counts the bytes of every tensor autograd saves while it is alive.

    Tensors saved by several nodes count once per node, the same for every method, so totals
    compare like with like; the absolute numbers are an upper bound on the graph memory.
    """

    live = 0
    peak = 0

    def __init__(self, t: Tensor) -> None:
        self.t, self.n = t, t.numel() * t.element_size()
        _SavedBytes.live += self.n
        _SavedBytes.peak = max(_SavedBytes.peak, _SavedBytes.live)

    def __del__(self) -> None:
        _SavedBytes.live -= self.n

    @classmethod
    def peak_of(cls, fn, *args) -> int:
        cls.live = cls.peak = 0
        with torch.autograd.graph.saved_tensors_hooks(cls, lambda s: s.t):
            fn(*args)
        assert cls.live == 0  # everything released afterwards
        return cls.peak


def test_memory_graph_bytes_vs_steps_D1_D4_D6() -> None:
    """Unrolled (D1) and first-order unrolling in one graph (D6) grow linearly in T; two-pass (D2)
    and adjoint, all states (D3) or checkpoints (D4), keep one step's graph whatever T."""
    peaks = {}
    for T in (2, 4, 6):
        pb = _problem(T, 0.1, seed=T, shared=False)
        peaks[T] = {
            "unrolled": _SavedBytes.peak_of(unrolled, pb),
            "first_order_one_graph": _SavedBytes.peak_of(
                lambda p: unrolled(p, first_order=True), pb
            ),
            "two_pass": _SavedBytes.peak_of(two_pass, pb),
            "adjoint": _SavedBytes.peak_of(adjoint, pb),
            "adjoint_k2": _SavedBytes.peak_of(lambda p: adjoint(p, k=2), pb),
        }
    def grows_by_one_graph_per_step(name: str) -> bool:  # exactly T * (one step's graph) + const
        inc = peaks[4][name] - peaks[2][name]
        return inc > 0 and peaks[6][name] - peaks[4][name] == inc

    def constant_in_T(name: str) -> bool:  # one step's graph, whatever T
        return peaks[2][name] == peaks[4][name] == peaks[6][name] > 0

    for name in ("unrolled", "first_order_one_graph"):
        assert grows_by_one_graph_per_step(name)
        assert not constant_in_T(name)  # negative
    for name in ("two_pass", "adjoint", "adjoint_k2"):
        assert constant_in_T(name)
        assert not grows_by_one_graph_per_step(name)  # negative
        assert peaks[6][name] * 2 < peaks[6]["unrolled"]


def _reference_convnet(norm_affine: bool = True) -> nn.Module:
    """ConvNet depth 3, width 128, instance norm, 32x32x3 -> 10, written out (not the library's).

    norm_affine=False (torch's InstanceNorm2d default: no scale and shift) is a wrong variant."""
    layers, c = [], 3
    for _ in range(3):
        conv = nn.Conv2d(c, 128, 3, padding=1)
        layers += [conv, nn.GroupNorm(128, 128, affine=norm_affine), nn.ReLU(), nn.AvgPool2d(2)]
        c = 128
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 4 * 4, 10))


def _step_graph_bytes(net: nn.Module, batch: int) -> int:
    """Unique storage bytes saved by one differentiable student step g = grad_theta l (float32).

    The saved storages are kept referenced until the count is taken, so a freed storage's address
    cannot be reused by a later one and two storages are never counted as one."""
    seen = {}

    def pack(t: Tensor) -> Tensor:
        st_ = t.untyped_storage()
        seen[(st_.data_ptr(), st_.nbytes())] = st_
        return t

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(batch, 3, 32, 32, generator=gen, dtype=torch.float32, requires_grad=True)
    Y = torch.randn(batch, 10, generator=gen, dtype=torch.float32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(X)
        loss = -(torch.softmax(Y, -1) * torch.log_softmax(out, -1)).sum(-1).mean()
        torch.autograd.grad(loss, list(net.parameters()), create_graph=True)
    return sum(storage.nbytes() for storage in seen.values())


def _parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _output_bytes(layer: nn.Module, x: Tensor) -> int:
    out = layer(x)
    return out.numel() * out.element_size()


def _is_minimiser(cost: sp.Expr, k: sp.Symbol, k0: sp.Expr) -> bool:
    """k0 is a stationary point of cost(k) with positive curvature."""
    slope = sp.simplify(sp.diff(cost, k).subs(k, k0))
    return slope == 0 and bool(sp.simplify(sp.diff(cost, k, 2).subs(k, k0)).is_positive)


def test_memory_reference_convnet_sizes_D4_D5() -> None:
    """(D5): P = 320,010 (1.28 MB fp32); conv1 output at B=100 is 52.4 MB; a step graph >> P;
    (D4): T/k + k is smallest at k = sqrt(T)."""
    net = _reference_convnet().float()
    n_params = _parameter_count(net)
    assert n_params == 320_010 and n_params * 4 == 1_280_040
    # negative: without the norm's scale and shift (3 x 2 x 128 parameters) the count is wrong
    assert _parameter_count(_reference_convnet(norm_affine=False)) != 320_010
    with torch.device("meta"):  # shapes only, no memory
        x = torch.empty(100, 3, 32, 32, dtype=torch.float32)
        assert _output_bytes(net[0], x) == 100 * 128 * 32 * 32 * 4 == 52_428_800
        # negative: without padding conv1 has 30 x 30 outputs
        assert _output_bytes(nn.Conv2d(3, 128, 3), x) != 52_428_800
    # one step's graph: exactly linear in B; 2.96 MB per image (2,958,500 bytes, torch 2.13, CPU)
    size = {b: _step_graph_bytes(net, b) for b in (2, 4, 10)}
    per_image = (size[4] - size[2]) // 2
    assert size[4] - size[2] == 2 * per_image and size[10] - size[4] == 6 * per_image
    assert 2.8e6 < per_image < 3.1e6
    assert per_image > 128 * 32 * 32 * 4  # more than conv1's output for that image
    assert 100 * per_image > 40 * n_params * 4  # at B=100 one step's graph > 40 parameter vectors
    assert not 10 * per_image > 40 * n_params * 4  # negative: at B=10 it is not
    # optimum checkpoint interval (D4): T/k + k is minimal at k = sqrt(T)
    T_, k_ = sp.symbols("T k", positive=True)
    cost = T_ / k_ + k_
    assert sp.solve(sp.diff(cost, k_), k_) == [sp.sqrt(T_)]
    assert _is_minimiser(cost, k_, sp.sqrt(T_))
    assert not _is_minimiser(cost, k_, T_ / 2)  # negative: a checkpoint every T/2 steps is not
