"""The search engine: Optuna over a study rebuilt from the sweep's status, deterministic by seed."""

from __future__ import annotations

import copy
from typing import Any

from support.jobs import example

from kubeforge import sweep
from kubeforge.spec import SweepSpec, parse_sweep
from kubeforge.status import IntermediateValue, TrialStatus

EXAMPLE = example("sweep-lora-classify.yaml")[1]


def spec(**changes: Any) -> SweepSpec:
    document = copy.deepcopy(EXAMPLE)
    document["spec"].update({"objective": {"metric": "eval.accuracy", "direction": "maximize"}, **changes})
    return parse_sweep(document).spec


def finished(trial: TrialStatus, value: float, curve: list[float], state: str = "Succeeded") -> TrialStatus:
    intermediate = [IntermediateValue(step=30 * (i + 1), value=v) for i, v in enumerate(curve)]
    return trial.model_copy(update={"state": state, "value": value if state == "Succeeded" else None,
                                    "intermediate": intermediate})


def run(search: SweepSpec, outcome: Any, count: int) -> list[TrialStatus]:
    """`count` trials asked one after another, each finished with outcome(parameters)."""
    trials: list[TrialStatus] = []
    for number in range(count):
        asked = sweep.ask(search, trials, f"s-t{number}")
        trials.append(finished(asked, outcome(asked.parameters), [outcome(asked.parameters)]))
    return trials


def accuracy(parameters: dict[str, Any]) -> float:
    return 1.0 - abs(parameters["training.learningRate"] - 0.003) * 50 - abs(parameters["lora.r"] - 8) / 100


def test_the_same_seed_asks_the_same_trials_and_another_seed_others() -> None:
    first = run(spec(), accuracy, 5)
    again = run(spec(), accuracy, 5)
    other = run(spec(seed=8), accuracy, 5)
    assert [t.parameters for t in first] == [t.parameters for t in again]
    assert [t.parameters for t in first] != [t.parameters for t in other]
    for trial in first:
        assert 1e-3 <= trial.parameters["training.learningRate"] <= 3e-2
        assert trial.parameters["lora.r"] in (2, 4, 8, 16)


def test_a_study_rebuilt_from_status_asks_what_it_asked_before() -> None:
    trials = run(spec(), accuracy, 5)
    for number in range(5):
        # A restarted operator has only the status: the first `number` trials, as JSON.
        recorded = [TrialStatus.model_validate(t.to_json()) for t in trials[:number]]
        assert sweep.ask(spec(), recorded, f"s-t{number}").parameters == trials[number].parameters


def test_trial_n_does_not_depend_on_the_trials_still_running_before_it() -> None:
    search = spec(parallelism=2)
    zero = sweep.ask(search, [], "s-t0")
    one = sweep.ask(search, [zero], "s-t1")
    assert not sweep.can_ask(search, [zero, one])  # both slots taken
    done_zero = finished(zero, 0.7, [0.7])
    assert sweep.can_ask(search, [done_zero, one])
    two = sweep.ask(search, [done_zero, one], "s-t2")
    # Trial 1 finishing first, with any result, changes nothing of trial 2's: it is told only of trial 0.
    assert not sweep.can_ask(search, [zero, finished(one, 0.9, [0.9])])
    assert sweep.ask(search, [done_zero, finished(one, 0.1, [0.1])], "s-t2").parameters == two.parameters


def test_tpe_after_its_startup_trials_asks_near_the_best_more_than_random_does() -> None:
    def distance(trials: list[TrialStatus]) -> float:
        later = trials[4:]
        return sum(abs(t.parameters["training.learningRate"] - 0.003) for t in later) / len(later)

    assert distance(run(spec(), accuracy, 16)) < distance(run(spec(algorithm="random"), accuracy, 16))


def test_the_median_pruner_stops_a_trial_below_the_median_of_finished_ones_at_that_step() -> None:
    search = spec(earlyStopping="median", startupTrials=2)
    trials = [finished(sweep.ask(search, [], "s-t0"), 0.8, [0.6, 0.8])]
    trials.append(finished(sweep.ask(search, trials, "s-t1"), 0.7, [0.5, 0.7]))
    running = sweep.ask(search, trials, "s-t2")
    poor = running.model_copy(update={"intermediate": [IntermediateValue(step=30, value=0.3)]})
    good = running.model_copy(update={"intermediate": [IntermediateValue(step=30, value=0.65)]})
    assert sweep.should_prune(search, [*trials, poor], 2)[0]
    assert not sweep.should_prune(search, [*trials, good], 2)[0]
    # Before startupTrials have succeeded, nothing is pruned.
    assert not sweep.should_prune(search, [trials[0], poor.model_copy(update={"number": 1})], 1)[0]
    assert not sweep.should_prune(spec(earlyStopping="none"), [*trials, poor], 2)[0]


def test_successive_halving_keeps_its_rungs_in_the_trials_attributes() -> None:
    search = spec(earlyStopping="successive-halving")
    trials = [finished(sweep.ask(search, [], "s-t0"), 0.8, [0.8])]
    running = sweep.ask(search, trials, "s-t1").model_copy(
        update={"intermediate": [IntermediateValue(step=30, value=0.2)]})
    pruned, attributes = sweep.should_prune(search, [*trials, running], 1)
    assert any(key.startswith("completed_rung_") for key in attributes)
    assert isinstance(pruned, bool)


def test_grid_visits_each_point_once_and_stops_at_the_grid_size() -> None:
    search = spec(algorithm="grid", maxTrials=10, parameters=[
        {"path": "training.learningRate", "type": "float", "low": 0.001, "high": 0.003, "step": 0.001},
        {"path": "lora.r", "type": "choice", "values": [4, 8]}])
    assert sweep.capacity(search) == 6
    trials = run(search, accuracy, 6)
    points = {(round(t.parameters["training.learningRate"], 6), t.parameters["lora.r"]) for t in trials}
    assert len(points) == 6
    assert not sweep.can_ask(search, trials)


def test_cmaes_asks_within_bounds() -> None:
    search = spec(algorithm="cmaes", parameters=[
        {"path": "training.learningRate", "type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        {"path": "lora.r", "type": "int", "low": 2, "high": 16}])
    for trial in run(search, lambda p: -abs(p["lora.r"] - 8), 5):
        assert 2 <= trial.parameters["lora.r"] <= 16 and isinstance(trial.parameters["lora.r"], int)


def test_the_best_trial_by_direction_the_lowest_number_among_equals() -> None:
    base = sweep.ask(spec(), [], "s-t0")
    trials = [finished(base.model_copy(update={"number": n, "name": f"s-t{n}"}), v, [v])
              for n, v in enumerate([0.6, 0.9, 0.9, 0.2])]
    trials.append(finished(base.model_copy(update={"number": 4}), 0.99, [0.99], state="Pruned"))
    assert sweep.best(spec(), trials).number == 1  # type: ignore[union-attr]
    minimizing = spec(objective={"metric": "eval.loss", "direction": "minimize"})
    assert sweep.best(minimizing, trials).number == 3  # type: ignore[union-attr]
    assert sweep.best(spec(), []) is None
