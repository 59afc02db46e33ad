"""The integer ids and parameter order that fastalign passes to every kernel, defined once.

fastalign (`fastalign/token_objective.py`, `fastalign/advantages.py`) and the Triton kernels read
them from here; the C++ kernels mirror them as enums (csrc/cpu/policy.cpp, csrc/cpu/advantages.cpp),
and tests/ops/test_backend.py checks that the three agree. Plain Python: importing it needs no Triton.
"""

# The policy objective's surrogate (TokenObjective.surrogate).
SURROGATE_CLIP = 0
SURROGATE_CISPO = 1
SURROGATE_SAPO = 2
SURROGATES = ("clip", "cispo", "sapo")  # by id

# The KL estimator (TokenObjective.kl).
KL_NONE = 0
KL_K1 = 1
KL_ABS = 2
KL_K2 = 3
KL_K3 = 4
KL_LOW_VAR_KL = 5
KL_ESTIMATORS = ("none", "k1", "abs", "k2", "k3", "low_var_kl")  # by id

# The float parameters of the objective, in the order of the `params` list every kernel reads.
OBJECTIVE_PARAMS = (
    "ratio_low", "ratio_high", "delta", "dual_clip", "log_ratio_clamp", "tau_pos", "tau_neg",
    "kl_straight_through", "kl_bias_correction",
)

# What group advantages are divided by.
SCALE_NONE = 0
SCALE_GROUP = 1  # the group's standard deviation
SCALE_GIVEN = 2  # one given denominator (the batch's standard deviation)
