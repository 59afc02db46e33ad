"""Student-teacher divergences per token (Triton): forward / reverse KL, the mixture family
(generalized JSD, skew KL) and total variation, as ``fastalign/reference/divergence.py`` defines
them, with the student's entropy.

Forward: one program per token row. The two KLs read each row once: with both models' online
softmax statistics (running max, sum of exponentials), the weighting model's sum of e (d_w - d_o),
d each model's exponent at its running max, is kept online too and rebased whenever either max
moves, so its terms stay as small as the distribution's own log-probs (no large shared offset
cancels at the end). The mixture (JSD, skew KL) and total variation take the log of a sum of both
models' probabilities at each entry, which needs both final normalizers first: a first sweep over
each row finds them, a second forms log p_s and log p_t exactly and sums the divergence, the
entropy and the two sums sum p g the gradients need (TRL's chunked divergence sweeps twice for the
JSD too). Backward: a (rows x vocabulary-blocks) grid; each program reads its
block of both rows once and writes its block of the first argument's gradient once (the
teacher's gradient is the same kernel with the roles swapped, as the reference defines it).

Each model's values: w = sign * u with u = x without softcap and tanh(x * scale / softcap) with
it, and z = w * factor, factor > 0 (a negative scale / temperature is carried by sign). The row's
normalizer is kept as (shift, log_s) with shift in u (the stored shift is sign * max w), as the
other backends store it; exponents are (w - max w) * factor, exact near the maximum at any
magnitude.
"""

import math

import torch
import triton
import triton.language as tl

from .logprobs import _pre_scale
from .target import warps

BLOCK = 2048
FWD_THREADS = 512
BWD_BLOCK = 2048
BWD_THREADS = 512

FORWARD_KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
MIXTURE = tl.constexpr(2)


@triton.jit
def _load_w(row_ptr, cols, in_vocab, stride_v, in_scale, sign, SOFTCAP: tl.constexpr, CONTIGUOUS: tl.constexpr):
    if CONTIGUOUS:
        ptrs = row_ptr + cols
    else:
        ptrs = row_ptr + cols.to(tl.int64) * stride_v
    x = tl.load(ptrs, mask=in_vocab, other=0.0).to(tl.float32)
    w = _pre_scale(x, in_scale, SOFTCAP) * sign
    return tl.where(in_vocab, w, -float("inf"))


@triton.jit
def _log_prob(w, shift, factor, log_s):
    # -inf stays -inf (a masked-out or -inf logit); the difference is taken before scaling.
    return tl.where(w == -float("inf"), -float("inf"), (w - shift) * factor - log_s)


@triton.jit
def _times(p, x):
    # p * x, 0 where p is 0 (x may then be -inf - -inf).
    return tl.where(p == 0.0, 0.0, p * x)


@triton.jit
def _log_mixture(a, b):
    top = tl.maximum(a, b)
    low = tl.minimum(a, b)
    lm = top + tl.log(1.0 + tl.exp(low - top))
    return tl.where(top == -float("inf"), -float("inf"), lm)


@triton.jit
def _weighted_grad(lp1, lp2, p1, p2, beta, beta_c, w_t, w_s, lb, l1b, KIND: tl.constexpr):
    # p_1 * g, g the derivative w.r.t. log p_1 of the divergence taking argument 1 as its student, up
    # to a per-row constant; one product, as g alone overflows where p_1 is far below the mixture.
    if KIND == REVERSE_KL:
        pg = _times(p1, lp1 - lp2)
    elif KIND == MIXTURE:
        lm = _log_mixture(lp1 + l1b, lp2 + lb)
        ratio = tl.where(p1 == 0.0, 0.0, tl.exp(lp1 - lm))
        mixed = tl.where(beta >= 1.0, 0.0, beta_c * (w_t * p2 + w_s * p1) * ratio)
        pg = w_s * _times(p1, lp1 - lm) - mixed
    else:
        d = p1 - p2
        pg = p1 * tl.where(d > 0.0, 0.5, tl.where(d < 0.0, -0.5, 0.0))
    return pg


@triton.jit
def _row_normalizer(row_ptr, V, stride_v, in_scale, factor, sign,
                    SOFTCAP: tl.constexpr, CONTIGUOUS: tl.constexpr, BLOCK: tl.constexpr):
    m = -float("inf")
    s = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        w = _load_w(row_ptr, cols, cols < V, stride_v, in_scale, sign, SOFTCAP, CONTIGUOUS)
        new_m = tl.maximum(m, tl.max(w, axis=0))
        # NaN reaches s through the exponentials; an all -inf chunk adds nothing.
        rescale = tl.where(new_m == m, 1.0, tl.exp((m - new_m) * factor))
        e = tl.where(w == -float("inf"), 0.0, tl.exp((w - new_m) * factor))
        s = s * rescale + tl.sum(e, axis=0)
        m = new_m
    return m, tl.log(s)


@triton.jit
def _rebased(total, mass, rescale, move):
    # sum_i e_i c_i after every e_i is scaled by `rescale` and every c_i moves by -`move`; no
    # mass yet (or all of it underflowed) leaves nothing, and an infinite move only meets the
    # infinite total it implies (a zero of the other model under this one's mass).
    kept = rescale * (total - mass * move)
    return tl.where((mass == 0.0) | (rescale == 0.0), 0.0, kept)


@triton.jit
def _max_move(m, new_m, factor):
    # How far a running max moved, scaled (0 when it did not, also at -inf; +inf when it leaves -inf,
    # which rescales the empty sums by e^-inf = 0).
    return tl.where(new_m == m, 0.0, (new_m - m) * factor)


@triton.jit
def _kl_one_read(s_row, t_row, V, s_sv, t_sv, s_in, s_factor, s_sign, t_in, t_factor, t_sign,
                 KIND: tl.constexpr, S_SOFTCAP: tl.constexpr, T_SOFTCAP: tl.constexpr,
                 S_CONTIGUOUS: tl.constexpr, T_CONTIGUOUS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Forward or reverse KL and the student's entropy from one read of both rows.

    With c = (w - max w) * factor each model's exponent at its running max, the weighting model
    (the teacher for the forward KL, the student for the reverse) keeps A = sum e^{c_w} (c_w - c_o)
    and the student E = sum e^{c_s} c_s; at the end KL = A / S_w - log S_w + log S_o and
    H = log S_s - E / S_s."""
    m_s = -float("inf")
    m_t = -float("inf")
    sum_s = 0.0
    sum_t = 0.0
    kl = 0.0
    ent = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_vocab = cols < V
        ws = _load_w(s_row, cols, in_vocab, s_sv, s_in, s_sign, S_SOFTCAP, S_CONTIGUOUS)
        wt = _load_w(t_row, cols, in_vocab, t_sv, t_in, t_sign, T_SOFTCAP, T_CONTIGUOUS)
        new_s = tl.maximum(m_s, tl.max(ws, axis=0))
        new_t = tl.maximum(m_t, tl.max(wt, axis=0))
        move_s = _max_move(m_s, new_s, s_factor)
        move_t = _max_move(m_t, new_t, t_factor)
        rescale_s = tl.exp(-move_s)
        rescale_t = tl.exp(-move_t)
        # Exponents at the new maxima; -inf stays -inf (the difference is taken before scaling).
        c_s = tl.where(ws == -float("inf"), -float("inf"), (ws - new_s) * s_factor)
        c_t = tl.where(wt == -float("inf"), -float("inf"), (wt - new_t) * t_factor)
        e_s = tl.exp(c_s)
        e_t = tl.exp(c_t)
        if KIND == FORWARD_KL:
            kl = _rebased(kl, sum_t, rescale_t, move_t - move_s) + tl.sum(_times(e_t, c_t - c_s), axis=0)
        else:
            kl = _rebased(kl, sum_s, rescale_s, move_s - move_t) + tl.sum(_times(e_s, c_s - c_t), axis=0)
        if WITH_ENTROPY:
            ent = _rebased(ent, sum_s, rescale_s, move_s) + tl.sum(_times(e_s, c_s), axis=0)
        sum_s = sum_s * rescale_s + tl.sum(e_s, axis=0)
        sum_t = sum_t * rescale_t + tl.sum(e_t, axis=0)
        m_s = new_s
        m_t = new_t
    log_s_s = tl.log(sum_s)
    log_s_t = tl.log(sum_t)
    if KIND == FORWARD_KL:
        total = kl / sum_t - log_s_t + log_s_s
    else:
        total = kl / sum_s - log_s_s + log_s_t
    return m_s, log_s_s, m_t, log_s_t, total, log_s_s - ent / sum_s


@triton.jit(do_not_specialize=["T"])
def _token_divergence_fwd_kernel(
    s_ptr, t_ptr, valid_ptr, value_ptr, entropy_ptr, stats_ptr,
    T, V, s_sb, s_st, s_sv, t_sb, t_st, t_sv,
    s_in, s_factor, s_sign, t_in, t_factor, t_sign,
    beta, beta_c, w_t, w_s, lb, l1b,
    KIND: tl.constexpr, S_SOFTCAP: tl.constexpr, T_SOFTCAP: tl.constexpr,
    S_CONTIGUOUS: tl.constexpr, T_CONTIGUOUS: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if tl.load(valid_ptr + row) == 0:
        tl.store(value_ptr + row, 0.0)
        if WITH_ENTROPY:
            tl.store(entropy_ptr + row, 0.0)
        for i in tl.static_range(6):
            tl.store(stats_ptr + 6 * row + i, 0.0)
        return
    b = row // T
    s_row = s_ptr + b * s_sb + (row - b * T) * s_st
    t_row = t_ptr + b * t_sb + (row - b * T) * t_st
    if (KIND == FORWARD_KL) or (KIND == REVERSE_KL):
        m_s, log_s_s, m_t, log_s_t, total, ent = _kl_one_read(
            s_row, t_row, V, s_sv, t_sv, s_in, s_factor, s_sign, t_in, t_factor, t_sign,
            KIND, S_SOFTCAP, T_SOFTCAP, S_CONTIGUOUS, T_CONTIGUOUS, WITH_ENTROPY, BLOCK)
        # Each KL is its own first distribution's aux (sum p (lp_1 - lp_2)); the other side has none.
        a_s = total if KIND == REVERSE_KL else 0.0
        a_t = total if KIND == FORWARD_KL else 0.0
    else:
        m_s, log_s_s = _row_normalizer(s_row, V, s_sv, s_in, s_factor, s_sign, S_SOFTCAP, S_CONTIGUOUS, BLOCK)
        m_t, log_s_t = _row_normalizer(t_row, V, t_sv, t_in, t_factor, t_sign, T_SOFTCAP, T_CONTIGUOUS, BLOCK)
        # Half-size chunks here: fewer values live per thread, and lane offsets of their own (with
        # the first sweeps' kept live across, ptxas for sm_100 spilled one to reach 3 programs per SM).
        value = tl.zeros([BLOCK // 2], dtype=tl.float32)
        entropy = tl.zeros([BLOCK // 2], dtype=tl.float32)
        aux_s = tl.zeros([BLOCK // 2], dtype=tl.float32)
        aux_t = tl.zeros([BLOCK // 2], dtype=tl.float32)
        for start in range(0, V, BLOCK // 2):
            cols = start + tl.arange(0, BLOCK // 2)
            in_vocab = cols < V
            ws = _load_w(s_row, cols, in_vocab, s_sv, s_in, s_sign, S_SOFTCAP, S_CONTIGUOUS)
            wt = _load_w(t_row, cols, in_vocab, t_sv, t_in, t_sign, T_SOFTCAP, T_CONTIGUOUS)
            lp_s = _log_prob(ws, m_s, s_factor, log_s_s)
            lp_t = _log_prob(wt, m_t, t_factor, log_s_t)
            p_s = tl.exp(lp_s)
            p_t = tl.exp(lp_t)
            if WITH_ENTROPY:
                entropy -= _times(p_s, lp_s)
            if KIND == MIXTURE:
                lm = _log_mixture(lp_s + l1b, lp_t + lb)
                value += w_t * _times(p_t, lp_t - lm) + w_s * _times(p_s, lp_s - lm)
                aux_s += _weighted_grad(lp_s, lp_t, p_s, p_t, beta, beta_c, w_t, w_s, lb, l1b, KIND)
                # The teacher's side: beta -> 1 - beta, the weights and log-weights swapped.
                aux_t += _weighted_grad(lp_t, lp_s, p_t, p_s, beta_c, beta, w_s, w_t, l1b, lb, KIND)
            else:
                value += 0.5 * tl.abs(p_s - p_t)
                aux_s += _weighted_grad(lp_s, lp_t, p_s, p_t, beta, beta_c, w_t, w_s, lb, l1b, KIND)
                aux_t += _weighted_grad(lp_t, lp_s, p_t, p_s, beta, beta_c, w_t, w_s, lb, l1b, KIND)
        total = tl.sum(value, axis=0)
        ent = tl.sum(entropy, axis=0)
        a_s = tl.sum(aux_s, axis=0)
        a_t = tl.sum(aux_t, axis=0)
    # A row with no finite logit (or a NaN) has no distribution: NaN, as the reference gives.
    ok = (log_s_s > -float("inf")) & (log_s_t > -float("inf"))
    tl.store(value_ptr + row, tl.where(ok, total, float("nan")))
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(log_s_s > -float("inf"), ent, float("nan")))
    s_finite = (m_s > -float("inf")) & (m_s < float("inf"))
    t_finite = (m_t > -float("inf")) & (m_t < float("inf"))
    tl.store(stats_ptr + 6 * row, tl.where(s_finite, m_s * s_sign, 0.0))
    tl.store(stats_ptr + 6 * row + 1, log_s_s)
    tl.store(stats_ptr + 6 * row + 2, tl.where(t_finite, m_t * t_sign, 0.0))
    tl.store(stats_ptr + 6 * row + 3, log_s_t)
    tl.store(stats_ptr + 6 * row + 4, tl.where(ok, a_s, float("nan")))
    tl.store(stats_ptr + 6 * row + 5, tl.where(ok, a_t, float("nan")))


@triton.jit(do_not_specialize=["T"])
def _token_divergence_bwd_kernel(
    a_ptr, b_ptr, valid_ptr, stats_ptr, grad_ptr, out_ptr,
    T, V, a_sb, a_st, a_sv, b_sb, b_st, b_sv,
    a_in, a_factor, a_sign, b_in, b_factor, b_sign, a_chain,
    beta, beta_c, w_t, w_s, lb, l1b,
    KIND: tl.constexpr, A_SOFTCAP: tl.constexpr, B_SOFTCAP: tl.constexpr,
    A_CONTIGUOUS: tl.constexpr, B_CONTIGUOUS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = cols < V
    out_ptrs = out_ptr + row * V + cols
    g = tl.load(grad_ptr + row)
    if (tl.load(valid_ptr + row) == 0) | (g == 0.0):
        tl.store(out_ptrs, tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty), mask=in_vocab)
        return
    bb = row // T
    a_row = a_ptr + bb * a_sb + (row - bb * T) * a_st
    b_row = b_ptr + bb * b_sb + (row - bb * T) * b_st
    log_s_a = tl.load(stats_ptr + 6 * row + 1)
    log_s_b = tl.load(stats_ptr + 6 * row + 3)
    wa = _load_w(a_row, cols, in_vocab, a_sv, a_in, a_sign, A_SOFTCAP, A_CONTIGUOUS)
    wb = _load_w(b_row, cols, in_vocab, b_sv, b_in, b_sign, B_SOFTCAP, B_CONTIGUOUS)
    lp_a = _log_prob(wa, tl.load(stats_ptr + 6 * row) * a_sign, a_factor, log_s_a)
    lp_b = _log_prob(wb, tl.load(stats_ptr + 6 * row + 2) * b_sign, b_factor, log_s_b)
    p_a = tl.exp(lp_a)
    p_b = tl.exp(lp_b)
    if KIND == FORWARD_KL:
        dz = p_a - p_b
    else:
        aux = tl.load(stats_ptr + 6 * row + 4)
        dz = _weighted_grad(lp_a, lp_b, p_a, p_b, beta, beta_c, w_t, w_s, lb, l1b, KIND) - _times(p_a, aux)
    dz = dz * (g * a_chain)
    if A_SOFTCAP:
        u = wa  # sign is 1 under a softcap
        dz = dz * (1.0 - u * u)
    ok = (log_s_a > -float("inf")) & (log_s_b > -float("inf"))
    dz = tl.where(ok, dz, float("nan"))
    tl.store(out_ptrs, dz.to(out_ptr.dtype.element_ty), mask=in_vocab)


def _model_constants(temperature: float, logit_scale: float, softcap: float) -> tuple[float, float, float, bool]:
    """(in_scale for _pre_scale, factor > 0, sign, softcap on): z = sign * u * factor."""
    if softcap > 0.0:
        # tanh's argument arrives times 2 log2(e) (_tanh_scaled in logprobs.py).
        return 2.0 * math.log2(math.e) * logit_scale / softcap, softcap / temperature, 1.0, True
    k = logit_scale / temperature
    return 1.0, abs(k), (1.0 if k >= 0 else -1.0), False


def _kind_constants(beta: float, w_t: float, w_s: float) -> tuple[float, float, float, float, float, float]:
    # 1 - beta and the logs as parameters, read from the constant bank (held in a register across
    # the loop, ptxas for sm_100 spilled 1 - beta to reach 3 programs per SM).
    lb = math.log(beta) if beta > 0.0 else -math.inf
    l1b = math.log1p(-beta) if beta < 1.0 else -math.inf
    return beta, 1.0 - beta, w_t, w_s, lb, l1b


def _check_pair(first: torch.Tensor, second: torch.Tensor, valid: torch.Tensor) -> tuple[int, int, int]:
    if first.dim() != 3 or second.shape != first.shape:
        raise ValueError(f"expected two [B, T, V] views of one shape, got {tuple(first.shape)} and "
                         f"{tuple(second.shape)}")
    for t in (first, second):
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"logits must be float32, bfloat16 or float16, got {t.dtype}")
    B, T, V = first.shape
    if valid.shape != (B * T,) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor of shape [{B * T}], got {valid.dtype} {tuple(valid.shape)}")
    return B, T, V


def token_divergence_forward(student, teacher, valid, kind, beta, w_t, w_s, temperature, student_scale,
                             student_softcap, teacher_scale, teacher_softcap, with_entropy):
    B, T, V = _check_pair(student, teacher, valid)
    N = B * T
    value = torch.empty(N, dtype=torch.float32, device=student.device)
    entropy = torch.empty(N if with_entropy else 0, dtype=torch.float32, device=student.device)
    stats = torch.empty((N, 6), dtype=torch.float32, device=student.device)
    if N == 0:
        return value, entropy, stats
    s_in, s_factor, s_sign, s_cap = _model_constants(temperature, student_scale, student_softcap)
    t_in, t_factor, t_sign, t_cap = _model_constants(temperature, teacher_scale, teacher_softcap)
    _token_divergence_fwd_kernel[(N,)](
        student, teacher, valid.contiguous(), value, entropy, stats,
        T, V, *student.stride(), *teacher.stride(),
        s_in, s_factor, s_sign, t_in, t_factor, t_sign, *_kind_constants(beta, w_t, w_s),
        KIND=kind, S_SOFTCAP=s_cap, T_SOFTCAP=t_cap, S_CONTIGUOUS=student.stride(2) == 1,
        T_CONTIGUOUS=teacher.stride(2) == 1, WITH_ENTROPY=with_entropy, BLOCK=BLOCK,
        num_warps=warps(FWD_THREADS), enable_fp_fusion=True,
    )
    return value, entropy, stats


def token_divergence_backward(grad, first, second, valid, stats, kind, beta, w_t, w_s, temperature, first_scale,
                              first_softcap, second_scale, second_softcap):
    B, T, V = _check_pair(first, second, valid)
    N = B * T
    out = torch.empty((B, T, V), dtype=first.dtype, device=first.device)
    if N == 0 or V == 0:
        return out
    a_in, a_factor, a_sign, a_cap = _model_constants(temperature, first_scale, first_softcap)
    b_in, b_factor, b_sign, b_cap = _model_constants(temperature, second_scale, second_softcap)
    chain = first_scale / temperature
    grad = grad.to(torch.float32).contiguous()
    stats = stats.to(torch.float32).contiguous()
    valid = valid.contiguous()
    blocks = triton.cdiv(V, BWD_BLOCK)
    _token_divergence_bwd_kernel[(N, blocks)](
        first, second, valid, stats, grad, out,
        T, V, *first.stride(), *second.stride(),
        a_in, a_factor, a_sign, b_in, b_factor, b_sign, chain, *_kind_constants(beta, w_t, w_s),
        KIND=kind, A_SOFTCAP=a_cap, B_SOFTCAP=b_cap, A_CONTIGUOUS=first.stride(2) == 1,
        B_CONTIGUOUS=second.stride(2) == 1, BLOCK=BWD_BLOCK, num_warps=warps(BWD_THREADS), enable_fp_fusion=True,
    )
    return out
