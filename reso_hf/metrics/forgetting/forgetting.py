"""Forgetting in continual learning: how much the loss on earlier tasks rose after learning later ones.

    metric = evaluate.load(reso_hf.metrics.metric_path("forgetting"))
    metric.compute(task=["en", "es"], loss_before=[2.1, 2.4], loss_after=[2.3, 2.4])
    # {"forgetting": 0.1, "relative_forgetting": 0.0476..., "max_forgetting": 0.2,
    #  "per_task": {"en": 0.2, "es": 0.0}}

forgetting_t = loss_after_t - loss_before_t (nats/token; > 0 means forgotten), averaged over tasks;
relative_forgetting averages forgetting_t / loss_before_t.
"""

import datasets
import evaluate

_DESCRIPTION = "Mean rise of held-out loss on earlier tasks (after - before), absolute and relative."
_KWARGS = """
Args:
    task: name of the task (one entry per task).
    loss_before: held-out loss on the task right after learning it (> 0).
    loss_after: held-out loss on the same data at the end of training.
Returns:
    forgetting, relative_forgetting, max_forgetting, per_task.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Forgetting(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"task": datasets.Value("string"), "loss_before": datasets.Value("float64"),
                                        "loss_after": datasets.Value("float64")}),
        )

    def _compute(self, task, loss_before, loss_after):
        if not task:
            raise ValueError("no tasks given")
        if len(set(task)) != len(task):
            raise ValueError(f"task names must be unique, got {task}")
        if any(before <= 0 for before in loss_before):
            raise ValueError("loss_before must be > 0")
        per_task = {name: after - before for name, before, after in zip(task, loss_before, loss_after)}
        relative = [(after - before) / before for before, after in zip(loss_before, loss_after)]
        return {"forgetting": sum(per_task.values()) / len(task), "relative_forgetting": sum(relative) / len(task),
                "max_forgetting": max(per_task.values()), "per_task": per_task}
