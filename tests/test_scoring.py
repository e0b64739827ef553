"""scoring: a batch that mixes subjects and tasks is scored per slice exactly as each subject's stack is, so
validation (batches) and evaluation (stacks) give the same per-slice numbers."""

import numpy as np

from medgan.scoring import score_slices, score_subject


def test_a_mixed_batch_scores_each_slice_as_its_subjects_stack_does():
    rng = np.random.default_rng(0)
    pred, target = rng.random((6, 32, 32)), rng.random((6, 32, 32))
    mask = np.zeros((6, 32, 32), bool)
    mask[:, 4:28, 6:30] = True
    mask[3] = False  # an empty slice scores NaN in both
    seg = np.zeros((6, 32, 32), np.uint8)
    seg[:, 10:16, 10:16] = 2
    subjects, tasks = ["a", "b", "a", "b", "a", "b"], ["->flair", "->t2"] * 3
    slices = np.array([10, 20, 11, 21, 12, 22])
    batch = score_slices("model", tasks, subjects, slices, pred, target, mask, seg)
    expected = []
    for subject, task in (("a", "->flair"), ("b", "->t2")):
        rows = [i for i, s in enumerate(subjects) if s == subject]
        stack_rows, _ = score_subject(
            "model", task, subject, slices[rows], pred[rows], target[rows], mask[rows], seg[rows]
        )
        expected.extend(stack_rows)
    key = lambda row: (row.subject, row.region, row.slice)  # noqa: E731
    assert len(batch) == 6 * 3
    for got, want in zip(sorted(batch, key=key), sorted(expected, key=key)):
        assert got.to_dict().keys() == want.to_dict().keys()
        for name, value in want.to_dict().items():
            assert got.to_dict()[name] == value or (
                value != value and got.to_dict()[name] != got.to_dict()[name]
            )
