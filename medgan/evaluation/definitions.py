"""What each scored method is and how every number was computed: written into ``summary.json`` by
evaluation, shown by the report from there."""

from __future__ import annotations

from medgan.scoring import COPY, MODEL, UNET


def method_descriptions(chosen_on: str, with_baseline: bool) -> dict[str, str]:
    """What each scored method is, for summary.json and the report."""
    return {
        MODEL: "the generator under evaluation",
        COPY: f"the input contrast with the best mean per-volume brain PSNR on {chosen_on}, copied as is",
        **({UNET: "the generator of --baseline-checkpoint (e.g. the plain U-Net)"} if with_baseline else {}),
    }


def metric_definitions() -> dict[str, str]:
    """How every number of an evaluation was computed, for summary.json and the report."""
    return {
        "intensities": "each contrast scaled into [0, 1] by data_prep's healthy-median normalisation: the "
        "subject's median within the mask (BraTS brain, IXI head) -> 0.4, 2.5 x that median -> 1, brighter "
        "voxels clipped at 1, 0 outside the mask; predictions multiplied by the mask; data_range = 1",
        "psnr": "10 log10(1 / MSE) dB, MSE over the region's voxels",
        "ssim": "Wang et al. 2004, Gaussian window sigma 1.5 (11 taps per axis), population covariance, "
        "K1 0.01, K2 0.03; mean of the full SSIM map over the region; per slice 2D, per volume 3D "
        "(NaN when a subject has fewer than 11 slices)",
        "mae": "mean |synthesized - real| over the region's voxels, in the [0, 1] scale",
        "through_plane_error": "per volume: mean |(p[z+1] - p[z]) - (r[z+1] - r[z])| over the pairs of "
        "voxels on adjacent axial slices both inside the region (how far the synthesized slice-to-slice "
        "change departs from the real one; slice-by-slice flicker raises it)",
        "ssim_sagittal": "per volume: the SSIM map (as ssim) on each sagittal plane [Z, y] at fixed x, "
        "averaged over the region's voxels (NaN below 11 slices)",
        "ssim_coronal": "per volume: the SSIM map on each coronal plane [Z, x] at fixed y, averaged over "
        "the region's voxels (NaN below 11 slices)",
        "per_slice": "one value per axial slice (slices with an empty region are NaN and skipped)",
        "per_volume": "one value per subject over every voxel of the region in its stack of slices",
        "regions": "brain: the mask; tumour: seg > 0 within the mask; non_tumour: seg == 0 within the "
        "mask (tumour regions only for subjects with a segmentation)",
        "summary": "mean, sample std (ddof 1), median over subjects (per volume) or slices (per slice)",
        "paired": "over subjects, per-volume brain values, model minus baseline: mean with a 95% t "
        "confidence interval and the two-sided Wilcoxon signed-rank p (scipy.stats.wilcoxon); for "
        "MAE a negative difference favours the model",
    }
