"""The hybrid generator: a U-Net trunk with state-space branches that scan across the slices of a slab. At
initialisation it is the U-Net; its scans reach across slices, where a 2D or 2.5D U-Net's cannot; and it
trains on slabs, synthesizes and evaluates from the command line."""

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, evaluated_model_rows, load_script, run_command, train_tiny

from medgan.models.context import predict_stack
from medgan.models.generator import GeneratorConfig, HybridGenerator, build_generator
from medgan.models.slab_scan import SlabS6

TINY = dict(
    base_channels=8, depth=2, ssm_levels=[1], ssm_state=4, ssm_expand=1, unet_base_channels=8,
    modalities=["t1", "t1ce", "t2", "flair"],
)  # fmt: skip
AVAILABLE = torch.tensor([True, True, True, False])


def _pair(context_slices: int = 0):
    torch.manual_seed(0)
    unet = build_generator(GeneratorConfig(arch="unet", context_slices=context_slices, **TINY)).eval()
    hybrid = build_generator(GeneratorConfig(arch="hybrid", **TINY)).eval()
    loaded = hybrid.load_state_dict(unet.state_dict(), strict=False) if not context_slices else None
    return unet, hybrid, loaded


@pytest.mark.parametrize("slab_slices", [1, 8])
def test_at_initialisation_the_hybrid_is_the_unet_with_the_same_trunk_weights(slab_slices):
    unet, hybrid, loaded = _pair()
    assert isinstance(hybrid, HybridGenerator) and not loaded.unexpected_keys
    assert loaded.missing_keys and all(
        k.startswith(("encoder_branches.", "bottleneck_branch.")) for k in loaded.missing_keys
    )
    images = torch.rand(16, 4, 32, 32)
    available, target = AVAILABLE.expand(16, -1), torch.full((16,), 3)
    with torch.no_grad():
        assert torch.equal(
            hybrid(images, available, target, slab_slices=slab_slices), unet(images, available, target)
        )


def test_the_scales_learn_at_once_and_the_branches_from_the_next_step():
    _, hybrid, _ = _pair()
    hybrid.train()
    images = torch.rand(8, 4, 32, 32)
    hybrid(images, AVAILABLE.expand(8, -1), torch.full((8,), 3), slab_slices=8).square().mean().backward()
    branches = [hybrid.bottleneck_branch, *hybrid.encoder_branches.values()]
    assert all(branch.scale.grad.abs().sum() > 0 for branch in branches), "a scale got no gradient"
    assert all(not branch.scan.in_proj.weight.grad.any() for branch in branches), "ReZero: branch is silent"


def test_the_slab_scan_orders_cover_every_token_once_each_and_slices_are_adjacent():
    scan = SlabS6(4, d_state=4, expand=1)
    u = torch.rand(6, 4, 3, 5)  # 2 slabs of 3 slices, 3 x 5 tokens a slice
    sequences = scan.sequences(u, 3)
    assert sequences.shape == (2, 6, 4, 3 * 3 * 5)
    torch.testing.assert_close(scan.merge(sequences, u.shape, 3), 6 * u, rtol=0, atol=1e-6)  # inverts each
    slices = sequences[0, 2, 0]  # z fastest: (z, y=0, x=0), (z + 1, 0, 0), ...
    assert torch.equal(slices[:3], u[0:3, 0, 0, 0]) and torch.equal(slices[3:6], u[0:3, 0, 0, 1])


def _prediction(model, stack, context_slices=0):
    with torch.no_grad():
        return predict_stack(model, stack, AVAILABLE, 3, context_slices, batch_size=4)[:, 0]


def test_swapping_slices_4_and_5_away_reaches_the_hybrid_and_no_u_net():
    stack = torch.rand(14, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    swapped = stack.clone()
    i = 5
    swapped[[i + 4, i + 5]] = stack[[i + 5, i + 4]]
    unet, hybrid, _ = _pair()
    with torch.no_grad():  # as after training: the branches speak
        for branch in [hybrid.bottleneck_branch, *hybrid.encoder_branches.values()]:
            branch.scale.fill_(0.5)
    assert not torch.equal(_prediction(hybrid, stack)[i], _prediction(hybrid, swapped)[i])
    assert torch.equal(_prediction(unet, stack)[i], _prediction(unet, swapped)[i])
    unet_25d, _, _ = _pair(context_slices=2)
    assert torch.equal(_prediction(unet_25d, stack, 2)[i], _prediction(unet_25d, swapped, 2)[i])


@pytest.mark.slow
def test_the_hybrid_trains_on_slabs_and_reaches_across_slices_through_the_command_line(
    phantom_shards, phantom_subjects, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    train_tiny(
        phantom_shards, run_dir, "--model.generator.arch", "hybrid", "--data.slab_slices", "8",
        "--data.batch_size", "8", "--training.val_every_steps", "4",
    )  # fmt: skip

    subject = sorted(p for p in phantom_subjects.iterdir() if p.is_dir())[0]
    swapped_dir = tmp_path / "swapped"
    swapped_dir.mkdir()
    z = 12  # a slice with brain; slices z + 4 and z + 5 trade places in every input
    for modality in ("t1", "t1ce", "t2"):
        image = nib.load(subject / f"{subject.name}_{modality}.nii.gz")
        data = np.asarray(image.dataobj).copy()
        data[..., [z + 4, z + 5]] = data[..., [z + 5, z + 4]]
        nib.save(nib.Nifti1Image(data, image.affine, image.header), swapped_dir / f"{modality}.nii.gz")

    def synthesize(folder: Path, names: dict[str, str], out: Path) -> np.ndarray:
        inputs = [arg for m, name in names.items() for arg in ("--input", f"{m}={folder / name}")]
        run_command([
            sys.executable, "-m", "medgan", "synthesize", "--checkpoint", str(run_dir), "--target", "flair",
            *inputs, "--out", str(out),
        ])  # fmt: skip
        return np.asarray(nib.load(out).dataobj)

    modalities = ("t1", "t1ce", "t2")
    original = synthesize(
        subject, {m: f"{subject.name}_{m}.nii.gz" for m in modalities}, tmp_path / "a.nii.gz"
    )
    moved = synthesize(swapped_dir, {m: f"{m}.nii.gz" for m in modalities}, tmp_path / "b.nii.gz")
    assert original[..., z].any(), "slice z holds brain"
    assert not np.array_equal(original[..., z], moved[..., z]), "slices 4 and 5 away did not reach slice z"

    rows = evaluated_model_rows(run_dir, phantom_shards, tmp_path / "eval")
    assert rows and all(np.isfinite(float(row["through_plane_error"])) for row in rows)

    # the reach at inference, measured: the whole volume against blended slabs on the val split
    bench = load_script(REPO / "bench" / "slab_inference.py", "bench_slab_inference")
    flags = ["--slab", "10", "--margin", "2", "--blend", "1"]
    assert bench.main(["--checkpoint", str(run_dir), "--data_path", str(phantom_shards), *flags]) == 0
    printed = capsys.readouterr().out.splitlines()
    table = [line for line in printed if line.startswith(("| whole", "| blended"))]
    assert len(table) == 2 and "nan" not in " ".join(table), table
