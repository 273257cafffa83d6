"""lm_eval scoring for the local esdllm task (tests/test_lmeval.py): the task's own checker, so a
valid permutation counts as it does in `esdllm eval`."""


def process_results(doc, results):
    from esdllm.runtime import task
    return {"acc": float(bool(task.grade(doc["prompt"], results[0])))}
