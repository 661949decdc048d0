"""Tolerances for comparing two floating-point computations, derived from the arithmetic.

Two computations of the same quantity that add the same fp32 terms in different orders (a
sharded and a single-device matmul, XLA's and torch's kernels, a chunked and a whole reduction,
a cached decode and a full forward) round differently. Adding n terms in fp32 in any order errs
by at most (n - 1) * u * sum |x_i|, u = eps / 2 (Higham, "Accuracy and Stability of Numerical
Algorithms", 2nd ed., section 4.2); in practice the n roundings, each at most u times a partial
sum, add like a random walk: about sqrt(n) * u * S, S the size of the partial sums. The helpers
take S as the magnitude of the compared values (e.g. max |logit|, which a test can read) and
charge the worst case's factor n: n * eps * S, 2 sqrt(n) times the typical error. A real bug (a
wrong weight, mask or position) moves the values by a fraction of S, far above n * eps * S
while n * eps stays small, which fp32_reduction_tol checks (< 1%).

Also here: the term counts of a transformer forward and of the SPRM head, bf16 rounding chains,
Adam's per-entry sensitivity, and the log-prob and sigmoid-score forms of the bound.
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23: the spacing of fp32 numbers at 1
EPS_BF16 = 2.0**-7  # the spacing of bfloat16 numbers at 1 (8 significand bits)
MAX_RELATIVE_TOL = 0.01  # above this a tolerance could hide a real discrepancy


def fp32_reduction_tol(n_terms: int, scale: float) -> float:
    """Absolute bound on |a - b| for two fp32 evaluations of a sum of `n_terms` terms of
    magnitude `scale` in different orders: n_terms * eps32 * scale (module docstring).

    For a chain of dependent sums (layers), n_terms is the total along the chain: a relative
    error entering one sum reaches the output with gain about 1, so the relative errors add.
    """
    return _checked(n_terms * EPS32, scale, f"{n_terms} fp32 terms")


def bf16_rounding_tol(n_roundings: int, scale: float) -> float:
    """Absolute bound on the error of a chain of `n_roundings` roundings to bfloat16 of values of
    magnitude `scale`: each rounding moves a value by at most eps_bf16 / 2 relative, and along
    a chain the relative errors add: n_roundings * eps_bf16 / 2 * scale."""
    rel = n_roundings * EPS_BF16 / 2
    if rel >= 1:
        raise ValueError(f"{n_roundings} bf16 roundings: the bound {rel:.2f} x scale says nothing")
    return rel * float(scale)


def transformer_terms(cfg, seq_len: int, *, n_layers: int | None = None, lm_head=True) -> int:
    """fp32 terms summed on the way to one logit of a decoder forward over `seq_len` positions
    (`n_layers` blocks, default all; lm_head=False: to the residual stream after them).

    Per block: d_model squares in each of the two RMSNorms, d_model per q/k/v projection and
    per gate/up projection, head_dim per attention score, seq_len for the softmax normaliser
    and again for the weighted sum of values, n_heads * head_dim per output projection, d_ff
    per down projection. After the blocks: the final norm and the LM head (d_model each). The
    residual stream carries each block's error on with gain about 1 and RMSNorm divides the
    scale out, so the terms along the path add.
    """
    layers = cfg.n_layers if n_layers is None else n_layers
    block = (
        2 * cfg.d_model  # the two RMSNorms
        + cfg.d_model  # q/k/v projections
        + cfg.head_dim  # q . k
        + 2 * seq_len  # softmax normaliser, probabilities @ values
        + cfg.n_heads * cfg.head_dim  # output projection
        + cfg.d_model  # gate/up projections
        + cfg.d_ff  # down projection
    )
    return layers * block + (2 * cfg.d_model if lm_head else 0)


def sprm_head_terms(d_model: int) -> int:
    """fp32 terms on the way to one SPRM head logit: Linear(D, 2D) -> ReLU -> Linear(2D, 1)."""
    return d_model + 2 * d_model


def transformer_bf16_roundings(cfg) -> int:
    """Roundings to bfloat16 on the way to one logit with compute_dtype=bfloat16.

    Per block: the two norm outputs, the residual stream after each of the two adds, the rotary
    output, the attention probabilities and output, the SwiGLU product, and for each of the four
    matmul stages (q/k/v, o, gate/up, down) its weights and its output: 16. Before and after:
    the embedding, the final norm, the LM head's weights and output: 4.
    """
    return 16 * cfg.n_layers + 4


def adam_params_tol(grad_rms, grad_tols, lr, params, *, b1=0.9, b2=0.999, adam_eps=1e-8):
    """Per-entry bound on |a - b| for parameters after T Adam(W) updates from the same start,
    when the two runs' gradients differ by at most grad_tols[t] (rounding) at update t.

    grad_rms: T arrays (one per update) of one run's sqrt(v_hat) per entry, the gradient's
    size (from its optax state); params: the parameters after the updates.

    The update lr * m_hat / (s + adam_eps), s = sqrt(v_hat), moves by at most
    dg / (s + adam_eps) through m_hat and |m_hat| dg / (s + adam_eps)^2 through s, and
    |m_hat| <= c * s with c = sqrt(sum_i w_i^2 / u_i) (Cauchy-Schwarz; w and u are m_hat's and
    v_hat's weights of the T gradients, c ~ 1 for a few updates). Well conditioned where
    s >> dg; where a gradient is at rounding level rounding picks the step's sign, and the bound
    is capped at the two steps' largest difference, 2 c lr. It is first order: a later gradient's
    change through the runs' earlier parameter difference (lr x curvature x that difference) is
    left out. Plus each update's own fp32 rounding, 4 eps32 (|x| + lr) (about 8 roundings).
    """
    n = len(grad_rms)
    w = np.array([(1 - b1) * b1 ** (n - i) for i in range(1, n + 1)]) / (1 - b1**n)
    u = np.array([(1 - b2) * b2 ** (n - i) for i in range(1, n + 1)]) / (1 - b2**n)
    c = float(np.sqrt(np.sum(w**2 / u)))
    x = np.abs(np.asarray(params, np.float64))
    tol = n * 4 * EPS32 * (x + lr)
    for s, dg in zip(grad_rms, grad_tols, strict=True):
        step = (1 + c) * np.asarray(dg, np.float64) / (np.asarray(s, np.float64) + adam_eps)
        tol = tol + lr * np.minimum(step, 2 * c)
    return tol


def logit_bound(model) -> float:
    """A bound on |logit| over every input: the final RMSNorm's normalised vector has norm
    <= sqrt(D), so |logit_v| <= sqrt(D) * ||scale * w_v|| (Cauchy-Schwarz), w_v the LM head's
    column. The scale of log-prob comparisons where the logits themselves are not at hand."""
    gamma = np.asarray(model.final_norm.scale[...], np.float64)
    w = np.asarray(model.head_kernel(), np.float64)  # [D, V]
    return float(np.sqrt(w.shape[0]) * np.linalg.norm(gamma[:, None] * w, axis=0).max())


def logprob_tol(n_terms: int, vocab_size: int, logit_scale: float) -> float:
    """Bound on |a - b| for a token's log-prob z_t - logsumexp(z) when its logits are sums of
    n_terms fp32 terms in other orders: z_t and the log-sum-exp (vocab_size more terms) each
    err by at most fp32_reduction_tol(n_terms + vocab_size, logit_scale)."""
    return 2 * fp32_reduction_tol(n_terms + vocab_size, logit_scale)


def score_tol(n_terms: int, scores) -> float:
    """Bound on |a - b| for sigmoid scores [..., S] whose logits are sums of n_terms fp32 terms
    in other orders: the logits' error (scale read back from the scores, max |log(s/(1-s))|)
    times sigmoid's slope, at most 1/4; plus sigmoid's own rounding (a few eps, scores <= 1)."""
    return fp32_reduction_tol(n_terms, _logit_scale(scores)) / 4 + 4 * EPS32


def geomean_score_tol(n_terms: int, scores) -> float:
    """Bound on |a - b| for geometric means exp(mean log s) of sigmoid scores [..., S] as
    score_tol's: log s moves by (1 - s) times the logit's error, at most that error; the mean
    of up to S logs is a sum in another order too (scale max |log s|); the mean moves the
    geometric mean (<= 1) by at most as much, absolutely. Plus exp's and log's rounding."""
    s = np.asarray(scores, np.float64)
    s = s[(s > 0) & (s <= 1)]
    log_scale = float(np.abs(np.log(s)).max()) if s.size else 0.0
    mean_tol = fp32_reduction_tol(np.shape(scores)[-1], log_scale)
    return fp32_reduction_tol(n_terms, _logit_scale(scores)) + mean_tol + 4 * EPS32


def _logit_scale(scores) -> float:
    s = np.asarray(scores, np.float64)
    s = s[(s > 0) & (s < 1)]
    return float(np.abs(np.log(s) - np.log1p(-s)).max()) if s.size else 0.0


def _checked(rel: float, scale: float, what: str) -> float:
    if rel >= MAX_RELATIVE_TOL:
        raise ValueError(
            f"{what}: the bound {rel:.2g} x scale could hide a real discrepancy; compare a "
            "smaller computation"
        )
    return rel * float(scale)
