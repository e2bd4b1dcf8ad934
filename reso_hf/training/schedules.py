"""The phi learning-rate schedule, registered as `lr_scheduler_type="phi"` (issue 17).

transformers chooses a schedule by `SchedulerType(args.lr_scheduler_type)` and builds it with
`TYPE_TO_SCHEDULER_FUNCTION[type](optimizer, num_warmup_steps=, num_training_steps=, **lr_scheduler_kwargs)`.
`register_phi_schedule()` (run on `import reso_hf`) adds the member PHI = "phi" and its function, so
`TrainingArguments(lr_scheduler_type="phi", lr_scheduler_kwargs={"num_cycles": 3})`, `--lr_scheduler_type phi`
in a recipe and `transformers.get_scheduler("phi", ...)` all work like a built-in schedule.

Multiplier of the peak learning rate at step t (w warm-up steps, S total, n cycles, m = min_lr_ratio):

    t < w:   t / w
    else:    p = t - w, D = S - w, cycle lengths L_k = L_0 phi^k with L_0 = D (phi - 1) / (phi^n - 1)
             (so the n cycles fill D exactly), cycle k starts at s_k = L_0 (phi^k - 1) / (phi - 1),
             tau = (p - s_k) / L_k in [0, 1]:
             phi^(-k) * (m + (1 - m) * (1 + cos(pi tau)) / 2)

Each restart comes back to 1/phi of the previous peak and lasts phi times longer (phi-decay restarts).
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim.lr_scheduler import LambdaLR
from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
from transformers.trainer_utils import SchedulerType

from ..enum_extension import add_enum_member
from ..modeling.crystalline import GOLDEN_RATIO

PHI_SCHEDULE_NAME = "phi"


def phi_schedule_multiplier(step: int, num_warmup_steps: int, num_training_steps: int, num_cycles: int = 3,
                            min_lr_ratio: float = 0.0) -> float:
    """The multiplier of the peak learning rate at `step` (see the module docstring)."""
    if step < num_warmup_steps:
        return step / max(1, num_warmup_steps)
    phi = GOLDEN_RATIO
    decay_steps = max(1, num_training_steps - num_warmup_steps)
    first_length = decay_steps * (phi - 1) / (phi**num_cycles - 1)
    progress = step - num_warmup_steps
    cycle = min(num_cycles - 1, int(math.floor(math.log(1 + progress * (phi - 1) / first_length, phi) + 1e-12)))
    start = first_length * (phi**cycle - 1) / (phi - 1)
    fraction = min(1.0, max(0.0, (progress - start) / (first_length * phi**cycle)))
    return phi**-cycle * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * fraction)))


def get_phi_schedule_with_warmup(optimizer, num_warmup_steps: int, num_training_steps: int, num_cycles: int = 3,
                                 min_lr_ratio: float = 0.0, last_epoch: int = -1) -> LambdaLR:
    """Linear warm-up, then `num_cycles` cosine cycles whose lengths grow and peaks fall by powers of phi."""
    if isinstance(num_cycles, bool) or not isinstance(num_cycles, int) or num_cycles < 1:
        raise ValueError(f"lr_scheduler_kwargs num_cycles={num_cycles!r} is invalid: expected an int >= 1")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"lr_scheduler_kwargs min_lr_ratio={min_lr_ratio!r} is invalid: expected a number in [0, 1]")
    multiplier = partial(phi_schedule_multiplier, num_warmup_steps=num_warmup_steps,
                         num_training_steps=num_training_steps, num_cycles=num_cycles, min_lr_ratio=min_lr_ratio)
    return LambdaLR(optimizer, multiplier, last_epoch)


def register_phi_schedule() -> SchedulerType:
    """Make "phi" a `SchedulerType` with its function in transformers' table (idempotent)."""
    member = add_enum_member(SchedulerType, "PHI", PHI_SCHEDULE_NAME)
    TYPE_TO_SCHEDULER_FUNCTION[member] = get_phi_schedule_with_warmup
    return member
