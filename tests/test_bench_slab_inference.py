"""bench/slab_inference.py, the hybrid's whole-volume inference against overlapping blended slabs: the slab
plan keeps every used prediction ``margin`` slices from an inner border and covers every slice once in
sum, a slice-by-slice model is unchanged by the slabbing, and a slab reaches no further than itself."""

import numpy as np
import pytest
import torch
from conftest import REPO, load_script

from medgan.models.context import predict_stack
from medgan.models.generator import GeneratorConfig, build_generator
from medgan.models.slab_scan import recording_branch_share

TINY = dict(
    base_channels=8, depth=2, ssm_levels=[1], ssm_state=4, ssm_expand=1, unet_base_channels=8,
    modalities=["t1", "t1ce", "t2", "flair"],
)  # fmt: skip
AVAILABLE = torch.tensor([True, True, True, False])


def load_bench():
    return load_script(REPO / "bench" / "slab_inference.py", "bench_slab_inference")


@pytest.mark.parametrize("count", [5, 16, 17, 39, 64])
def test_the_slab_plan_keeps_margins_and_weighs_every_slice_once(count):
    bench = load_bench()
    slab, margin, blend = 16, 4, 2
    starts, weights = bench.slab_weights(count, slab, margin, blend)
    np.testing.assert_allclose(weights.sum(axis=0), 1.0)
    assert starts[0] == 0 and starts[-1] == max(count - slab, 0)
    for start, row in zip(starts, weights):
        used = np.flatnonzero(row)
        assert used.min() >= start and used.max() < start + slab
        if start > 0:
            assert used.min() >= start + margin, "a prediction within the margin of an inner border is used"
        if start + slab < count:
            assert used.max() <= start + slab - 1 - margin
    border, inside = bench.pair_kinds(weights)
    assert not (border & inside).any() and (inside.any() or count <= 1)
    assert border.any() == (count > slab)
    with pytest.raises(ValueError, match="must exceed blend"):
        bench.slab_weights(count, 8, 3, 2)


def test_a_slice_by_slice_model_is_unchanged_by_blended_slabs():
    bench = load_bench()
    torch.manual_seed(0)
    unet = build_generator(GeneratorConfig(arch="unet", context_slices=1, **TINY)).eval()
    stack = torch.rand(21, 4, 16, 16)
    with torch.no_grad():
        whole = predict_stack(unet, stack, AVAILABLE, 3, 1, batch_size=4)
        blended = bench.predict_blended(unet, stack, AVAILABLE, 3, 1, slab=10, margin=2, blend=1)
    torch.testing.assert_close(blended, whole, rtol=0, atol=1e-5)


def test_a_slab_reaches_no_further_than_itself_and_the_branch_share_is_recorded():
    bench = load_bench()
    torch.manual_seed(0)
    hybrid = build_generator(GeneratorConfig(arch="hybrid", **TINY)).eval()
    stack = torch.rand(24, 4, 16, 16)
    changed = stack.clone()
    changed[23] = torch.rand(4, 16, 16)
    with torch.no_grad(), recording_branch_share(hybrid) as silent:
        hybrid(stack, AVAILABLE.expand(24, -1), torch.full((24,), 3), slab_slices=24)
    assert silent and all(share == 0 for share in silent.values()), "at initialisation the branch adds 0"
    with torch.no_grad():
        for branch in [hybrid.bottleneck_branch, *hybrid.encoder_branches.values()]:
            branch.scale.fill_(0.5)
        plan = dict(slab=10, margin=2, blend=1)  # slabs 0-9 (used to 7), 5-14, ..., 14-23
        first = bench.predict_blended(hybrid, stack, AVAILABLE, 3, 0, **plan)
        second = bench.predict_blended(hybrid, changed, AVAILABLE, 3, 0, **plan)
        whole = predict_stack(hybrid, stack, AVAILABLE, 3, 0, batch_size=4)
        with recording_branch_share(hybrid) as speaking:
            predict_stack(hybrid, changed, AVAILABLE, 3, 0, batch_size=4)
    assert torch.equal(first[:8], second[:8]), "slice 23 reached a slab that ends at slice 9"
    assert not torch.equal(first[-1], second[-1])
    assert not torch.equal(first, whole), "the slabs were the whole volume"
    assert all(share > 0 for share in speaking.values())
