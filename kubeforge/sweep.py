"""A SweepJob's search, by Optuna: which trial comes next, whether a running one is pruned, which is best.

Pure functions of the sweep's spec and its trials as its status records them: the study is rebuilt in
Optuna's in-memory storage each time (no database), so the operator (or `kubeforge run`) may restart
at any point and decide the same. Decisions are deterministic:

- trial N's parameters are asked of a sampler seeded with (seed, N), over a study of trials 0..N-1, of
  which only those numbered N - parallelism and below, all finished by then (`can_ask`), are told
  their results: the later ones are still running, and count only as running (no values). So trial
  N's parameters depend on the seed and the outcomes of the trials before it, not on timing;
- trial N is judged by the pruner against the same finished trials, at each evaluation step it reports.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from kubeforge.spec import SweepParameter, SweepSpec
from kubeforge.status import BestTrial, IntermediateValue, SweepStatus, TrialStatus

#: How a trial's state in status reads in Optuna.
STATES = {"Running": TrialState.RUNNING, "Succeeded": TrialState.COMPLETE, "Pruned": TrialState.PRUNED,
          "Failed": TrialState.FAIL}

# Optuna logs every trial it is told of at INFO: the sweep rebuilds its study at each decision.
optuna.logging.set_verbosity(optuna.logging.WARNING)
logging.getLogger("optuna").setLevel(logging.WARNING)


def distribution(parameter: SweepParameter) -> BaseDistribution:
    """The parameter's Optuna distribution. A choice is asked by index, so its values may be any JSON
    (lists, objects) and not only the scalars Optuna's categorical distribution takes."""
    if parameter.values is not None:
        return CategoricalDistribution(list(range(len(parameter.values))))
    assert parameter.low is not None and parameter.high is not None
    if parameter.type == "int":
        return IntDistribution(int(parameter.low), int(parameter.high), log=parameter.log,
                               step=int(parameter.step or 1))
    return FloatDistribution(parameter.low, parameter.high, log=parameter.log, step=parameter.step)


def _grid(parameter: SweepParameter) -> list[Any]:
    if parameter.values is not None:
        return list(range(len(parameter.values)))
    assert parameter.low is not None and parameter.high is not None and (parameter.step or parameter.type == "int")
    step = parameter.step or 1
    count = int((parameter.high - parameter.low) // step) + 1
    points = [parameter.low + i * step for i in range(count)]
    return [int(p) for p in points] if parameter.type == "int" else points


def capacity(spec: SweepSpec) -> int:
    """The trials the sweep runs: maxTrials, or fewer when a grid has fewer points."""
    if spec.algorithm != "grid":
        return spec.max_trials
    points = 1
    for parameter in spec.parameters:
        points *= len(_grid(parameter))
    return min(spec.max_trials, points)


def _sampler(spec: SweepSpec, number: int) -> optuna.samplers.BaseSampler:
    seed = (spec.seed * 1_000_003 + number) % 2**32
    if spec.algorithm == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.startup_trials)
    if spec.algorithm == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=spec.startup_trials,
                                            independent_sampler=optuna.samplers.RandomSampler(seed=seed))
    if spec.algorithm == "grid":
        # The seed shuffles the grid's points, which the trials' grid ids index: the same for every trial.
        return optuna.samplers.GridSampler({p.path: _grid(p) for p in spec.parameters}, seed=spec.seed)
    return optuna.samplers.RandomSampler(seed=seed)


def _pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    if spec.early_stopping == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials, n_warmup_steps=0)
    if spec.early_stopping == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def _optuna_params(spec: SweepSpec, parameters: dict[str, Any]) -> dict[str, Any]:
    return {p.path: p.values.index(parameters[p.path]) if p.values is not None else parameters[p.path]
            for p in spec.parameters}


def _frozen(spec: SweepSpec, trial: TrialStatus, told: bool) -> FrozenTrial:
    """The trial as Optuna knows it; `told` False: running, its results not yet counted."""
    state = STATES[trial.state] if told else TrialState.RUNNING
    return optuna.trial.create_trial(
        state=state, value=trial.value if state == TrialState.COMPLETE else None,
        params=_optuna_params(spec, trial.parameters),
        distributions={p.path: distribution(p) for p in spec.parameters},
        intermediate_values={i.step: i.value for i in trial.intermediate} if told else None,
        system_attrs=dict(trial.optuna))


def _study(spec: SweepSpec, trials: list[TrialStatus], number: int) -> optuna.Study:
    """The study as trial `number` may see it: trials numbered number - parallelism and below told."""
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), sampler=_sampler(spec, number),
                                pruner=_pruner(spec), direction=spec.objective.direction)
    for trial in trials:
        study.add_trial(_frozen(spec, trial, told=trial.number <= number - spec.parallelism))
    return study


def can_ask(spec: SweepSpec, trials: list[TrialStatus]) -> bool:
    """Whether the next trial may start: trials remain, a slot is free, and the trials it will be
    told of (numbered parallelism below it and lower) have all finished."""
    number = len(trials)
    running = sum(not t.finished for t in trials)
    return (number < capacity(spec) and running < spec.parallelism
            and all(t.finished for t in trials[:max(0, number - spec.parallelism + 1)]))


def ask(spec: SweepSpec, trials: list[TrialStatus], name: str) -> TrialStatus:
    """The next trial (number len(trials)), Running, with the parameters the sampler asks for."""
    number = len(trials)
    study = _study(spec, trials, number)
    asked = study.ask({p.path: distribution(p) for p in spec.parameters})
    values = {p.path: p.values[asked.params[p.path]] if p.values is not None else asked.params[p.path]
              for p in spec.parameters}
    attributes = study.trials[-1].system_attrs
    return TrialStatus(number=number, name=name, parameters=values, state="Running", optuna=dict(attributes))


def should_prune(spec: SweepSpec, trials: list[TrialStatus], number: int) -> tuple[bool, dict[str, Any]]:
    """Whether the pruner stops running trial `number` at its latest intermediate value, against the
    finished trials it was told of; and Optuna's attributes of the trial after judging (halving's rungs)."""
    trial = trials[number]
    if spec.early_stopping == "none" or not trial.intermediate:
        return False, dict(trial.optuna)
    earlier = [t for t in trials if t.number <= number - spec.parallelism]
    study = _study(spec, [], number)
    for other in earlier:
        study.add_trial(_frozen(spec, other, told=True))
    study.add_trial(_frozen(spec, trial.model_copy(update={"state": "Running"}), told=True))
    pruned = bool(study.pruner.prune(study, study.trials[-1]))
    return pruned, dict(study.trials[-1].system_attrs)


def best(spec: SweepSpec, trials: list[TrialStatus]) -> TrialStatus | None:
    """The succeeded trial with the best value; the lowest number among equals."""
    done = [t for t in trials if t.state == "Succeeded" and t.value is not None]
    if not done:
        return None
    sign = -1.0 if spec.objective.direction == "maximize" else 1.0
    return min(done, key=lambda t: (sign * (t.value or 0.0), t.number))


def with_evaluation(spec: SweepSpec, trial: TrialStatus, step: int | None, metrics: dict[str, float] | None
                    ) -> TrialStatus:
    """The trial with the objective at its evaluation at `step` recorded (once per step)."""
    value = (metrics or {}).get(spec.objective.eval_name)
    if step is None or value is None or any(i.step == step for i in trial.intermediate):
        return trial
    return trial.model_copy(update={"intermediate": [*trial.intermediate, IntermediateValue(step=step, value=value)],
                                    "step": step})


def ended(spec: SweepSpec, trial: TrialStatus, final_eval: dict[str, float], step: int | None,
          export_uri: str | None) -> TrialStatus:
    """The trial once its job succeeded: Succeeded with the objective, or Failed if it never reported it."""
    value = final_eval.get(spec.objective.eval_name)
    if value is None:
        return trial.model_copy(update={"state": "Failed", "reason": "NoObjective", "step": step,
                                        "message": f"the trial reported no {spec.objective.metric}"})
    return trial.model_copy(update={"state": "Succeeded", "reason": "Completed", "value": value, "step": step,
                                    "export_uri": export_uri, "message": f"{spec.objective.metric} {value:.4f}"})


def summary(spec: SweepSpec, trials: list[TrialStatus], status: SweepStatus) -> SweepStatus:
    """The status over these trials: counts, the best trial, and the phase (the reason and message
    of a finished sweep; conditions and times are the caller's)."""
    done = sum(t.finished for t in trials)
    failed = sum(t.state == "Failed" for t in trials)
    top = best(spec, trials)
    updated = status.model_copy(update={
        "trials": trials, "trials_done": done, "trials_progress": f"{done}/{capacity(spec)}",
        "pruned_trials": sum(t.state == "Pruned" for t in trials), "failed_trials": failed,
        "best_value": top.value if top else None,
        "best_trial": BestTrial(name=top.name, number=top.number, parameters=top.parameters,
                                value=top.value, export_uri=top.export_uri) if top and top.value is not None else None,
    })
    if failed > spec.max_failed_trials:
        message = f"{failed} trials failed (maxFailedTrials {spec.max_failed_trials})"
        return updated.model_copy(update={"phase": "Failed", "reason": "TooManyFailedTrials", "message": message})
    if len(trials) >= capacity(spec) and done == len(trials):
        if top is None:
            return updated.model_copy(update={"phase": "Failed", "reason": "NoSuccessfulTrial",
                                              "message": f"none of {done} trials succeeded"})
        return updated.model_copy(update={"phase": "Succeeded", "reason": "Completed",
                                          "message": f"best {spec.objective.metric} {top.value:.4f} by {top.name}"})
    return updated.model_copy(update={"phase": "Running" if trials else "Pending", "reason": "Searching",
                                      "message": f"{done} of {capacity(spec)} trials done"})
