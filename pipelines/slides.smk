# Whole-slide feature bags, one Snakemake job per slide (the scale-out path of `stamp embed-slides`).
#
#   snakemake -s pipelines/slides.smk --config slides=/data/tcga_brca model=uni out=features --cores 16 \
#       --resources gpu=4 --keep-going
#   (cluster: add --profile pipelines/profiles/slurm)
#
# Config: slides (folder or list of slide files), model (any image / aligned encoder stamp.load takes),
# out (features folder), optional: workers (tile readers per job, default 4), batch_size (64),
# device, um_per_px (level-0 scale for files without one), layout (trident, default: OUT/<slide>.h5;
# clam: OUT/h5_files/<slide>.h5 + OUT/pt_files/<slide>.pt), tissue (TissueParams fields: tile_um,
# um_per_px, min_tissue, min_tissue_mm2 ...). Each job calls stamp.slides.embed_slides on one slide,
# so a bag equals what `stamp embed-slides` writes; bags appear atomically (a failed job leaves
# none) and the shared manifest.json is merged under a file lock.

from pathlib import Path

from stamp.slides.bags import DEFAULT_LAYOUT, bag_path
from stamp.slides.embed import expand_slides
from stamp.slides.reader import slide_name
from stamp.slides.tissue import TissueParams

_src = config["slides"]
PATHS = {slide_name(p): p for p in expand_slides(_src if isinstance(_src, list) else [_src])}
OUT = Path(config["out"])
LAYOUT = str(config.get("layout", DEFAULT_LAYOUT))
BAG = str(bag_path(OUT, "{slide}", LAYOUT))
_D = TissueParams()
# --config values arrive as text: each takes the type of its default
PARAMS = TissueParams(**{k: (str(v).lower() in ("1", "true", "yes")) if isinstance(getattr(_D, k), bool)
                         else type(getattr(_D, k))(v) for k, v in dict(config.get("tissue", {})).items()})


rule all:
    input:
        expand(BAG, slide=sorted(PATHS)),


rule embed_slide:
    """One slide -> its bag in OUT (+ OUT/qc/<slide>.png, its manifest entry)."""
    input:
        lambda wc: str(PATHS[wc.slide]),
    output:
        BAG,
    threads: int(config.get("workers", 4))
    resources:
        gpu=1,
    run:
        from stamp.slides.embed import embed_slides

        embed_slides([input[0]], config["model"], OUT, params=PARAMS, um_per_px=config.get("um_per_px"),
                     batch_size=int(config.get("batch_size", 64)), workers=threads, device=config.get("device"),
                     progress=False, fail_fast=True, rank=0, world_size=1, layout=LAYOUT)
