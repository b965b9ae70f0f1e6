"""Every parameter of the initial synthesis in one frozen, validated configuration.

Sizes are in pixels at 40x (0.25 µm/px), the resolution synthesis works at. Defaults follow the published method
and its authors' released code (``docs/method.md`` §2); where pysynth departs from them, the field says why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of the GAN-free synthesis (units: px at 0.25 µm/px unless stated).

    Attributes:
        size: Side of a synthetic patch.
        mpp: Resolution of synthesis in µm/px (sources are resampled to it). Every size in px is px at this
            resolution; the defaults are calibrated at 0.25 µm/px (40x).
        output_mpp: Resolution of the stored patches, the one a model trained on them works at (0: ``mpp``). A
            coarser one (an integer multiple of ``mpp``, e.g. 0.5 µm/px for a model that runs on 20x slides
            natively) keeps synthesis at ``mpp``, where its parameters are calibrated: each patch is made
            ``size · output_mpp / mpp`` px a side and area-averaged down to ``size`` px, its labels by the
            majority of each block (:func:`pysynth.synth.recipe.downsample_patch`).
        vertices: Range of polygon vertex counts (inclusive).
        irregularity: Angular irregularity of vertices, as a fraction of 2π/N (1 in the released code).
        spikiness: Range of the radius spread, as a fraction of the mean radius.
        radius: Range of the mean radius before the per-patch size factor.
        size_factor: Mean and sd of the per-patch size factor (normal), and its clip range.
        count_per_400: Mean and sd of the nucleus count per 400×400 px (normal), clipped to [0, max_count_per_400].
        max_count_per_400: Most nuclei per 400×400 px.
        empty_fraction: Fraction of patches without nuclei.
        adapt_density: Scale count and size to the source tile's nuclear density (the released code meant to; a bug
            disabled it).
        reference_density: Nuclear foreground fraction of a typical tile, by pysynth's Otsu on the smoothed
            hematoxylin of tissue pixels (the released code's 0.06 was for its own, different, measure; 0.25 is the
            median over the 30 unlabelled MoNuSeg training tiles); density adaptation is relative to it.
        density_clip: Range of the count multiplier from density adaptation.
        smooth_polygons: Rounds of Chaikin corner cutting applied to each polygon (0: the raw polygon). Real
            nuclear outlines are smooth; raw random polygons are angular, a cue only synthetic patches carry.
        max_overlap: A new nucleus may overlap existing ones by at most this fraction of its own area.
        redraws: Tries per nucleus before giving up on it.
        warp: Largest corner displacement of the per-patch perspective warp, as a fraction of the side.
        super_percentile_shift: Super-segmentation: foreground grown so it is this much larger than Otsu's (fraction).
        super_dilate: Super-segmentation: dilation radius after thresholding (px), so halos go too.
        local_contrast: Super-segmentation: also take pixels whose hematoxylin exceeds its 8 µm surroundings by this
            much (catches pale nuclei Otsu misses).
        texture_contrast: Range of chromatin texture contrast (relative modulation of nuclear optical density).
        gain_range: Range of the smooth random gain field on nuclear density.
        clear_chromatin: Fraction of nuclei with cleared (vesicular) interiors.
        rim: Range of extra optical density on the membrane rim (relative).
        blur_sigma: Boundary blur (sigma, px) of the sharpest and the softest edges; each pixel mixes the two by a
            smooth random field, so sharpness varies across the patch (above 0.8 px a two-box approximation).
        darkness_jitter: Multiplicative jitter of each nucleus' density around a real nucleus' density.
        min_darkness: Least optical density of a nucleus along the stain: some dark components of a real tile are
            not nuclei, and a labelled nucleus nobody could see is label noise.
        debris_rate: Mean count of dark debris specks per 400×400 px (unlabelled distractors).
        blob_rate: Mean count of pale out-of-focus blobs per 400×400 px (unlabelled distractors).
        colour_jitter: Per-channel multiplicative jitter of optical density (background and nuclei separately).
        guide: A trained segmenter (model folder, or ``"default"`` for the shipped one) that decides what of each
            real tile is a nucleus (:mod:`pysynth.synth.guide`): only that is inpainted, so the tile's other purple
            structure (cytoplasm, smudges, fibres) stays in backgrounds as an unlabelled negative; its confident
            nuclei give the real densities and the transplant bank. Empty: the hematoxylin super-segmentation
            decides, as published.
        guide_threshold: Pixels with the guide's segmentation probability above this are inpainted (low: recall).
        guide_dilate: Dilation of the guide's nuclear pixels before inpainting (px), so their halos go too.
        guide_tta: Flips averaged in the guide's prediction (1, 2, 4 or 8).
        guide_confident: A guide nucleus whose mean segmentation probability is at least this is "sure": its
            density counts as a real nucleus' density, and it may be banked for transplanting.
        darkness_floor: No labelled synthetic nucleus is fainter than this quantile of the densities of the tile's
            sure real nuclei (0: only ``min_darkness``): a faint purple blob labelled "nucleus" teaches false nuclei.
        transplant_fraction: Share of each patch's nuclei that are real nuclei of the tile (banked by the guide),
            pasted with their own pixels (optical density added to the background) and the guide's mask as label,
            beside the random polygons. Needs ``guide``.
        transplant_classes: Give transplanted real nuclei a class by what a lymphocyte is, measured on the tile
            (:func:`pysynth.synth.lymphocytes.real_nucleus_classes`): lymphocyte when round, dark among the tile's
            sure nuclei and no larger than a section of a synthetic lymphocyte's sphere can show; other when larger
            than any such section; unknown (no class loss) in between. False: every transplant is unknown. So the
            class output also learns from real pixels, label-free.
        red_cell_rate: Mean count of red-blood-cell clusters per 400×400 px (unlabelled negatives in their own
            colour, :mod:`pysynth.synth.negatives`; counts scale with the patch's area in µm²).
        fibre_rate: Mean count of pink-to-purple fibres per 400×400 px (unlabelled negatives).
        pigment_rate: Mean count of brown pigment clumps per 400×400 px (unlabelled negatives).
        lymphocyte_fraction: Mean share of a patch's synthetic nuclei drawn as lymphocytes
            (:mod:`pysynth.synth.lymphocytes`: small, round, dark; Beta-distributed per patch). 0: no lymphocytes,
            every synthetic nucleus is of class "other" (the recipes of the models shipped before the class output).
        lymphocyte_diameter: Mean and sd of a lymphocyte nucleus' diameter in µm (clipped to ±40% of the mean), before
            the section cuts it (:func:`pysynth.synth.lymphocytes.profile_diameter`).
        section_thickness: Thickness of the tissue section in µm: what a section shows of a round nucleus depends on
            it (the usual 3-5 µm of H&E sections).
        lymphocyte_clustering: Share of a patch's lymphocytes placed in clusters (infiltrates).
        lymphocyte_dark_quantile: Lymphocytes take the tile's real nuclear densities above this quantile.
    """

    size: int = 200
    mpp: float = 0.25
    output_mpp: float = 0.0
    vertices: tuple[int, int] = (10, 17)
    irregularity: float = 1.0
    spikiness: tuple[float, float] = (0.04, 0.24)
    radius: tuple[float, float] = (8.5, 13.0)
    size_factor: tuple[float, float, float, float] = (1.33, 0.32, 0.7, 2.2)
    count_per_400: tuple[float, float] = (50.0, 40.0)
    max_count_per_400: int = 256
    empty_fraction: float = 0.1
    adapt_density: bool = True
    reference_density: float = 0.25
    density_clip: tuple[float, float] = (0.4, 2.5)
    smooth_polygons: int = 2
    max_overlap: float = 0.15
    redraws: int = 50
    warp: float = 0.15
    super_percentile_shift: float = 0.08
    super_dilate: int = 2
    local_contrast: float = 0.12
    texture_contrast: tuple[float, float] = (0.1, 0.45)
    gain_range: tuple[float, float] = (0.67, 1.33)
    clear_chromatin: float = 0.3
    rim: tuple[float, float] = (0.0, 0.6)
    blur_sigma: tuple[float, float] = (0.4, 1.6)
    darkness_jitter: float = 0.2
    min_darkness: float = 0.2
    debris_rate: float = 3.0
    blob_rate: float = 1.5
    colour_jitter: float = 0.04
    guide: str = ""
    guide_threshold: float = 0.3
    guide_dilate: int = 2
    guide_tta: int = 4
    guide_confident: float = 0.8
    darkness_floor: float = 0.0
    transplant_fraction: float = 0.0
    transplant_classes: bool = False
    red_cell_rate: float = 0.0
    fibre_rate: float = 0.0
    pigment_rate: float = 0.0
    lymphocyte_fraction: float = 0.25
    lymphocyte_diameter: tuple[float, float] = (6.0, 0.6)
    section_thickness: float = 4.0
    lymphocyte_clustering: float = 0.6
    lymphocyte_dark_quantile: float = 0.75

    def __post_init__(self) -> None:
        def check(ok: bool, name: str) -> None:
            if not ok:
                raise ValueError(f"SynthConfig.{name} is out of range: {getattr(self, name)!r}")

        def ordered(name: str, lo: float = 0.0) -> None:
            a, b = getattr(self, name)[:2]
            check(lo <= a <= b, name)

        check(16 <= self.size <= 4096, "size")
        check(0.05 <= self.mpp <= 2.0, "mpp")
        ratio = self.output_mpp / self.mpp
        check(self.output_mpp == 0.0 or (0.999 < ratio <= 8.001 and abs(ratio - round(ratio)) < 1e-6), "output_mpp")
        ordered("vertices", 3)
        check(0.0 <= self.irregularity <= 1.0, "irregularity")
        ordered("spikiness")
        ordered("radius", 1.0)
        mean, sd, lo, hi = self.size_factor
        check(mean > 0 and sd >= 0 and 0 < lo <= hi, "size_factor")
        check(self.count_per_400[0] >= 0 and self.count_per_400[1] >= 0, "count_per_400")
        check(0 <= self.max_count_per_400 <= 4096, "max_count_per_400")
        check(0.0 <= self.empty_fraction <= 1.0, "empty_fraction")
        check(0.0 < self.reference_density < 1.0, "reference_density")
        ordered("density_clip", 1e-3)
        check(0 <= self.smooth_polygons <= 4, "smooth_polygons")
        check(0.0 <= self.max_overlap <= 1.0, "max_overlap")
        check(1 <= self.redraws <= 1000, "redraws")
        check(0.0 <= self.warp <= 0.4, "warp")
        check(0.0 <= self.super_percentile_shift <= 0.5, "super_percentile_shift")
        check(0 <= self.super_dilate <= 10, "super_dilate")
        check(self.local_contrast >= 0.0, "local_contrast")
        ordered("texture_contrast")
        ordered("gain_range", 1e-3)
        check(0.0 <= self.clear_chromatin <= 1.0, "clear_chromatin")
        ordered("rim")
        ordered("blur_sigma")
        check(0.0 <= self.darkness_jitter < 1.0, "darkness_jitter")
        check(0.0 <= self.min_darkness <= 3.0, "min_darkness")
        check(self.debris_rate >= 0 and self.blob_rate >= 0, "debris_rate")
        check(0.0 <= self.colour_jitter < 0.5, "colour_jitter")
        check(isinstance(self.guide, str), "guide")
        check(0.0 < self.guide_threshold < 1.0, "guide_threshold")
        check(0 <= self.guide_dilate <= 10, "guide_dilate")
        check(self.guide_tta in (1, 2, 4, 8), "guide_tta")
        check(0.0 <= self.guide_confident <= 1.0, "guide_confident")
        check(0.0 <= self.darkness_floor < 1.0, "darkness_floor")
        check(0.0 <= self.transplant_fraction <= 1.0, "transplant_fraction")
        for name in ("red_cell_rate", "fibre_rate", "pigment_rate"):
            check(0.0 <= getattr(self, name) <= 100.0, name)
        check(0.0 <= self.lymphocyte_fraction <= 1.0, "lymphocyte_fraction")
        check(2.0 <= self.lymphocyte_diameter[0] <= 20.0 and self.lymphocyte_diameter[1] >= 0, "lymphocyte_diameter")
        check(0.0 <= self.lymphocyte_clustering <= 1.0, "lymphocyte_clustering")
        check(0.0 <= self.section_thickness <= 20.0, "section_thickness")
        check(0.0 <= self.lymphocyte_dark_quantile < 1.0, "lymphocyte_dark_quantile")
        if self.transplant_fraction > 0 and not self.guide:
            raise ValueError("SynthConfig.transplant_fraction needs a guide model (SynthConfig.guide)")

    @property
    def model_mpp(self) -> float:
        """µm/px of the stored patches (and of a model trained on them)."""
        return self.output_mpp or self.mpp

    @property
    def factor(self) -> int:
        """Synthesis px per stored px along a side (1 unless ``output_mpp`` is coarser than ``mpp``)."""
        return max(1, round(self.model_mpp / self.mpp))

    @property
    def synth_size(self) -> int:
        """Side of a patch as synthesis makes it, in px at ``mpp``."""
        return self.size * self.factor

    def to_dict(self) -> dict:
        """JSON-able form (tuples become lists).

        ``output_mpp`` is left out when unset, so the configurations (and the recorded runs and datasets) of
        versions before it keep their identity.
        """
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if not out["output_mpp"]:
            del out["output_mpp"]
        return out

    @classmethod
    def from_dict(cls, values: dict) -> SynthConfig:
        """Build from :meth:`to_dict` output (or a YAML/JSON file's mapping); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown synthesis parameter(s): {', '.join(sorted(unknown))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
