"""How long a job queued now would wait: what a refusal for a full queue tells its caller.

The jobs ahead drain at the model's live capacity over the mean job time (Little's law): a
job that would be `position`-th in line starts after about position x mean / capacity
seconds. Capacity is the sequences the model's live workers run at most (their
WORKER_MAX_CONCURRENCY, which they advertise in the engine registry); the mean job time is a
moving average of the engine time (prompt_time + completion_time) of the calls this gateway
saw finish. Until both are known there is no estimate, and refusals say only the position.
It is a lower bound where jobs run several choices (n > 1 takes n sequences), where jobs placed
on a worker's own stream wait too, and for flex jobs (on_demand ones go first, and workers keep
WORKER_FLEX_RESERVE sequences from them).
"""

import math

# Weight of the newest job in the moving average: about the last 20 jobs count.
_WEIGHT = 0.1


class WaitEstimator:
    def __init__(self) -> None:
        self._capacity: dict[str, int] = {}  # model -> sequences its live workers run at most
        self._mean_seconds: dict[str, float] = {}  # model -> moving average of a job's engine time

    def set_capacity(self, model: str, sequences: int) -> None:
        self._capacity[model] = sequences

    def job_finished(self, model: str, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            return
        mean = self._mean_seconds.get(model)
        self._mean_seconds[model] = seconds if mean is None else mean + _WEIGHT * (seconds - mean)

    def wait_seconds(self, model: str, position: int) -> float | None:
        """Seconds until the `position`-th job in line starts (1: next); None while unknown."""
        capacity = self._capacity.get(model, 0)
        mean = self._mean_seconds.get(model)
        if capacity <= 0 or mean is None:
            return None
        return position * mean / capacity
