"""Preference-data diagnostics (fastalign/preference_cycles.py, bradley_terry.py and
preference_judgements.py): intransitive cycles against networkx and Kendall & Babington Smith's
circular-triad formula, the batched Bradley–Terry fit against scipy's optimiser and Hunter's MM
algorithm, the Dataset helper, argument errors.

References:
- Kendall & Babington Smith (1940), "On the method of paired comparisons", Biometrika 31: a
  complete tournament of n items with win counts s has
  c = n(n^2 - 1)/24 - 1/2 * sum_i (s_i - (n - 1)/2)^2 circular triads.
- Moon (1968), "Topics on Tournaments": a tournament with a cycle has a 3-cycle.
- Bradley & Terry (1952): P(i ≻ j) = sigma(s_i - s_j); Hunter (2004), "MM algorithms for
  generalized Bradley–Terry models", Ann. Statist. 32, eq. (3): gamma_i <- W_i / sum_{j != i}
  N_ij / (gamma_i + gamma_j), whose fixed point is the MLE (s = log gamma) when the comparison
  graph is strongly connected.
"""

from __future__ import annotations

import itertools
import math

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastalign import preference_judgements
from fastalign.preference_diagnostics import (
    TIE_TOLERANCE,
    bradley_terry_fit,
    intransitive_cycles,
    judgements_from_dataset,
)

scipy_optimize = pytest.importorskip("scipy.optimize")


def judgements(rows):
    """[(prompt, a, b, a_won), ...] -> the four tensors."""
    prompt, a, b, won = zip(*rows)
    return (torch.tensor(prompt), torch.tensor(a), torch.tensor(b), torch.tensor(won, dtype=torch.bool))


def random_judgements(seed, prompts, max_items, max_repeats=2, density=0.7):
    """Random prompts of 2..max_items items with random (often sparse) ids, pairs judged 0..max_repeats
    times each, with either winner."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for prompt in range(prompts):
        n = int(torch.randint(2, max_items + 1, (1,), generator=gen))
        items = (torch.randperm(10 * n, generator=gen)[:n] - 3 * n).tolist()
        for i, j in itertools.combinations(items, 2):
            if float(torch.rand(1, generator=gen)) > density:
                continue
            for _ in range(int(torch.randint(1, max_repeats + 1, (1,), generator=gen))):
                rows.append((1000 - 7 * prompt, i, j, bool(torch.rand(1, generator=gen) < 0.5)))
    return rows


def majority_graphs(rows):
    """prompt -> networkx DiGraph of the majority edges (i -> j: i won more of their judgements), and
    prompt -> count of evenly split pairs: the reference reading of repeated judgements."""
    wins = {}
    for prompt, a, b, a_won in rows:
        winner, loser = (a, b) if a_won else (b, a)
        wins.setdefault(prompt, {}).setdefault((winner, loser), 0)
        wins[prompt][(winner, loser)] += 1
    graphs, ties = {}, {}
    for prompt, counts in wins.items():
        graph = nx.DiGraph()
        graph.add_nodes_from({x for pair in counts for x in pair})
        tied = set()
        for (i, j), c in counts.items():
            back = counts.get((j, i), 0)
            if c > back:
                graph.add_edge(i, j)
            elif c == back:
                tied.add(frozenset((i, j)))
        graphs[prompt], ties[prompt] = graph, len(tied)
    return graphs, ties


def directed_triangles(graph):
    return sum(1 for x, y, z in itertools.combinations(sorted(graph), 3)
               if (graph.has_edge(x, y) and graph.has_edge(y, z) and graph.has_edge(z, x))
               or (graph.has_edge(x, z) and graph.has_edge(z, y) and graph.has_edge(y, x)))


def assert_report_matches_networkx(report, rows):
    graphs, ties = majority_graphs(rows)
    assert report.prompts.tolist() == sorted(graphs)
    for k, prompt in enumerate(report.prompts.tolist()):
        graph = graphs[prompt]
        cyclic = not nx.is_directed_acyclic_graph(graph)
        assert bool(report.is_cyclic[k]) == cyclic, prompt
        assert int(report.circular_triads[k]) == directed_triangles(graph), prompt
        assert int(report.num_items[k]) == graph.number_of_nodes()
        assert int(report.tied_pairs[k]) == ties[prompt]
        if not cyclic:
            assert prompt not in report.cycles
            continue
        cycle = report.cycles[prompt]
        assert len(set(cycle)) == len(cycle) >= 3
        for i, j in zip(cycle, cycle[1:] + cycle[:1]):
            assert graph.has_edge(i, j), (prompt, cycle)
        # It starts at the smallest item lying on a cycle (one in a strongly connected component of
        # two or more), and is a shortest cycle through it.
        on_cycles = [x for component in nx.strongly_connected_components(graph) if len(component) > 1
                     for x in component]
        start = min(on_cycles)
        assert cycle[0] == start
        shortest = min(nx.shortest_path_length(graph, j, start) + 1 for j in graph.successors(start)
                       if nx.has_path(graph, j, start))
        assert len(cycle) == shortest
    assert report.num_cyclic_prompts == sum(not nx.is_directed_acyclic_graph(g) for g in graphs.values())


# --- intransitive cycles -------------------------------------------------------------------------------


def test_hand_made_prompts():
    rows = [
        (7, 10, 20, True), (7, 20, 30, True), (7, 30, 10, True),  # 10 ≻ 20 ≻ 30 ≻ 10
        (3, 1, 2, True), (3, 2, 3, True), (3, 1, 3, True),  # a strict order
        (5, 1, 2, True), (5, 3, 2, False), (5, 3, 4, True), (5, 1, 4, False),  # 1 ≻ 2 ≻ 3 ≻ 4 ≻ 1
        (9, 1, 2, True), (9, 2, 1, True), (9, 2, 3, True), (9, 3, 1, True),  # 1, 2 tied: no cycle
        (4, 1, 2, True), (4, 2, 1, True), (4, 1, 2, True), (4, 2, 3, True), (4, 3, 1, True),  # 1 ≻ 2 by 2 to 1
    ]
    report = intransitive_cycles(*judgements(rows))
    assert report.prompts.tolist() == [3, 4, 5, 7, 9]
    assert report.is_cyclic.tolist() == [False, True, True, True, False]
    assert report.circular_triads.tolist() == [0, 1, 0, 1, 0]
    assert report.tied_pairs.tolist() == [0, 0, 0, 0, 1]
    assert report.num_items.tolist() == [3, 3, 4, 3, 3]
    assert report.cycles == {4: [1, 2, 3], 5: [1, 2, 3, 4], 7: [10, 20, 30]}
    assert report.num_cyclic_prompts == 3
    assert_report_matches_networkx(report, rows)


def test_the_smallest_item_on_a_cycle_starts_it():
    # 1 lies on no cycle (it beats everyone); 2 ≻ 3 ≻ 4 ≻ 5 ≻ 2 and the shorter 4 ≻ 5 ≻ 6 ≻ 4.
    rows = [(0, 1, x, True) for x in (2, 3, 4, 5, 6)]
    rows += [(0, 2, 3, True), (0, 3, 4, True), (0, 4, 5, True), (0, 5, 2, True), (0, 5, 6, True), (0, 6, 4, True)]
    report = intransitive_cycles(*judgements(rows))
    assert report.cycles == {0: [2, 3, 4, 5]}
    assert_report_matches_networkx(report, rows)


@settings(max_examples=15)
@given(n=st.integers(3, 14), seed=st.integers(0, 2**16))
def test_complete_tournament_triads_match_kendall_babington_smith(n, seed):
    """Kendall & Babington Smith (1940): c = n(n^2 - 1)/24 - 1/2 sum (s_i - (n - 1)/2)^2; and a
    tournament is cyclic iff c > 0 (Moon 1968)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [(0, i, j, bool(torch.rand(1, generator=gen) < 0.5)) for i, j in itertools.combinations(range(n), 2)]
    report = intransitive_cycles(*judgements(rows))
    scores = [0.0] * n
    for _, i, j, a_won in rows:
        scores[i if a_won else j] += 1
    closed_form = n * (n * n - 1) / 24 - 0.5 * sum((s - (n - 1) / 2) ** 2 for s in scores)
    assert int(report.circular_triads[0]) == closed_form
    assert bool(report.is_cyclic[0]) == (closed_form > 0)


def test_circular_triads_of_a_regular_tournament_reach_the_maximum():
    # n odd, i beats the (n - 1)/2 items after it (mod n): every score is (n - 1)/2, so c is the
    # formula's maximum n(n^2 - 1)/24.
    n = 9
    rows = [(0, i, (i + k) % n, True) for i in range(n) for k in range(1, (n - 1) // 2 + 1)]
    report = intransitive_cycles(*judgements(rows))
    assert int(report.circular_triads[0]) == n * (n * n - 1) // 24


@settings(max_examples=12)
@given(seed=st.integers(0, 2**16), max_items=st.integers(2, 9), repeats=st.integers(1, 3))
def test_random_prompts_match_networkx(seed, max_items, repeats):
    rows = random_judgements(seed, prompts=6, max_items=max_items, max_repeats=repeats)
    if not rows:
        return
    assert_report_matches_networkx(intransitive_cycles(*judgements(rows)), rows)


def test_many_prompts_in_small_batches_match_one_batch(monkeypatch):
    rows = random_judgements(1, prompts=400, max_items=12, density=0.9)
    whole = intransitive_cycles(*judgements(rows))
    assert_report_matches_networkx(whole, rows)
    assert 0 < whole.num_cyclic_prompts < 400
    monkeypatch.setattr(preference_judgements, "_MAX_BATCH_ENTRIES", 300)  # 2 prompts of 12 items a batch
    split = intransitive_cycles(*judgements(rows))
    for name in ("prompts", "is_cyclic", "circular_triads", "num_items", "tied_pairs"):
        torch.testing.assert_close(getattr(split, name), getattr(whole, name), msg=name)
    assert split.cycles == whole.cycles


def test_row_order_and_id_dtype_do_not_matter():
    rows = random_judgements(2, prompts=30, max_items=7)
    prompt, a, b, won = judgements(rows)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))
    shuffled = intransitive_cycles(prompt[order].int(), a[order].int(), b[order], won[order])
    original = intransitive_cycles(prompt, a, b, won)
    assert shuffled.cycles == original.cycles
    assert torch.equal(shuffled.circular_triads, original.circular_triads)
    # Swapping a and b with the outcome flipped is the same judgement.
    swapped = intransitive_cycles(prompt, b, a, ~won)
    assert swapped.cycles == original.cycles and torch.equal(swapped.tied_pairs, original.tied_pairs)


# --- Bradley–Terry ------------------------------------------------------------------------------------


def reference_scores(rows, l2):
    """The penalized log-likelihood -sum_rows log sigma(s_w - s_l) + l2/2 |s|^2 of one prompt,
    minimized by scipy (L-BFGS-B, analytic gradient): item -> score."""
    items = sorted({x for _, a, b, _ in rows for x in (a, b)})
    position = {item: k for k, item in enumerate(items)}
    winners = np.array([position[a if a_won else b] for _, a, b, a_won in rows])
    losers = np.array([position[b if a_won else a] for _, a, b, a_won in rows])

    def objective(s):
        d = s[winners] - s[losers]
        value = np.logaddexp(0.0, -d).sum() + 0.5 * l2 * s @ s
        weight = 1.0 / (1.0 + np.exp(d))  # d/dd of -log sigma(d) is -sigma(-d)
        grad = l2 * s
        np.add.at(grad, winners, -weight)
        np.add.at(grad, losers, weight)
        return value, grad

    result = scipy_optimize.minimize(objective, np.zeros(len(items)), jac=True, method="L-BFGS-B",
                                     options=dict(gtol=1e-12, ftol=1e-15, maxiter=10_000))
    return dict(zip(items, result.x))


def hunter_mm_scores(rows, iterations=5000):
    """Hunter (2004) eq. (3), the unpenalized MLE: gamma_i <- W_i / sum_j N_ij / (gamma_i + gamma_j),
    then s = log gamma with mean 0 (the gauge)."""
    items = sorted({x for _, a, b, _ in rows for x in (a, b)})
    position = {item: k for k, item in enumerate(items)}
    n = len(items)
    wins = np.zeros((n, n))
    for _, a, b, a_won in rows:
        winner, loser = (a, b) if a_won else (b, a)
        wins[position[winner], position[loser]] += 1
    totals = wins + wins.T
    gamma = np.ones(n)
    for _ in range(iterations):
        gamma = wins.sum(1) / (totals / (gamma[:, None] + gamma[None, :])).sum(1)
        gamma /= np.exp(np.log(gamma).mean())
    s = np.log(gamma)
    return dict(zip(items, s - s.mean()))


def fitted(fit, prompt):
    chosen = fit.item_prompts == prompt
    return dict(zip(fit.items[chosen].tolist(), fit.scores[chosen].tolist()))


def by_prompt(rows):
    grouped = {}
    for row in rows:
        grouped.setdefault(row[0], []).append(row)
    return grouped


@pytest.mark.parametrize("l2", [1e-2, 1.0])
def test_scores_match_scipy_on_the_same_objective(l2):
    rows = random_judgements(3, prompts=12, max_items=8, max_repeats=3)
    fit = bradley_terry_fit(*judgements(rows), l2=l2)
    assert bool(fit.converged.all())
    for prompt, prompt_rows in by_prompt(rows).items():
        want = reference_scores(prompt_rows, l2)
        got = fitted(fit, prompt)
        assert set(got) == set(want)
        torch.testing.assert_close(torch.tensor([got[i] for i in want], dtype=torch.float64),
                                   torch.tensor(list(want.values()), dtype=torch.float64), rtol=0, atol=1e-6)
        assert abs(sum(got.values())) < 1e-9  # the gauge: mean 0 per prompt


def test_small_l2_tends_to_hunters_mle():
    # Every pair judged both ways at least once: the comparison graph is strongly connected, so the
    # MLE exists (Hunter 2004, Assumption 1) and the penalized fit tends to it as l2 -> 0.
    gen = torch.Generator().manual_seed(4)
    rows = []
    for prompt in range(5):
        for i, j in itertools.combinations(range(6), 2):
            rows += [(prompt, i, j, True), (prompt, i, j, False)]
            rows += [(prompt, i, j, bool(torch.rand(1, generator=gen) < 0.3)) for _ in range(3)]
    fit = bradley_terry_fit(*judgements(rows), l2=1e-9)
    for prompt, prompt_rows in by_prompt(rows).items():
        want = hunter_mm_scores(prompt_rows)
        got = fitted(fit, prompt)
        torch.testing.assert_close(torch.tensor([got[i] for i in want], dtype=torch.float64),
                                   torch.tensor(list(want.values()), dtype=torch.float64), rtol=0, atol=1e-6)


def test_unexplained_fraction():
    rows = [
        (0, 1, 2, True), (0, 2, 3, True), (0, 1, 3, True), (0, 3, 4, True),  # a strict order: 0
        (1, 1, 2, True), (1, 2, 3, True), (1, 3, 1, True),  # a 3-cycle judged once each: equal scores, 1
        # 1 ≻ 2 and 2 ≻ 3 twice each, 3 ≻ 1 once: the fit orders 1, 2, 3 and leaves 3 ≻ 1 unexplained, 1/5
        (2, 1, 2, True), (2, 1, 2, True), (2, 2, 3, True), (2, 2, 3, True), (2, 3, 1, True),
    ]
    fit = bradley_terry_fit(*judgements(rows))
    cycle_scores = fitted(fit, 2)
    assert cycle_scores[1] > cycle_scores[2] > cycle_scores[3]
    torch.testing.assert_close(fit.unexplained_fraction, torch.tensor([0.0, 1.0, 1 / 5], dtype=torch.float64))
    torch.testing.assert_close(fit.scores[fit.item_prompts == 1], torch.zeros(3, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    assert (fit.judgement_margins[:4] > 0).all()


@settings(max_examples=8)
@given(seed=st.integers(0, 2**16), l2=st.sampled_from([1e-3, 1e-1, 10.0]))
def test_margins_and_unexplained_fraction_follow_the_reference_scores(seed, l2):
    rows = random_judgements(seed, prompts=5, max_items=6, max_repeats=2)
    if not rows:
        return
    fit = bradley_terry_fit(*judgements(rows), l2=l2)
    references = {prompt: reference_scores(prompt_rows, l2) for prompt, prompt_rows in by_prompt(rows).items()}
    margins = torch.tensor([references[p][a] - references[p][b] if won else references[p][b] - references[p][a]
                            for p, a, b, won in rows], dtype=torch.float64)
    torch.testing.assert_close(fit.judgement_margins, margins, rtol=0, atol=1e-6)
    # The reference's reading: a margin within the comparison's accuracy of 0 is a tie (equal scores by
    # symmetry), one clearly below 0 a judgement the fit contradicts.
    unexplained = (margins < 1e-5).double()
    prompt_of = torch.tensor([p for p, *_ in rows])
    for k, prompt in enumerate(fit.prompts.tolist()):
        torch.testing.assert_close(fit.unexplained_fraction[k], unexplained[prompt_of == prompt].mean())


def test_separable_prompts_stay_finite_and_batches_are_independent(monkeypatch):
    chain = [(0, i, j, True) for i, j in itertools.combinations(range(10), 2)]  # 0 ≻ 1 ≻ ... ≻ 9
    other = random_judgements(5, prompts=20, max_items=10)
    fit = bradley_terry_fit(*judgements(chain + other))
    assert bool(fit.converged.all()) and torch.isfinite(fit.scores).all()
    chain_scores = fit.scores[fit.item_prompts == 0]
    assert (chain_scores[:-1] > chain_scores[1:]).all() and float(fit.unexplained_fraction[0]) == 0.0
    alone = bradley_terry_fit(*judgements(chain))
    torch.testing.assert_close(alone.scores, chain_scores, rtol=0, atol=1e-9)
    monkeypatch.setattr(preference_judgements, "_MAX_BATCH_ENTRIES", 1)  # one prompt per batch
    split = bradley_terry_fit(*judgements(chain + other))
    torch.testing.assert_close(split.scores, fit.scores, rtol=0, atol=1e-9)


def test_too_few_iterations_say_so():
    rows = [(0, i, j, True) for i, j in itertools.combinations(range(6), 2)]
    assert not bool(bradley_terry_fit(*judgements(rows), max_iterations=1).converged[0])
    assert bool(bradley_terry_fit(*judgements(rows), max_iterations=100).converged[0])


# --- datasets -----------------------------------------------------------------------------------------


def test_dataset_in_trl_preference_format():
    from datasets import Dataset

    conversation = [{"role": "user", "content": "Which colour?"}]
    dataset = Dataset.from_dict({
        "prompt": ["p", "p", "p", "q", "q", "q"],
        "chosen": ["x", "y", "z", "x", "y", "x"],
        "rejected": ["y", "z", "x", "y", "z", "z"],
        "extra": [conversation] * 6,
    })
    data = judgements_from_dataset(dataset)
    assert data.prompt_values == ["p", "q"] and data.item_values == ["x", "y", "z"]
    assert bool(data.judgements.a_won.all()) and data.judgements.prompt_ids.dtype == torch.int64
    report = intransitive_cycles(*data.judgements)
    assert report.is_cyclic.tolist() == [True, False]
    assert [data.item_values[i] for i in report.cycles[0]] == ["x", "y", "z"]
    fit = bradley_terry_fit(*data.judgements)
    torch.testing.assert_close(fit.unexplained_fraction, torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_dataset_with_a_winner_column_and_conversations():
    from datasets import Dataset

    def turn(text):
        return [{"role": "assistant", "content": text}]

    dataset = Dataset.from_dict({
        "question": [turn("q")] * 3,
        "left": [turn("a"), turn("b"), turn("a")],
        "right": [turn("b"), turn("c"), turn("c")],
        "left_won": [True, True, False],  # a ≻ b ≻ c ≻ a
    })
    data = judgements_from_dataset(dataset, prompt_column="question", a_column="left", b_column="right",
                                   a_won_column="left_won")
    assert data.judgements.a_won.tolist() == [True, True, False]
    assert data.item_values == [turn("a"), turn("b"), turn("c")]
    report = intransitive_cycles(*data.judgements)
    assert report.cycles == {0: [0, 1, 2]}


# --- argument errors ----------------------------------------------------------------------------------

P, A, B, W = judgements([(0, 1, 2, True), (0, 2, 3, False)])


@pytest.mark.parametrize("fn", [intransitive_cycles, bradley_terry_fit])
@pytest.mark.parametrize("args,error,pattern", [
    ((P.tolist(), A, B, W), TypeError, r"^prompt_ids: expected a torch.Tensor"),
    ((P.float(), A, B, W), TypeError, r"^prompt_ids: expected an int64 or int32"),
    ((P, A.unsqueeze(0), B, W), ValueError, r"^item_a: expected a 1-d tensor"),
    ((P, A, B[:1], W), ValueError, r"^item_b: expected shape \(2,\)"),
    ((P, A, B.to("meta"), W), ValueError, r"^item_b: expected a tensor on cpu"),
    ((P, A, B, W.long()), TypeError, r"^a_won: expected a bool tensor"),
    ((P, A, A, W), ValueError, r"^item_b: an item judged against itself"),
    ((P[:0], A[:0], B[:0], W[:0]), ValueError, r"^prompt_ids: no judgement"),
])
def test_bad_judgements_are_named(fn, args, error, pattern):
    with pytest.raises(error, match=pattern):
        fn(*args)


@pytest.mark.parametrize("kwargs,error,pattern", [
    (dict(l2=0.0), ValueError, r"^l2: expected a finite number > 0"),
    (dict(l2=math.nan), ValueError, r"^l2:"),
    (dict(l2="1"), TypeError, r"^l2: expected a number"),
    (dict(max_iterations=0), ValueError, r"^max_iterations: expected an int >= 1"),
    (dict(max_iterations=2.0), TypeError, r"^max_iterations: expected an int"),
    (dict(tolerance=-1e-9), ValueError, r"^tolerance: expected a finite number > 0"),
])
def test_bad_fit_options_are_named(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        bradley_terry_fit(P, A, B, W, **kwargs)


def test_bad_dataset_arguments_are_named():
    from datasets import Dataset

    dataset = Dataset.from_dict({"prompt": ["p"], "chosen": ["x"], "rejected": ["y"], "won": [1]})
    with pytest.raises(TypeError, match=r"^dataset: expected a datasets.Dataset"):
        judgements_from_dataset([{"prompt": "p"}])
    with pytest.raises(ValueError, match=r"^prompt_column: 'question' is not a column"):
        judgements_from_dataset(dataset, prompt_column="question")
    with pytest.raises(TypeError, match=r"^b_column: expected a column name"):
        judgements_from_dataset(dataset, b_column=1)
    with pytest.raises(TypeError, match=r"^a_won_column: expected bool values"):
        judgements_from_dataset(dataset, a_won_column="won")
    with pytest.raises(ValueError, match=r"^dataset: no rows"):
        judgements_from_dataset(dataset.select([]))
