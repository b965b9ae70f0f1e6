"""Stage 0, settings: how a slide is cut up and processed, and the names of what a finished slide holds."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from pysynth.instances import InstanceConfig
from pysynth.lymphocyte import CALLS as LYMPHOCYTE_CALLS
from pysynth.segment import TTA_CHOICES

PARTS = ".parts"
SETTINGS = "settings.json"
#: Version of the per-nucleus measurements: regions saved by a version with other measurements are not mixed in.
MEASUREMENTS_VERSION = 4  # 3: hematoxylin spread and eosin mean and spread; 4: marking dye dropped (pysynth.dye)
#: Least context around a region (model px). It must exceed the largest nucleus (about 15 µm, 60 px at 0.25 µm/px)
#: so the region that keeps a nucleus sees it whole, and the network's reach so its maps near a seam are those of
#: one pass. On the seam test's real region (134 nuclei, cores of 160 px, default model) margins of 128 and 96 give
#: the nuclei of one pass exactly; 64 moves 4 (IoU < 0.95) and finds one twice; 32 moves 10.
MIN_MARGIN = 128
#: Formats of ``InferConfig.labels``.
LABEL_FORMATS = ("none", "ome-tiff")
SUMMARY = "summary.json"
GEOJSON = "nuclei.geojson"
#: ``InferConfig.geojson = "zip"``: the GeoJSON deflated in a zip archive, its one entry named ``GEOJSON``. QuPath's
#: object import reads ``.zip`` archives of GeoJSON (and writes them on export); it does not read ``.gz``.
GEOJSON_ZIP = "nuclei.geojson.zip"
#: Formats of ``InferConfig.geojson``.
GEOJSON_FORMATS = ("plain", "zip")
OVERLAY = "overlay.png"
CSV_DIR = "csv"
#: Lymphocyte density of a slide (with a class output): the raw grid (nuclei per mm² of tissue, NaN off tissue)
#: and a heatmap over the thumbnail.
DENSITY_GRID = "lymphocyte_density.npy"
DENSITY_MAP = "lymphocyte_density.png"
#: Side of a cell of the lymphocyte density grid, µm (the 50 µm patches of TIL maps, doubled for counts that
#: are not mostly 0 or 1).
DENSITY_CELL_UM = 100.0


@dataclass(frozen=True)
class InferConfig:
    """How a slide is cut up and processed (part of a run's identity: a change restarts unfinished slides).

    Attributes:
        core: Side of the regions that own nuclei, in pixels at the model's resolution.
        margin: Context read around each region's core, in pixels at the model's resolution (cut at the slide's
            edges: the network sees no made-up pixels beyond the slide, as ``segment`` sees none beyond an image).
            It must exceed the largest nucleus' radius (nuclei are owned by their centroid) and be wide enough that
            the network's output near the core's edge does not depend on what lies beyond the margin.
        normalise: ``"none"`` (default), ``"reinhard"`` (L*a*b* mean and deviation of the slide's tissue to the
            model's training tissue) or ``"macenko"`` (stain vectors and the 99th percentile of stain
            concentrations to the usual reference). On the 13 labelled dev tiles (DICE avg / AJI / PQ) Reinhard
            gives 0.683 / 0.521 / 0.475, Macenko 0.691 / 0.533 / 0.491, none 0.685 / 0.525 / 0.482: differences at
            the noise level; on held-out real tissue Reinhard lowered accuracy, so none is the default. Macenko
            washes out slides with many dark nuclei (their 99th percentile of haematoxylin is scaled down): on the
            bundled dermis slide it lost a third of the nuclei.
        tile: 0 (default): the network sees each window in one pass. Otherwise the window is cut into near-equal
            cores of about this side, each passed with ``tile_context`` px of the window around it and kept on its
            core only (:func:`pysynth.segment.core_splits`): with the default context the maps are those of one
            pass bit for bit (the shipped networks reach 128 px), so nuclei do not change, only the activations'
            cache footprint and memory.
        tile_context: Context of those tiles (a multiple of 16; 128 is exact for the shipped models, 96 moved
            the maps by < 0.01 on real tissue, 64 changed 6 of 643 nuclei).
        tta: Flips/rotations of each window averaged by the network stage (1, 2, 4 or 8; ``tta`` times its cost).
        min_confidence: Nuclei whose confidence (mean segmentation probability over their pixels) is below this
            are dropped; ``None``: the model's own ``instances.min_confidence``.
        precision: Network arithmetic: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (GPU).
        lymphocyte_threshold: With a class output, nuclei whose lymphocyte probability is at least this are
            classified ``Lymphocyte``; ``None``: the model's own (``classes.lymphocyte_threshold`` of its card).
        lymphocyte_call: ``"probability"`` (default): a lymphocyte is a nucleus at ``lymphocyte_threshold`` or
            above; ``"probability+rule"``: its log-odds against that threshold plus the small-dark-round rule over
            the slide's nuclei is above 0 (:mod:`pysynth.lymphocyte`).
        keep_dye: Keep the objects of tissue-marking dye's colours, which are dropped by default
            (:mod:`pysynth.dye`: blue, teal or green ink absorbs red far more than green, which no H&E mix does).
        compile: Run the network through ``torch.compile`` (one compilation per window shape, about 8-12 s each on
            this project's 2-core CPU; falls back to eager with a warning where it cannot compile). On that CPU a
            2,304² pass alone ran 1.21× faster (5.15 against 4.25 Mpx/s), but end to end on a 50 Mpx bench slide
            (24 regions, four window shapes) compiling cost more than it saved (32-50 s against 26-28 s eager): it
            can pay only on slides of about a gigapixel and more. Maps differ from eager by float rounding (< 1e-5;
            the same nuclei on that slide).
        labels: ``"none"`` (default) or ``"ome-tiff"``: also write the nuclei as a tiled, pyramidal OME-TIFF of
            uint32 instance ids at the model's resolution (:mod:`pysynth.infer.labels`).
        geojson: ``"plain"`` (default): ``nuclei.geojson``; ``"zip"``: ``nuclei.geojson.zip`` instead, the same
            bytes deflated in a zip archive (15% of the size on the bundled slide; QuPath imports it as it is).
        min_tissue: A region is processed when the tissue fraction of its core exceeds this.
        overlay_mpp: Resolution of ``overlay.png`` (coarsened further for slides above 8,000 px at it).
    """

    core: int = 2048
    margin: int = 128
    tile: int = 0
    tile_context: int = 128
    normalise: str = "none"
    tta: int = 1
    min_confidence: float | None = None
    precision: str = "fp32"
    lymphocyte_threshold: float | None = None
    lymphocyte_call: str = "probability"
    keep_dye: bool = False
    compile: bool = False
    labels: str = "none"
    geojson: str = "plain"
    min_tissue: float = 0.0
    overlay_mpp: float = 2.0

    def __post_init__(self) -> None:
        if self.core < 64:
            raise ValueError(f"core must be at least 64 px, got {self.core}")
        if self.margin < MIN_MARGIN:
            raise ValueError(
                f"margin must be at least {MIN_MARGIN} px (smaller margins cut, move or duplicate nuclei on region "
                f"seams), got {self.margin}"
            )
        if self.tile and (self.tile < 256 or self.tile % 16):
            raise ValueError(f"tile must be 0 (one pass) or a multiple of 16 of at least 256 px, got {self.tile}")
        if self.tile_context < 0 or self.tile_context % 16:
            raise ValueError(f"tile_context must be a non-negative multiple of 16, got {self.tile_context}")
        if self.normalise not in ("reinhard", "macenko", "none"):
            raise ValueError(f"normalise must be reinhard, macenko or none, got {self.normalise!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.tta not in TTA_CHOICES:
            raise ValueError(f"tta must be one of {', '.join(map(str, TTA_CHOICES))}, got {self.tta!r}")
        if self.lymphocyte_threshold is not None and not 0.0 <= self.lymphocyte_threshold <= 1.0:
            raise ValueError(f"lymphocyte_threshold must be in [0, 1], got {self.lymphocyte_threshold}")
        if self.lymphocyte_call not in LYMPHOCYTE_CALLS:
            raise ValueError(
                f"lymphocyte_call must be one of {', '.join(LYMPHOCYTE_CALLS)}, got {self.lymphocyte_call!r}"
            )
        if self.min_confidence is not None and not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {self.min_confidence}")
        if self.labels not in LABEL_FORMATS:
            raise ValueError(f"labels must be one of {', '.join(LABEL_FORMATS)}, got {self.labels!r}")
        if self.geojson not in GEOJSON_FORMATS:
            raise ValueError(f"geojson must be one of {', '.join(GEOJSON_FORMATS)}, got {self.geojson!r}")

    def record(self) -> dict:
        """The settings as recorded with a slide's results.

        ``labels``, ``geojson``, ``lymphocyte_call`` and ``keep_dye`` are there only when not their defaults, so
        the slides of versions before them keep their identity.
        """
        out = asdict(self)
        if not out["keep_dye"]:
            del out["keep_dye"]
        if out["lymphocyte_call"] == "probability":
            del out["lymphocyte_call"]
        if out["labels"] == "none":
            del out["labels"]
        if out["geojson"] == "plain":
            del out["geojson"]
        return out

    @property
    def geojson_name(self) -> str:
        """The file name of a slide's GeoJSON in this format."""
        return GEOJSON_ZIP if self.geojson == "zip" else GEOJSON

    def instances(self, model: InstanceConfig) -> InstanceConfig:
        """The post-processing a run uses: the model's, with ``min_confidence`` replaced when one is given."""
        if self.min_confidence is None:
            return model
        return replace(model, min_confidence=self.min_confidence)
