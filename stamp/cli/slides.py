"""``stamp embed-slides SLIDES... --model M --out FEATURES/``: thin wrapper over stamp.slides.embed_slides."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from stamp.cli._common import err_console, friendly_errors, non_negative_int, positive_float, positive_int
from stamp.slides.tissue import TissueParams

_D = TissueParams()


def _fraction(value: float) -> float:
    if value is not None and not 0 <= value <= 1:
        raise typer.BadParameter(f"{value} is not a fraction in [0, 1].")
    return value


def register(app: typer.Typer) -> None:
    @app.command("embed-slides")
    @friendly_errors
    def embed_slides_cmd(
        slides: List[Path] = typer.Argument(..., help="Slide files (.svs .ndpi .mrxs .scn .tif ...) or folders of them."),
        model: str = typer.Option(..., "--model", help="Any image or aligned encoder: zoo name (`stamp models`), "
                                  "run / model folder or Hub repo id."),
        out: Path = typer.Option(..., "--out", help="Features folder: <slide>.h5 bags, qc/<slide>.png, manifest.json."),
        layout: str = typer.Option("trident", "--layout", help="Bag layout: trident (<slide>.h5, TRIDENT's "
                                   "attributes) or clam (h5_files/<slide>.h5 + pt_files/<slide>.pt, CLAM's)."),
        tile_um: float = typer.Option(_D.tile_um, "--tile-um", callback=positive_float, help="Tile side in µm."),
        um_per_px: float = typer.Option(_D.um_per_px, "--um-per-px", callback=positive_float,
                                        help="Target scale of the tiles (0.5 = 20x: 128 µm tiles are 256 px)."),
        slide_um_per_px: Optional[float] = typer.Option(
            None, "--slide-um-per-px", callback=positive_float,
            help="Level-0 µm/px of the slides, for files without a scale (overrides the files')."),
        min_tissue: float = typer.Option(_D.min_tissue, "--min-tissue", callback=_fraction,
                                         help="Keep a tile when at least this fraction of it is tissue."),
        mask_um_per_px: float = typer.Option(_D.mask_um_per_px, "--mask-um-per-px", callback=positive_float,
                                             help="Resolution of the tissue-mask thumbnail."),
        min_saturation: int = typer.Option(_D.min_saturation, "--min-saturation", callback=non_negative_int,
                                           help="Floor of the Otsu saturation threshold (0-255; CLAM's sthresh)."),
        median_px: int = typer.Option(_D.median_px, "--median-px", callback=positive_int,
                                      help="Median blur kernel on the thumbnail (CLAM's mthresh)."),
        close_px: int = typer.Option(_D.close_px, "--close-px", callback=non_negative_int,
                                     help="Morphological closing kernel (CLAM's close)."),
        min_tissue_area: float = typer.Option(_D.min_tissue_mm2, "--min-tissue-area", callback=positive_float,
                                              help="Drop tissue pieces smaller than this (mm²; CLAM's a_t=100)."),
        min_hole_area: float = typer.Option(_D.min_hole_mm2, "--min-hole-area", callback=positive_float,
                                            help="Fill holes smaller than this (mm²; CLAM's a_h=16)."),
        max_holes: int = typer.Option(_D.max_holes, "--max-holes", callback=non_negative_int,
                                      help="Largest holes kept per tissue piece (CLAM's max_n_holes)."),
        keep_pen: bool = typer.Option(False, "--keep-pen", help="Do not remove blue/green/black marker ink."),
        batch_size: int = typer.Option(64, "--batch-size", callback=positive_int),
        workers: Optional[int] = typer.Option(None, "--workers", callback=non_negative_int,
                                              help="Tile-reading processes (default: CPUs, at most 8; 0: none)."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if "
                                             "present; under torchrun cuda:LOCAL_RANK)."),
        weights: Optional[Path] = typer.Option(None, "--weights", help="Weights file or folder downloaded by hand "
                                               "for a zoo name (gated or offline use)."),
        fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop at the first slide that fails."),
        no_progress: bool = typer.Option(False, "--no-progress"),
    ) -> None:
        """One feature bag per slide (tissue tiles, any image encoder); resumable; torchrun splits slides."""
        from stamp.errors import SlideError
        from stamp.slides.embed import check_embed_args, embed_slides

        params = TissueParams(tile_um=tile_um, um_per_px=um_per_px, min_tissue=min_tissue,
                              mask_um_per_px=mask_um_per_px, min_saturation=min_saturation, median_px=median_px,
                              close_px=close_px, min_tissue_mm2=min_tissue_area, min_hole_mm2=min_hole_area,
                              max_holes=max_holes, pen=not keep_pen)
        if weights is not None:
            import stamp

            check_embed_args(out, slide_um_per_px, layout)  # before the weights load

            model = stamp.load(model, weights=weights, device="cpu", kind="image")  # embed_slides places it
        result = embed_slides(slides, model, out, params=params, um_per_px=slide_um_per_px, batch_size=batch_size,
                              workers=workers, device=device, progress=not no_progress, fail_fast=fail_fast,
                              layout=layout)
        if result.failed:
            raise SlideError(result.summary())
        err_console.print(f"{result.summary()}; bags in {out}")
