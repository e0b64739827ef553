"""Seeded synthetic multi-contrast brain MRI in BraTS-2021 or IXI layout, with nothing downloaded.

Anatomy comes from the MNI152 (ICBM 2009a) grey- and white-matter probability maps that nilearn ships
inside its wheel (CSF is the rest of the template's brain mask; see docs/MNI152_COPYRIGHT.txt). Each
subject gets a random similarity transform plus a smooth random deformation, optionally a glioma-like
tumour (necrotic core, enhancing rim, oedema; `seg` in BraTS 2021 labels 1/4/2), and each contrast is
rendered through the MR signal equations in `mr_signal`, then a multiplicative bias field and Rician
noise are applied. Subject i depends only on (seed, i), so adding subjects never changes earlier ones.

The IXI layout mimics the real collection: IXI-T1/, IXI-T2/, IXI-PD/ folders; T2 and PD axial on one
grid; T1 sagittal on its own grid with a small head movement between scans; skull and scalp present.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage, special

from data_prep.errors import UserError
from data_prep.mr_signal import signal_table

LAYOUT_MODALITIES: dict[str, tuple[str, ...]] = {
    "brats": ("t1", "t1ce", "t2", "flair"),
    "ixi": ("t1", "t2", "pd"),
}
TISSUE_NAMES = ["gm", "wm", "csf", "oedema", "necrosis", "enhancing", "skull", "scalp"]
DEFAULT_SHAPE = (128, 128, 64)

# Field of view (mm, RAS) and its centre in MNI space: holds the brain plus ~13 mm of skull and scalp.
FIELD_OF_VIEW_MM = np.array([192.0, 216.0, 168.0])
FIELD_CENTRE_MM = np.array([0.0, -17.0, 14.0])

_TEMPLATE_FILES = {
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
}
# nilearn's own brain-mask rule (load_mni152_brain_mask): T1 template above 0.2 of its range.
_TEMPLATE_BRAIN_THRESHOLD = 0.2
# Shells outside the brain (mm from the brain surface) for the IXI-style head.
_OUTER_CSF_MM, _SKULL_MM, _SCALP_MM = 2.5, 8.0, 13.0
_IXI_SITES = ("Guys", "HH", "IOP")


@dataclass(frozen=True, kw_only=True, slots=True)
class PhantomConfig:
    """What `python -m data_prep phantom` makes.

    layout: "brats" or "ixi". subjects: >= 1. shape: voxels (X, Y, Z) of the axial grid, each >= 16.
    missing_rate: probability in [0, 1] that a subject lacks one (random) contrast.
    tumour_rate: probability in [0, 1] that a BraTS-layout subject has a tumour (IXI subjects never do).
    """

    layout: str
    subjects: int
    seed: int = 0
    shape: tuple[int, int, int] = DEFAULT_SHAPE
    missing_rate: float = 0.0
    tumour_rate: float = 0.75

    def __post_init__(self):
        if self.layout not in LAYOUT_MODALITIES:
            raise UserError(f"--layout {self.layout!r}: expected one of {', '.join(LAYOUT_MODALITIES)}")
        if self.subjects < 1:
            raise UserError(f"--subjects {self.subjects}: expected at least 1")
        if len(self.shape) != 3 or min(self.shape) < 16:
            raise UserError(f"--shape {' '.join(map(str, self.shape))}: expected three sizes, each >= 16")
        for name in ("missing_rate", "tumour_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"--{name.replace('_', '-')} {value}: expected a probability in [0, 1]")


@dataclass(frozen=True, slots=True)
class Template:
    """MNI152 tissue maps on the template's 1 mm grid.

    tissue: float32 [3, X, Y, Z] fractions (gm, wm, csf) in [0, 1], summing to the brain mask.
    world_to_voxel: [4, 4] MNI mm -> template voxel.
    distance_mm: float32 [X', Y', Z'] distance outside the brain (0 inside) on a 2 mm grid,
        with distance_world_to_voxel its [4, 4] mm -> voxel map.
    deep_white_matter_mm: float64 [N, 3] MNI positions where white matter > 0.95 (tumour centres).
    """

    tissue: np.ndarray
    world_to_voxel: np.ndarray
    distance_mm: np.ndarray
    distance_world_to_voxel: np.ndarray
    deep_white_matter_mm: np.ndarray


def template_folder() -> Path:
    """Where nilearn's wheel keeps the MNI152 maps (found without importing nilearn, which is slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "nilearn is not installed; the phantom reads its packaged MNI152 maps (pip install nilearn)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    missing = [name for name in _TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise UserError(
            f"{folder}: nilearn's packaged MNI152 map {missing[0]} is missing (reinstall nilearn)"
        )
    return folder


@functools.cache
def load_template() -> Template:
    """Read the packaged MNI152 maps once per process (about 3 s)."""
    folder = template_folder()
    images = {key: nib.load(folder / name) for key, name in _TEMPLATE_FILES.items()}
    gm, wm, t1 = (np.asarray(images[key].dataobj, dtype=np.float32) / 255.0 for key in ("gm", "wm", "t1"))
    brain = t1 > _TEMPLATE_BRAIN_THRESHOLD
    gm, wm = gm * brain, wm * brain
    total = gm + wm
    overlap = np.maximum(total, 1.0)
    gm, wm = gm / overlap, wm / overlap
    csf = np.where(brain, 1.0 - gm - wm, 0.0).astype(np.float32)
    affine = images["gm"].affine

    # The distance field only shapes skull and scalp, so a 2 mm grid is plenty (and 8x cheaper).
    coarse_brain = brain[::2, ::2, ::2]
    distance_mm = ndimage.distance_transform_edt(~coarse_brain, sampling=2.0).astype(np.float32)
    coarse_affine = affine @ np.diag([2.0, 2.0, 2.0, 1.0])

    deep = np.argwhere(wm > 0.95)
    deep_mm = nib.affines.apply_affine(affine, deep)
    return Template(
        tissue=np.stack([gm, wm, csf]).astype(np.float32),
        world_to_voxel=np.linalg.inv(affine),
        distance_mm=distance_mm,
        distance_world_to_voxel=np.linalg.inv(coarse_affine),
        deep_white_matter_mm=deep_mm,
    )


def grid_affine(shape, spacing_mm, axis_codes: str, centre_mm) -> np.ndarray:
    """[4, 4] voxel -> RAS mm affine of an axis-aligned grid whose centre voxel sits at `centre_mm`.

    axis_codes: three letters from RASLPI, the direction each voxel axis increases toward (e.g. "LPS").
    """
    world_axis = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for voxel_axis, code in enumerate(axis_codes):
        axis, sign = world_axis[code]
        affine[axis, voxel_axis] = sign * spacing_mm[voxel_axis]
    centre_voxel = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    affine[:3, 3] = np.asarray(centre_mm) - affine[:3, :3] @ centre_voxel
    return affine


def _grid_points_mm(shape, affine) -> np.ndarray:
    """float64 [3, N] RAS mm of every voxel of a grid, in C order."""
    voxels = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return affine[:3, :3] @ voxels + affine[:3, 3:4]


def _rotation(angles_rad) -> np.ndarray:
    """[3, 3] rotation about x, then y, then z (radians)."""
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True, slots=True)
class SmoothField:
    """A smooth random scalar (or vector) field over a box in mm: values [C, gx, gy, gz] on a grid."""

    values: np.ndarray
    box_min_mm: np.ndarray
    box_size_mm: np.ndarray

    @classmethod
    def random(cls, rng, channels: int, control_points: int, box_min_mm, box_size_mm, upsampled: int = 24):
        coarse = rng.standard_normal((channels, control_points, control_points, control_points))
        # Cubic upsampling of a few control points gives a smooth field that is cheap to sample linearly.
        zoom = (1.0, *(upsampled / control_points,) * 3)
        return cls(ndimage.zoom(coarse, zoom, order=3), np.asarray(box_min_mm), np.asarray(box_size_mm))

    def __call__(self, points_mm: np.ndarray) -> np.ndarray:
        """float64 [C, N] field values at points [3, N] (mm); constant beyond the box."""
        grid_shape = np.array(self.values.shape[1:])
        coordinates = (
            (points_mm - self.box_min_mm[:, None]) / self.box_size_mm[:, None] * (grid_shape[:, None] - 1)
        )
        return np.stack(
            [
                ndimage.map_coordinates(channel, coordinates, order=1, mode="nearest")
                for channel in self.values
            ]
        )


@dataclass(frozen=True, slots=True)
class Tumour:
    """Nested shells around a centre (MNI mm); radii in mm, perturbed by a smooth field (+-25 %)."""

    centre_mm: np.ndarray
    necrosis_radius_mm: float
    enhancing_radius_mm: float
    oedema_radius_mm: float
    shape_noise: SmoothField

    def effective_radius_mm(self, template_mm: np.ndarray) -> np.ndarray:
        distance = np.linalg.norm(template_mm - self.centre_mm[:, None], axis=0)
        return distance * (1.0 + 0.25 * np.tanh(self.shape_noise(template_mm)[0]))


@dataclass(frozen=True, slots=True)
class SubjectAnatomy:
    """How one subject's scanner space (mm) maps onto MNI space, and its tumour (or None)."""

    linear: np.ndarray
    offset_mm: np.ndarray
    deformation: SmoothField
    tumour: Tumour | None

    def to_template_mm(self, points_mm: np.ndarray) -> np.ndarray:
        return self.linear @ points_mm + self.offset_mm[:, None] + self.deformation(points_mm)


def _draw_anatomy(rng, template: Template, with_tumour: bool) -> SubjectAnatomy:
    scale = rng.uniform(0.92, 1.08)
    linear = _rotation(np.deg2rad(rng.uniform(-5, 5, size=3))) / scale
    offset = FIELD_CENTRE_MM - linear @ FIELD_CENTRE_MM + rng.uniform(-3, 3, size=3)
    box_min = FIELD_CENTRE_MM - FIELD_OF_VIEW_MM / 2
    deformation_field = SmoothField.random(rng, 3, 5, box_min, FIELD_OF_VIEW_MM)
    deformation = SmoothField(deformation_field.values * 3.0, box_min, FIELD_OF_VIEW_MM)  # ~3 mm warps
    tumour = None
    if with_tumour:
        centre = template.deep_white_matter_mm[rng.integers(len(template.deep_white_matter_mm))]
        necrosis = rng.uniform(3.0, 8.0)
        enhancing = necrosis + rng.uniform(2.5, 4.5)
        oedema = enhancing + rng.uniform(6.0, 16.0)
        reach = np.full(3, 2.6 * oedema)
        tumour = Tumour(
            centre_mm=centre,
            necrosis_radius_mm=necrosis,
            enhancing_radius_mm=enhancing,
            oedema_radius_mm=oedema,
            shape_noise=SmoothField.random(rng, 1, 4, centre - reach / 2, reach, upsampled=16),
        )
    return SubjectAnatomy(linear=linear, offset_mm=offset, deformation=deformation, tumour=tumour)


def _ramp(signed_distance_mm: np.ndarray, width_mm: float = 1.5) -> np.ndarray:
    """Partial-volume step: 1 well inside (distance > 0), 0 well outside, linear over `width_mm`."""
    return np.clip(signed_distance_mm / width_mm + 0.5, 0.0, 1.0)


def render_tissues(template: Template, anatomy: SubjectAnatomy, points_mm: np.ndarray, with_head: bool):
    """Tissue fractions at scanner points [3, N] (mm).

    Returns (fractions float64 [len(TISSUE_NAMES), N] in [0, 1], seg uint8 [N] in {0, 1, 2, 4},
    brain bool [N]).
    """
    template_mm = anatomy.to_template_mm(points_mm)
    voxels = template.world_to_voxel[:3, :3] @ template_mm + template.world_to_voxel[:3, 3:4]
    gm, wm, csf = (ndimage.map_coordinates(channel, voxels, order=1, cval=0.0) for channel in template.tissue)
    count = points_mm.shape[1]
    oedema = necrosis = enhancing = np.zeros(count)
    seg = np.zeros(count, dtype=np.uint8)
    brain_fraction = gm + wm + csf
    if anatomy.tumour is not None:
        tumour = anatomy.tumour
        radius = tumour.effective_radius_mm(template_mm)
        core = _ramp(tumour.enhancing_radius_mm - radius)
        necrotic = _ramp(tumour.necrosis_radius_mm - radius)
        oedema_zone = _ramp(tumour.oedema_radius_mm - radius) - core
        necrosis = necrotic * brain_fraction
        enhancing = (core - necrotic) * brain_fraction
        # Oedema spreads through white matter and less through cortex; CSF stays CSF.
        oedema = oedema_zone * (wm + 0.5 * gm)
        gm = gm * (1.0 - core) * (1.0 - 0.5 * oedema_zone)
        wm = wm * (1.0 - core) * (1.0 - oedema_zone)
        csf = csf * (1.0 - core)
        in_brain = brain_fraction >= 0.5
        seg[(radius < tumour.oedema_radius_mm) & (oedema >= 0.25) & in_brain] = 2
        seg[(radius < tumour.enhancing_radius_mm) & in_brain] = 4
        seg[(radius < tumour.necrosis_radius_mm) & in_brain] = 1
    skull = scalp = np.zeros(count)
    if with_head:
        distance_voxels = template.distance_world_to_voxel[:3, :3] @ template_mm
        distance_voxels += template.distance_world_to_voxel[:3, 3:4]
        # "nearest" continues the head below the template's lowest slice, like a neck.
        outside_mm = ndimage.map_coordinates(template.distance_mm, distance_voxels, order=1, mode="nearest")
        shell = _ramp(outside_mm) * (1.0 - brain_fraction)
        csf = csf + shell * _ramp(_OUTER_CSF_MM - outside_mm)
        skull = shell * _ramp(outside_mm - _OUTER_CSF_MM) * _ramp(_SKULL_MM - outside_mm)
        scalp = shell * _ramp(outside_mm - _SKULL_MM) * _ramp(_SCALP_MM - outside_mm)
    fractions = np.stack([gm, wm, csf, oedema, necrosis, enhancing, skull, scalp])
    # Overlapping partial-volume ramps can add up to slightly more than one voxel.
    fractions /= np.maximum(fractions.sum(axis=0), 1.0)
    brain = brain_fraction >= 0.5
    return fractions, seg, brain


# The bias field's strength (a log-gain of 0.12 x a unit smooth field) and the noise's sigma as a share of
# the brightest tissue's signal.
_BIAS_STRENGTH, _NOISE_SHARE = 0.12, 0.025


def _imperfections(rng, clean: np.ndarray, sigma: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """One draw of what no input can predict: ``clean`` [M, N] under a smooth multiplicative bias field,
    as the magnitude of a complex signal with Gaussian noise of ``sigma`` [M, 1] (Rician)."""
    box_min = FIELD_CENTRE_MM - FIELD_OF_VIEW_MM / 2
    field = SmoothField.random(rng, len(clean), 3, box_min, FIELD_OF_VIEW_MM, upsampled=12)(points_mm)
    biased = clean * np.exp(_BIAS_STRENGTH * field)
    real = biased + sigma * rng.standard_normal(biased.shape)
    imaginary = sigma * rng.standard_normal(biased.shape)
    return np.hypot(real, imaginary)


def rician_mean(amplitude: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """The mean magnitude of a signal ``amplitude`` under complex Gaussian noise of ``sigma`` (the Rician
    distribution's mean, ``sigma sqrt(pi / 2) L_1/2(-amplitude^2 / 2 sigma^2)``, written with the
    exponentially scaled Bessel functions so it stays finite for strong signals)."""
    half = np.square(amplitude / sigma) / 4  # x / 2 with x = amplitude^2 / (2 sigma^2)
    return sigma * np.sqrt(np.pi / 2) * ((1 + 2 * half) * special.i0e(half) + 2 * half * special.i1e(half))


def render_contrasts(
    rng, fractions: np.ndarray, modalities, points_mm: np.ndarray, references: bool = False
) -> np.ndarray:
    """float64 [M, N] scanner-like magnitudes: signal equations, bias field, Rician noise, scanner gain.

    references: also return, as ``(magnitudes, noise_free, expected)``, the signal equations times the
    same gain (noise_free) and the mean magnitude the noise gives them (expected, :func:`rician_mean`):
    what the best predictor from the true tissue maps would give under squared error. The bias field is
    left out of both: its mean is a global factor of about ``exp(0.12^2 / 2)``, which the shards'
    normalisation divides out. ``rng`` draws the same either way.
    """
    table = signal_table(TISSUE_NAMES, list(modalities))
    clean = table @ fractions
    sigma = _NOISE_SHARE * table[:, :3].max(axis=1, keepdims=True)
    noisy = _imperfections(rng, clean, sigma, points_mm)
    gain = rng.uniform(900.0, 1400.0, size=(len(modalities), 1)) / table.max(axis=1, keepdims=True)
    if not references:
        return noisy * gain
    return noisy * gain, clean * gain, rician_mean(clean, sigma) * gain


@dataclass(frozen=True, slots=True)
class PhantomSubject:
    """One subject's files, as written: subject id and {modality or "seg": path}."""

    subject: str
    files: dict[str, Path]
    has_tumour: bool


def _axial_geometry(shape):
    spacing_xy = float(max(FIELD_OF_VIEW_MM[0] / shape[0], FIELD_OF_VIEW_MM[1] / shape[1]))
    spacing = (spacing_xy, spacing_xy, float(FIELD_OF_VIEW_MM[2] / shape[2]))
    return spacing


def _save(volume: np.ndarray, affine: np.ndarray, path: Path, dtype) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.asarray(volume, dtype=dtype), affine)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)
    return path


def _present_modalities(rng, modalities, missing_rate: float) -> list[str]:
    present = list(modalities)
    if rng.random() < missing_rate:
        present.remove(present[rng.integers(len(present))])
    return present


def make_brats_subject(
    config: PhantomConfig, index: int, out: Path, noise_free: Path | None = None
) -> PhantomSubject:
    """Write BraTS2021_{index:05d}/ with t1, t1ce, t2, flair (some maybe missing) and seg (LPS, as BraTS).

    noise_free: also write the subject, in the same layout, as rendered without the bias field and the
    noise (under ``noise_free/noise_free``) and with the noise's mean lift (``noise_free/expected``;
    :func:`render_contrasts`); the subject's own files are the same either way.
    """
    rng = np.random.default_rng([config.seed, index])
    template = load_template()
    anatomy = _draw_anatomy(rng, template, with_tumour=rng.random() < config.tumour_rate)
    affine = grid_affine(config.shape, _axial_geometry(config.shape), "LPS", FIELD_CENTRE_MM)
    points = _grid_points_mm(config.shape, affine)
    fractions, seg, brain = render_tissues(template, anatomy, points, with_head=False)
    modalities = LAYOUT_MODALITIES["brats"]
    present = _present_modalities(rng, modalities, config.missing_rate)
    subject = f"BraTS2021_{index:05d}"
    if noise_free is None:
        renderings = {out: render_contrasts(rng, fractions, modalities, points)}
    else:
        images, clean, expected = render_contrasts(rng, fractions, modalities, points, references=True)
        renderings = {out: images, noise_free / "noise_free": clean, noise_free / "expected": expected}
    files = {}
    for root, images in renderings.items():
        folder = root / subject
        for modality, image in zip(modalities, images * brain):  # skull-stripped, zero outside
            if modality in present:
                path = folder / f"{subject}_{modality}.nii.gz"
                files.setdefault(
                    modality, _save(np.rint(image).reshape(config.shape), affine, path, np.int16)
                )
        seg_path = _save(seg.reshape(config.shape), affine, folder / f"{subject}_seg.nii.gz", np.uint8)
        files.setdefault("seg", seg_path)
    return PhantomSubject(subject=subject, files=files, has_tumour=anatomy.tumour is not None)


def make_ixi_subject(config: PhantomConfig, index: int, out: Path) -> PhantomSubject:
    """Write IXI-T1/, IXI-T2/, IXI-PD/ files: T2 and PD axial ("LPS"), T1 sagittal ("PIR"), with head."""
    rng = np.random.default_rng([config.seed, index])
    template = load_template()
    anatomy = _draw_anatomy(rng, template, with_tumour=False)
    subject = f"IXI{index + 2:03d}-{_IXI_SITES[rng.integers(len(_IXI_SITES))]}-{rng.integers(10000):04d}"
    present = _present_modalities(rng, LAYOUT_MODALITIES["ixi"], config.missing_rate)

    axial_affine = grid_affine(config.shape, _axial_geometry(config.shape), "LPS", FIELD_CENTRE_MM)
    axial_points = _grid_points_mm(config.shape, axial_affine)
    fractions, _, _ = render_tissues(template, anatomy, axial_points, with_head=True)
    t2, pd = render_contrasts(rng, fractions, ("t2", "pd"), axial_points)

    # T1: its own sagittal grid (finer in-plane, thicker slices) and a small head movement.
    in_plane = 0.9 * _axial_geometry(config.shape)[0]
    sagittal_spacing = (in_plane, in_plane, 1.3 * in_plane)
    sagittal_shape = tuple(
        int(np.ceil(FIELD_OF_VIEW_MM[axis] / size)) for axis, size in zip((1, 2, 0), sagittal_spacing)
    )
    sagittal_affine = grid_affine(sagittal_shape, sagittal_spacing, "PIR", FIELD_CENTRE_MM)
    sagittal_points = _grid_points_mm(sagittal_shape, sagittal_affine)
    movement = _rotation(np.deg2rad(rng.uniform(-4, 4, size=3)))
    moved = movement @ (sagittal_points - FIELD_CENTRE_MM[:, None]) + FIELD_CENTRE_MM[:, None]
    moved += rng.uniform(-5, 5, size=(3, 1))
    t1_fractions, _, _ = render_tissues(template, anatomy, moved, with_head=True)
    (t1,) = render_contrasts(rng, t1_fractions, ("t1",), sagittal_points)

    volumes = {
        "t1": (t1.reshape(sagittal_shape), sagittal_affine),
        "t2": (t2.reshape(config.shape), axial_affine),
        "pd": (pd.reshape(config.shape), axial_affine),
    }
    files = {}
    for modality in present:
        volume, affine = volumes[modality]
        path = out / f"IXI-{modality.upper()}" / f"{subject}-{modality.upper()}.nii.gz"
        files[modality] = _save(np.rint(volume), affine, path, np.int16)
    return PhantomSubject(subject=subject, files=files, has_tumour=False)


def make_phantom(
    config: PhantomConfig, out: Path, progress=None, noise_free: Path | None = None
) -> list[PhantomSubject]:
    """Write `config.subjects` subjects under `out` (created); returns what was written, in order.

    progress: optional callable wrapping an iterable (e.g. tqdm) for a progress bar.
    noise_free: BraTS layout only; also write every subject without its bias field and noise
    (``noise_free/noise_free``) and with the noise's mean lift (``noise_free/expected``): references for
    what no model can beat (:func:`render_contrasts`).
    """
    out = Path(out)
    if noise_free is not None and config.layout != "brats":
        raise UserError(f"--noise-free {noise_free}: written for the brats layout only, not {config.layout}")
    for folder, flag in ((out, "--out"), (noise_free, "--noise-free")):
        try:
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"{flag} {folder}: cannot create the folder ({error.strerror})") from None
    indices = range(config.subjects)
    if progress is not None:
        indices = progress(indices)
    if config.layout == "ixi":
        return [make_ixi_subject(config, index, out) for index in indices]
    return [make_brats_subject(config, index, out, noise_free) for index in indices]
