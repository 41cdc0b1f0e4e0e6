"""PrivacyBudget: what differentially private jobs may spend on each of the silo's datasets, and what they spent.

`privacy_budget` in silo.yaml gives a dataset an (epsilon, delta) budget and, optionally, `require_dp`. Each trained
round of a job with DP (noise multiplier above 0) is one release of the Gaussian mechanism on every dataset the round
trained on: local DP is the silo's own noise, central DP the coordinator's noise on the mean, at the same cost to
each silo (fedmeki_core/privacy/dp.py). The round is charged in the agent's state in the transaction that records
its delta, so a job that ends early has paid for the rounds it trained and no more, and a round trained again after
a crash is charged once. What a dataset has spent is every charged round of every job composed by the project's
accountant (Renyi DP, summed per order) and read at the budget's delta. Before a round trains, the job's declared
spend (its rounds from this one to its last, as if the silo took part in all) is added: over the budget, the round
is declined with the figures. A job without DP, or with noise multiplier 0, has no guarantee to account: it is not
charged, and is declined on a dataset with `require_dp`. A statistics job with Gaussian noise is charged its two
rounds at its noise multiplier; one with Laplace noise, which this accountant does not model, is declined on any
dataset with a budget.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from fedmeki_core.privacy.dp import composed_epsilon
from fedmeki_core.records import RoundTask
from fedmeki_core.tasks import training_tasks
from silo_agent.settings import DatasetBudget
from silo_agent.state import AgentState, Charge, LedgerEntry

REPORT_DELTA = 1e-5  # the delta at which `budget` shows a dataset's spend when silo.yaml sets it no budget


@dataclass(frozen=True)
class Release:
    """How a trained round's update is noised, as the accountant sees it (the task's workload says)."""

    mode: str = ""  # "local" or "central" DP, or "statistics" (a statistics job's own noise); "": no noise
    noise_multiplier: float = 0.0  # of the Gaussian mechanism
    unaccounted: str = ""  # noise this accountant does not model, said in a decline (a statistics job's Laplace)


class PrivacyBudget:
    """The budgets of silo.yaml over the ledger of the agent's state."""

    def __init__(self, budgets: Mapping[str, DatasetBudget], datasets: Collection[str], state: AgentState) -> None:
        self._budgets = budgets
        self._datasets = datasets
        self._state = state

    def refusal(self, task: RoundTask, release: Release) -> str | None:
        """Why this silo declines to train the task's round (one line with the figures), or None to train it."""
        for dataset in self._trained_on(task):
            budget = self._budgets.get(dataset)
            if budget is None:
                continue
            if release.unaccounted:
                return (
                    f"dataset {dataset!r} has a privacy budget, and its ledger accounts Gaussian noise only: "
                    f"{release.unaccounted}"
                )
            if not release.mode:
                if budget.require_dp:
                    dp = task.spec.privacy.dp
                    has = "noise multiplier 0" if dp is not None else "no differential privacy"
                    return (
                        f"dataset {dataset!r} requires differential privacy (require_dp in the silo's privacy_budget) "
                        f"and job {task.job_id} has {has}"
                    )
                continue
            mode, noise_multiplier = release.mode, release.noise_multiplier
            spent = self._state.ledger(dataset)
            own = next((e for e in spent if e.job_id == task.job_id), None)
            remaining = task.spec.rounds - task.round + (0 if own is not None and own.last_round >= task.round else 1)
            before = _epsilon(spent, budget.delta)
            alone = composed_epsilon([(noise_multiplier, remaining)], budget.delta)
            total = composed_epsilon([*_mechanisms(spent), (noise_multiplier, remaining)], budget.delta)
            if total > budget.epsilon:
                return (
                    f"privacy budget of dataset {dataset!r} exceeded: job {task.job_id} declares {remaining} more "
                    f"round(s) of {mode} DP at noise multiplier {noise_multiplier:g}, epsilon {alone:.3f} alone; with "
                    f"the {before:.3f} already spent the total would be epsilon {total:.3f}, over the budget of "
                    f"{budget.epsilon:g} at delta {budget.delta:g} ({budget.epsilon - before:.3f} left)"
                )
        return None

    def charges(self, task: RoundTask, release: Release) -> list[Charge]:
        """What training the task's round spends: one release on each dataset it trains on (none without DP)."""
        if not release.mode:
            return []
        return [
            Charge(d, task.job_id, task.round, release.mode, release.noise_multiplier) for d in self._trained_on(task)
        ]

    def _trained_on(self, task: RoundTask) -> list[str]:
        return [name for name in training_tasks(task.spec.task) if name in self._datasets]


def _mechanisms(entries: list[LedgerEntry]) -> list[tuple[float, int]]:
    return [(e.noise_multiplier, e.rounds) for e in entries]


def _epsilon(entries: list[LedgerEntry], delta: float) -> float:
    return composed_epsilon(_mechanisms(entries), delta)


def ledger_report(state: AgentState, budgets: Mapping[str, DatasetBudget]) -> list[str]:
    """`fedmeki-silo budget`: per dataset its budget, what it spent and has left, then what each job spent."""
    entries = state.ledger()
    lines = []
    for dataset in sorted(budgets.keys() | {e.dataset for e in entries}):
        charged = [e for e in entries if e.dataset == dataset]
        budget = budgets.get(dataset)
        delta = budget.delta if budget is not None else REPORT_DELTA
        spent = _epsilon(charged, delta)
        if budget is None:
            head = f"no budget set; spent epsilon {spent:.3f} at delta {delta:g}"
        else:
            head = (
                f"budget epsilon {budget.epsilon:g} at delta {delta:g}{', require_dp' if budget.require_dp else ''}; "
                f"spent {spent:.3f}, left {budget.epsilon - spent:.3f}"
            )
        lines.append(f"dataset {dataset}: {head}")
        lines += [
            f"  job {e.job_id}: {e.mode} DP, noise multiplier {e.noise_multiplier:g}, {e.rounds} round(s) charged "
            f"(last round {e.last_round}, {e.last_charged_at} UTC), epsilon {_epsilon([e], delta):.3f}"
            for e in charged
        ]
    return lines or ["no privacy budget set and nothing charged"]
