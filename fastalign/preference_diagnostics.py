"""Diagnostics of pairwise preference data, in one place: intransitive cycles and a Bradley–Terry fit
per prompt, on judgement tensors or a `datasets.Dataset`.

    report = intransitive_cycles(*judgements)      # fastalign/preference_cycles.py
    fit = bradley_terry_fit(*judgements)           # fastalign/bradley_terry.py
    judgements = judgements_from_dataset(dataset)  # fastalign/preference_judgements.py
"""

from .bradley_terry import TIE_TOLERANCE, BradleyTerryFit, bradley_terry_fit
from .preference_cycles import IntransitivityReport, intransitive_cycles
from .preference_judgements import DatasetJudgements, PairwiseJudgements, judgements_from_dataset

__all__ = [
    "TIE_TOLERANCE",
    "BradleyTerryFit",
    "DatasetJudgements",
    "IntransitivityReport",
    "PairwiseJudgements",
    "bradley_terry_fit",
    "intransitive_cycles",
    "judgements_from_dataset",
]
