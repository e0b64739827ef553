"""scoring: a batch that mixes subjects and tasks is scored per slice exactly as each subject's stack is, so
validation (batches) and evaluation (stacks) give the same per-slice numbers."""

import numpy as np

from medgan import metrics
from medgan.scoring import VOLUME_METRICS, score_slices, score_subject


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


def test_each_region_of_a_volume_gets_its_through_plane_metrics():
    rng = np.random.default_rng(2)
    pred, target = rng.random((12, 16, 16)), rng.random((12, 16, 16))
    mask = np.zeros(pred.shape, bool)
    mask[1:11, 2:14, 2:14] = True
    seg = np.zeros(pred.shape, np.uint8)
    seg[4:8, 5:9, 5:9] = 1
    _, volumes = score_subject("model", "->flair", "a", np.arange(12), pred, target, mask, seg)
    by_region = {row.region: row for row in volumes}
    regions = {"brain": mask, "tumour": mask & (seg > 0), "non_tumour": mask & (seg == 0)}
    assert set(by_region) == set(regions)
    for region, region_mask in regions.items():
        row = by_region[region]
        assert row.through_plane_error == metrics.through_plane_error(pred, target, region_mask)
        assert row.ssim_sagittal == metrics.plane_ssim(pred, target, "sagittal", region_mask)
        assert row.ssim_coronal == metrics.plane_ssim(pred, target, "coronal", region_mask)
    assert all(name in by_region["brain"].to_dict() for name in VOLUME_METRICS)
