"""DIR/README.md: the Hugging Face dataset card of a corpus, complete for the Hub.

Its YAML ``configs`` make ``datasets.load_dataset(DIR)`` (and, once published,
``load_dataset("org/name")``) return the spots; ``genes``, ``slides`` (and ``paired`` when
image patches are present) are extra configs, each with ``dataset_info.features``. The card
carries the corpus license (the most restrictive among the slides, see ``most_restrictive``),
a per-source table, the citation of every source, how the corpus was built and its
limitations. Deterministic text (no dates), because the card is listed in manifest.json.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

import yaml

from spavis import __version__
from spavis.format import schema as S

GENERATED_SOURCES = ("generated", "simulated", "spavis.simulate")

# Families of licenses, least to most restrictive (the explicit order the corpus license uses).
# "other" = terms that are recorded but are no standard license (e.g. "GEO public data, see the
# original publication"): a reuser must read each source's terms, so nothing is more restrictive.
LICENSE_ORDER = (
    "cc0", "pddl", "mit", "bsd-2-clause", "bsd-3-clause", "apache-2.0",
    "cc-by", "cc-by-sa", "cc-by-nc", "cc-by-nc-sa", "cc-by-nd", "cc-by-nc-nd", "other",
)
UNKNOWN_LICENSE = "unknown"  # a slide whose source recorded no license at all


def normalize_license(text: Any) -> str:
    """Hugging Face license id of a free-text license ("CC BY-NC-SA 4.0 (HEST-1k)" -> cc-by-nc-sa-4.0).

    Returns ``"unknown"`` when nothing is recorded and ``"other"`` for terms that are no standard license.
    """
    if text is None or (isinstance(text, float) and text != text):
        return UNKNOWN_LICENSE
    raw = str(text).strip().lower()
    if not raw or raw in ("none", "null", "nan", "unknown"):
        return UNKNOWN_LICENSE
    t = re.sub(r"[\s_]+", " ", raw)
    if re.search(r"\bcc0\b|public domain", t):
        return "cc0-1.0"
    m = re.search(r"\bcc[ -]?by((?:[ -](?:nc|sa|nd))*)(?:[ -]?v?(\d\.\d))?", t)
    if m:
        parts = re.findall(r"nc|sa|nd", m.group(1))
        suffix = "".join(f"-{p}" for p in ("nc", "sa", "nd") if p in parts)
        if "sa" in parts and "nd" in parts:
            return "other"
        return f"cc-by{suffix}-{m.group(2) or '4.0'}"
    if re.search(r"\bpddl\b", t):
        return "pddl"
    if re.search(r"\bmit\b", t):
        return "mit"
    if re.search(r"\bapache\b", t):
        return "apache-2.0"
    if re.search(r"\bbsd[ -]?3", t):
        return "bsd-3-clause"
    if re.search(r"\bbsd[ -]?2", t):
        return "bsd-2-clause"
    return "other"


def _family(license_id: str) -> str:
    if license_id in ("cc0-1.0",):
        return "cc0"
    return re.sub(r"-\d\.\d$", "", license_id) if license_id.startswith("cc-by") else license_id


def most_restrictive(licenses: Iterable[str]) -> str:
    """The corpus license: the most restrictive of the slides' license ids (``LICENSE_ORDER``).

    Share-alike plus non-commercial slides give cc-by-nc-sa (neither alone covers both terms);
    share-alike plus no-derivatives cannot be combined and give "other". Unknown licenses
    count as "other" (``spavis publish`` refuses them unless told otherwise).
    """
    ids = sorted({("other" if x == UNKNOWN_LICENSE else x) for x in licenses})
    if not ids:
        return "other"
    fams = {_family(x) for x in ids}
    fams_known = {f if f in LICENSE_ORDER else "other" for f in fams}
    has_sa = any(f.endswith("-sa") for f in fams_known)
    has_nd = any(f.endswith("-nd") for f in fams_known)
    has_nc = any("-nc" in f for f in fams_known)
    if has_sa and has_nd:
        return "other"
    top = max(fams_known, key=LICENSE_ORDER.index)
    if top == "other":
        return "other"
    if has_sa and has_nc and top != "cc-by-nc-sa":
        top = "cc-by-nc-sa"
    versions = sorted(x for x in ids if _family(x) == top)
    if versions:
        return versions[-1]
    return f"{top}-4.0" if top.startswith("cc-by") else top


def _features_yaml(schema, config_name: str) -> dict[str, Any]:
    """``dataset_info`` entry for one config, written by ``datasets`` itself (its YAML dialect)."""
    import datasets
    from datasets.info import DatasetInfo

    hf = (schema.metadata or {}).get(b"huggingface")  # e.g. the paired schema's Image features
    features = datasets.Features.from_arrow_schema(schema if hf else schema.remove_metadata())
    return DatasetInfo(features=features, config_name=config_name)._to_yaml_dict()


def _size_category(n: int) -> str:
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")]
    for bound, label in bounds:
        if n < bound:
            return label
    return "100M<n<1B"


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def source_table(slides: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per source: slides, spots kept, license ids and recorded license texts, citations."""
    rows: dict[str, dict[str, Any]] = {}
    for s in sorted(slides, key=lambda s: (str(s.get("source")), str(s.get("slide_id")))):
        r = rows.setdefault(str(s.get("source") or "unknown"), {
            "source": str(s.get("source") or "unknown"), "n_slides": 0, "n_spots": 0,
            "licenses": {}, "citations": [], "unlicensed": []})
        r["n_slides"] += 1
        r["n_spots"] += int(s.get("n_spots_kept") or 0)
        lic = normalize_license(s.get("license"))
        if lic == UNKNOWN_LICENSE:
            r["unlicensed"].append(str(s.get("slide_id")))
        else:
            r["licenses"].setdefault(lic, set()).add(str(s.get("license")).strip())
        cit = str(s.get("citation") or "").strip()
        if cit and cit not in r["citations"]:
            r["citations"].append(cit)
    return list(rows.values())


def config_description(build_key: str) -> str:
    """The ``description`` of every card config: names the build, so it keys the ``datasets`` cache.

    ``datasets.load_dataset(DIR)`` caches a local folder with card ``configs`` under
    ``<folder name>/<config>/<version>/<hash>``, where the hash covers only the card's configs (their
    unresolved ``data_files`` patterns and fields such as this description) and ``dataset_info``:
    neither the folder's path nor its files. Without the build key in a hashed field, a corpus
    rebuilt in place, or another corpus in a folder of the same name, would load the rows cached
    for the first one. The build key digests everything that decides the output bytes.
    """
    return f"spavis corpus build {build_key}"


def render_card(*, vocab, params: dict[str, Any], stats: dict[str, Any], slides: list[dict[str, Any]],
                build_key: str, paired: bool = False) -> str:
    """Markdown card with YAML front matter for the Hub and ``datasets``."""
    license_ids = [normalize_license(s.get("license")) for s in slides]
    corpus_license = most_restrictive(license_ids)
    description = config_description(build_key)
    configs: list[dict[str, Any]] = [
        {"config_name": "default", "default": True, "description": description,
         "data_files": [{"split": "train", "path": f"{S.EXPRESSION_DIR}/*.parquet"}]},
        {"config_name": "genes", "description": description,
         "data_files": [{"split": "train", "path": S.GENES_FILE}]},
        {"config_name": "slides", "description": description,
         "data_files": [{"split": "train", "path": S.SLIDES_FILE}]},
    ]
    from spavis.shards.annotations import expression_schema

    expression = expression_schema(params.get("obs_columns") or ())  # + --obs-columns annotations
    infos = [_features_yaml(expression, "default"), _features_yaml(S.GENES_SCHEMA, "genes"),
             _features_yaml(S.SLIDES_SCHEMA, "slides")]
    paired_dir = getattr(S, "PAIRED_DIR", "data/paired")
    if paired:
        configs.append({"config_name": "paired", "description": description,
                        "data_files": [{"split": "train", "path": f"{paired_dir}/*.parquet"}]})
        paired_schema = getattr(S, "PAIRED_SCHEMA", None)
        if paired_schema is not None:
            infos.append(_features_yaml(paired_schema, "paired"))
    front: dict[str, Any] = {"configs": configs, "dataset_info": infos, "license": corpus_license}
    if corpus_license == "other":  # the Hub asks for a name and a link for "other"
        front["license_name"] = "per-slide"
        front["license_link"] = "README.md#licenses"
    front.update({
        "tags": ["spatial-transcriptomics", "visium", "biology", "spavis"],
        "pretty_name": "spavis Visium corpus",
        "size_categories": [_size_category(int(stats.get("n_spots", 0)))],
    })
    generated = [s["slide_id"] for s in slides if str(s.get("source", "")).lower() in GENERATED_SOURCES]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        "# spavis Visium corpus",
        "",
        f"Human 10x Visium spatial transcriptomics, harmonized to one gene vocabulary and sharded by "
        f"`spavis build-shards` (spavis {__version__}, shard format `{S.FORMAT_NAME}` v{S.FORMAT_VERSION}).",
        "",
    ]
    if generated:
        lines += [
            f"> **Generated data:** {len(generated)} of {len(slides)} slides are generated by "
            "`spavis.simulate` (not measured): " + ", ".join(f"`{g}`" for g in generated[:20])
            + (" …" if len(generated) > 20 else ""),
            "",
        ]
    lines += [
        "| | |",
        "|---|---|",
        f"| slides | {stats['n_slides']} |",
        f"| spots (kept after QC) | {stats['n_spots']:,} of {stats['n_spots_input']:,} |",
        f"| expression files | {stats['n_expression_files']} |",
        f"| vocabulary | `{vocab.name}` ({len(vocab):,} genes, {stats['n_genes_detected']:,} detected) |",
        f"| vocabulary checksum | `{vocab.checksum}` |",
        f"| parameters | {', '.join(f'{k}={v}' for k, v in sorted(params.items()))} |",
        f"| license | `{corpus_license}` (the most restrictive license among the slides; see below) |",
        "",
        "## Loading",
        "",
        "```python",
        "import datasets",
        'spots = datasets.load_dataset("path/or/org-name", split="train")            # or streaming=True',
        'genes = datasets.load_dataset("path/or/org-name", "genes", split="train")',
        'slides = datasets.load_dataset("path/or/org-name", "slides", split="train")',
        "",
        "import spavis",
        'corpus = spavis.open_corpus("path/or/org-name", revision=None)  # Hub: downloads only what is read',
        "for table in corpus.iter_slides():                 # one pyarrow.Table per slide",
        "    X = spavis.rows_to_csr(table, len(corpus.genes)) # scipy CSR, raw counts",
        "```",
        "",
        "On the Hub every published build is tagged `build-<build_key>` (`build_key` from manifest.json), "
        "so `revision=\"build-…\"` always names the same bytes; `spavis validate org/name --revision R` "
        "re-checks a published revision against its manifest.",
        "",
        "## Layout",
        "",
        f"- `{S.EXPRESSION_DIR}/part-*.parquet`: one row per kept spot: `spot_id` (`<slide_id>:<barcode>`), "
        "`slide_id`, `barcode`, `spot_index` (0…n-1 within the slide), `gene_index` (vocabulary indices of "
        "nonzero genes, ascending), `counts` (raw counts aligned with `gene_index`), `total_counts`, "
        "`n_genes`, `array_row`, `array_col`, `pxl_row`, `pxl_col` (full-resolution pixels, null without "
        "coordinates), `neighbors` (spot_index of the k nearest spots of the same slide, nearest first) and "
        "`neighbor_distances` (micrometres). A slide never spans two files; its rows are contiguous.",
        f"- `{S.GENES_FILE}`: the vocabulary in index order with nonzero counts, sums and means of raw and "
        "CP10k-normalized counts (each spot scaled to 10,000 counts over vocabulary genes), exact over the corpus.",
        f"- `{S.SLIDES_FILE}`: one row per slide: provenance, condition, license, citation, QC and gene "
        "mapping counts, input sha256, and which expression file holds it.",
        f"- `{S.ZARR_DIR}/<slide_id>.zarr`: each slide as an AnnData Zarr store with "
        "`obsp['spatial_connectivities']`/`obsp['spatial_distances']` (squidpy conventions).",
    ]
    if paired:
        lines.append(f"- `{paired_dir}/part-*.parquet`: H&E patch and region images per spot, aligned with "
                     "the expression files (config `paired`).")
    lines += [
        f"- `{S.MANIFEST_FILE}`: versions, parameters, build key, every input and output with sha256; "
        "check with `spavis validate DIR` (or `spavis validate org/name`).",
        "",
        "## Licenses",
        "",
        f"The corpus as a whole is released under **`{corpus_license}`**: the most restrictive license among "
        "its slides, in the order " + " < ".join(f"`{f}`" for f in LICENSE_ORDER) + " (share-alike together "
        "with non-commercial gives `cc-by-nc-sa`). Each slide keeps its own license and citation in "
        "`slides.parquet`; respect them when reusing the data.",
        "",
        "| source | slides | spots | license | recorded terms |",
        "|---|---|---|---|---|",
    ]
    table = source_table(slides)
    for r in table:
        lic = ", ".join(f"`{k}`" for k in sorted(r["licenses"]))
        terms = "; ".join(_md(t) for k in sorted(r["licenses"]) for t in sorted(r["licenses"][k]))
        if r["unlicensed"]:
            lic = (lic + ", " if lic else "") + f"**unknown** ({len(r['unlicensed'])} slide(s))"
            terms = (terms + "; " if terms else "") + "no license recorded"
        lines.append(f"| {_md(r['source'])} | {r['n_slides']} | {r['n_spots']:,} | {lic} | {terms} |")
    unlicensed = [sid for r in table for sid in r["unlicensed"]]
    if unlicensed:
        lines += [
            "",
            f"**{len(unlicensed)} slide(s) without a recorded license** (their terms are unknown; ask the "
            "data owners before reuse): " + ", ".join(f"`{x}`" for x in unlicensed[:50])
            + (" …" if len(unlicensed) > 50 else ""),
        ]
    lines += ["", "## Citation", "", "Cite every source whose slides you use:", ""]
    for r in table:
        for cit in r["citations"]:
            lines.append(f"- **{_md(r['source'])}**: {_md(cit)}")
    if not any(r["citations"] for r in table):
        lines.append("- (no citation recorded)")
    lines += [
        "",
        "## How it was built",
        "",
        f"- `spavis build-shards` (spavis {__version__}), shard format `{S.FORMAT_NAME}` v{S.FORMAT_VERSION}.",
        f"- Vocabulary `{vocab.name}`: {len(vocab):,} genes, checksum `{vocab.checksum}`; Ensembl version "
        "suffixes stripped, symbols resolved approved → previous → alias (ambiguous symbols dropped), duplicate "
        "features summed.",
        "- Parameters: " + ", ".join(f"`{k}={v}`" for k, v in sorted(params.items())) + ".",
        "- QC: in-tissue spots with at least `min_genes` detected vocabulary genes; NaN or negative counts rejected.",
        "- Spatial graph: the `k_neighbors` nearest spots of the same slide, distances in µm (65 µm spot disc "
        "from Space Ranger's `spot_diameter_fullres`, or the hexagonal lattice without pixels).",
        "- Every input file and output file is listed with its sha256 in `manifest.json`.",
        "",
        "## Limitations",
        "",
        "- Human 10x Visium only (55 µm spots, several cells per spot); other technologies and species are "
        "not included.",
        "- Counts are raw and not batch-corrected; slides differ in protocol, depth and tissue handling.",
        f"- Genes outside the `{vocab.name}` vocabulary are dropped; gene symbols that could not be resolved "
        "unambiguously are dropped (see the mapping columns of `slides.parquet`).",
        "- The composition (organs, conditions, sources) reflects what public repositories hold, not a "
        "balanced sample: " + ", ".join(f"{k} {v}" for k, v in stats.get("organs", {}).items()) + ".",
    ]
    no_coords = [s["slide_id"] for s in slides if s.get("has_coordinates") is False]
    if no_coords:
        lines.append(f"- {len(no_coords)} slide(s) have no spot coordinates (no spatial graph): "
                     + ", ".join(f"`{x}`" for x in no_coords[:20]) + ".")
    non_int = [s["slide_id"] for s in slides if s.get("counts_are_integer") is False]
    if non_int:
        lines.append(f"- {len(non_int)} slide(s) carry non-integer counts as published: "
                     + ", ".join(f"`{x}`" for x in non_int[:20]) + ".")
    if generated:
        lines.append(f"- {len(generated)} slide(s) are generated by `spavis.simulate`, not measured: do not use "
                     "them for biological conclusions.")
    lines.append("")
    return "\n".join(lines)
