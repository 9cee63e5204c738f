"""Every model card ``stamp`` writes, in one module: Markdown text from plain dicts.

* :func:`model_card`: a pretrained gene encoder (``stamp pretrain``);
* :func:`stamp_model_card`: an aligned StampModel (``stamp pretrain --stage align``);
* :func:`converted_model_card`: a converted STAMP release, from its catalogue entry and the
  conversion's mapping report.

No model class, no torch: cards are written from the run's ``run.json`` and ``config.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from spavis.format.io import atomic_write_text

CARD_NAME = "README.md"


def card_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def training_tables(train: dict, metrics: dict) -> str:
    """The settings table and the last-logged metrics table every trained card carries (one layout)."""
    return (f"| setting | value |\n|---|---|\n{card_rows(train)}\n\n## Metrics (last logged step)\n\n"
            f"| metric | value |\n|---|---|\n{card_rows(metrics, '| (none) | |')}")


def card_rows(values: dict, empty: str = "") -> str:
    """``| key | value |`` Markdown table rows of a model card (floats to 4 significant digits)."""
    return "\n".join(f"| {k} | {card_value(v)} |" for k, v in values.items()) or empty


def _corpus_revision(data: dict) -> str:
    """The Hub corpus commit the model was trained on (a line of the card), if it came from the Hub."""
    if not data.get("hub_id") or not data.get("hub_revision"):
        return ""
    rev = data["hub_revision"]
    return (f"\n- corpus revision: [`{data['hub_id']}@{rev}`](https://huggingface.co/datasets/{data['hub_id']}/tree/{rev})"
            f" (`datasets.load_dataset(\"{data['hub_id']}\", revision=\"{rev}\")`)")


def model_card(info: dict, config: dict) -> str:
    """Markdown model card (HF YAML header + sections) from run info and the model config."""
    data = info.get("data", {})
    train = info.get("train", {})
    metrics = info.get("final_metrics", {})
    licenses = sorted({str(x) for x in data.get("licenses", []) if x})
    license_id = info.get("license", "other")
    header = [
        "---",
        "library_name: stamp",
        f"license: {license_id}",
        "tags:",
        "- spatial-transcriptomics",
        "- visium",
        "- stamp",
        "- gene-encoder",
        "- model_hub_mixin",
        "- pytorch_model_hub_mixin",
    ]
    if data.get("hub_id"):
        header += ["datasets:", f"- {data['hub_id']}"]
    header.append("---")
    cfg_rows, training = card_rows(config), training_tables(train, metrics)
    fraction = data.get("generated_fraction", 1.0 if data.get("generated") else 0.0) or 0.0
    if fraction >= 1.0:
        generated = " **The training data were generated (spavis.simulate), not measured.**"
    elif fraction > 0.0:
        generated = (f" **{fraction:.1%} of the training spots were generated (spavis.simulate), not measured;**"
                     " the rest are measurements.")
    else:
        generated = ""
    body = f"""
# STAMP gene encoder ({info.get('stage', '?')} stage)

A spatially-aware gene encoder for 10x Visium spots, trained with the `stamp` package
(IGR{' + CGR' if info.get('stage') == 'spatial' else ''} objectives, see the STAMP paper,
arXiv:2602.13944). Input: a spot's genes ranked by expression relative to each gene's
non-zero mean (the bundled tokenizer files); output: one embedding per spot (mean of the
last layer over non-pad positions).

## Usage

```python
import scipy.sparse as sp
import torch
from stamp import GeneTokenizer, StampGeneEncoder
from stamp.tokenizer import to_model_input_ids
tokenizer = GeneTokenizer.from_pretrained("REPO_ID")
model = StampGeneEncoder.from_pretrained("REPO_ID").eval()
counts = sp.random(4, tokenizer.n_genes, density=0.05, format="csr", random_state=0) * 10  # spots x genes, raw counts
input_ids = to_model_input_ids(tokenizer.encode_csr(counts), tokenizer.pad_value, model.config.context_length)
embeddings = model.embed(torch.from_numpy(input_ids))  # (4, hidden_size)
```

or `stamp embed --model REPO_ID --data SHARD_DIR --out embeddings.parquet`.

## Training data

- corpus: `{data.get('source', '?')}` ({card_value(data.get('n_spots', '?'))} spots,
  {card_value(data.get('n_slides', '?'))} slides, {card_value(data.get('n_genes', '?'))} genes){generated}{_corpus_revision(data)}
- data licenses: {', '.join(licenses) if licenses else 'see the corpus card'}

## Training

- stage: {info.get('stage', '?')}; optimizer steps: {info.get('steps', '?')};
  spots seen: {card_value(info.get('spots_seen', '?'))}; initialised from: {info.get('init') or 'random'}

{training}

## Model config

| field | value |
|---|---|
{cfg_rows}

## Intended use and limitations

Research use: spot embeddings for clustering, domain annotation, retrieval and as the gene
side of image-gene alignment. Not for clinical decisions. Trained on human Visium data in
the corpus above only; other technologies, species or gene panels need re-tokenization
and may transfer poorly. Embeddings inherit the biases of the corpus composition (organs,
conditions, labs).

## License

Weights: `{license_id}`. They are derived from the training data, whose licenses are
listed above; check them before redistribution. Code: BSD-3-Clause (`stamp`).
"""
    return "\n".join(header) + "\n" + body.lstrip("\n")


def write_model_card(model_dir: str | Path, info: dict, render: Callable[[dict, dict], str] = model_card) -> Path:
    """Write ``model_dir/README.md`` from run info and ``model_dir/config.json`` (``render``: the card's
    text from both; the gene encoder's :func:`model_card` unless given)."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    path = model_dir / CARD_NAME
    atomic_write_text(path, render(info, config))
    return path




def stamp_model_card(info: dict, config: dict) -> str:
    """Markdown card (HF YAML header + sections) for an aligned StampModel, from the run info."""
    data = info.get("data", {})
    vision = info.get("vision", {})
    licenses = sorted({str(x) for x in data.get("licenses", []) if x})
    header = ["---", "library_name: stamp", f"license: {info.get('license', 'other')}", "tags:",
              "- spatial-transcriptomics", "- visium", "- pathology", "- stamp", "- image-gene-alignment",
              "- model_hub_mixin", "- pytorch_model_hub_mixin"]
    datasets = sorted({s.get("data") for s in info.get("stages", []) if s.get("data") and "/" in str(s.get("data"))
                       and not str(s.get("data")).startswith((".", "/"))})
    if datasets:
        header += ["datasets:"] + [f"- {x}" for x in datasets]
    header.append("---")
    stage_rows = "\n".join(
        f"| {i + 1} | {s.get('stage')} | {s.get('steps')} | `{s.get('data')}` |"
        f" {'yes' if s.get('generated') else 'no' if s.get('generated') is not None else '?'} |"
        for i, s in enumerate(info.get("stages", [])))
    training = training_tables(info.get("train", {}), info.get("final_metrics", {}))
    generated = (" **Some training data were generated (spavis.simulate), not measured.**"
                 if any(s.get("generated") for s in info.get("stages", [])) else "")
    gene = config.get("gene", {})
    vis = config.get("vision", {})
    body = f"""
# STAMP (gene encoder aligned with a pathology image encoder)

Spot expression and H&E patches embedded in one {config.get('embed_dim')}-dimensional space,
trained with the `stamp` package (STAMP, arXiv:2602.13944): gene encoder
({gene.get('num_layers')} layers, width {gene.get('hidden_size')}, pooling `{gene.get('pooling')}`) and vision
encoder `{vis.get('arch')}` ({vis.get('name')} config; trunk weights at the start: `{vision.get('weights')}`),
aligned with the patch-spot, region-spot, patch-region and cross-scale positioning losses.

## Usage

```python
import numpy as np
import scipy.sparse as sp
import torch
from PIL import Image
from stamp import GeneTokenizer, StampModel
from stamp.tokenizer import to_model_input_ids
model = StampModel.from_pretrained("REPO_ID").eval()
tokenizer = GeneTokenizer.from_pretrained("REPO_ID")
patch = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))  # an H&E patch
pixels = model.image_transform(patch)[None]         # resize {vis.get('img_size')}, ImageNet mean/std
counts = sp.random(4, tokenizer.n_genes, density=0.05, format="csr", random_state=0) * 10  # spots x genes
input_ids = to_model_input_ids(tokenizer.encode_csr(counts), tokenizer.pad_value, model.config.gene.context_length)
with torch.no_grad():
    image_embedding = model.encode_image(pixels)                     # (1, embed_dim), L2-normalised
    gene_embedding = model.encode_gene(torch.from_numpy(input_ids))  # (4, embed_dim), L2-normalised
```

or `stamp embed --model REPO_ID --data SHARD_DIR --modality fused --out emb.parquet`
(`--images FOLDER` for plain image files).

## Training stages

| # | stage | steps | data | generated |
|---|---|---|---|---|
{stage_rows}

Alignment corpus: `{data.get('source', '?')}` ({card_value(data.get('n_spots', '?'))} paired spots,
{card_value(data.get('n_slides', '?'))} slides).{generated} Data licenses:
{', '.join(licenses) if licenses else 'see the corpus card'}. Vision trunk frozen:
{vision.get('trunk_frozen')}; gene encoder frozen: {info.get('gene_frozen')}.

{training}

## Intended use and limitations

Research use: retrieval between H&E patches and spot expression, image features that carry
molecular signal, fused embeddings for domain annotation. Not for clinical decisions. The
image encoder's starting weights may carry their own terms (UNI: MahmoodLab's licence);
weights are derived from the training data, whose licenses are listed above.
"""
    return "\n".join(header) + "\n" + body.lstrip("\n")


def write_stamp_model_card(model_dir, info: dict) -> Path:
    """Write ``model_dir/README.md`` from run info and ``model_dir/config.json`` (atomically)."""
    return write_model_card(model_dir, info, render=stamp_model_card)


def finetuned_model_card(info: dict, config: dict) -> str:
    """Markdown card for an image encoder fine-tuned with spatial transcriptomics (``stamp finetune``)."""
    data, base, genes = info.get("data", {}), info.get("base", {}), info.get("genes", {})
    licenses = sorted({str(x) for x in data.get("licenses", []) if x})
    header = ["---", "library_name: stamp", f"license: {info.get('license', 'other')}", "tags:",
              "- spatial-transcriptomics", "- pathology", "- stamp", "- st-supervised-fine-tuning", "---"]
    generated = " **The training data were generated (spavis.simulate), not measured.**" if data.get("generated") \
        else ""
    body = f"""
# {base.get('name', 'image encoder')} fine-tuned with spatial transcriptomics (stamp finetune)

The image encoder `{base.get('name')}` (`{base.get('hub_id') or base.get('model')}`, revision
`{base.get('revision') or '-'}`, weights sha256 `{base.get('weights_sha256') or '-'}`) and a linear gene
projection of {genes.get('n')} highly variable genes (log1p of counts per 10,000; ranked by
{genes.get('ranking')}) trained with CLIP's symmetric InfoNCE between each H&E patch and its spot
(Chen et al. 2024, STimage-1K4M; the STAMP paper's ‡ rows). Shared space: {config.get('embed_dim')}-d;
image features (before the projection): {config.get('image_dim')}-d. Table 1 marks: {info.get('marks')}.

## Usage

```python
import stamp
enc = stamp.load("RUN")                              # this folder (or its run folder)
# enc.encode_images(pixels) -> shared space; enc.module.image_features(pixels) -> the encoder's own features
```

or `stamp embed --model RUN --data SHARD_DIR --modality image --out emb.parquet`, and
`stamp evaluate linear-probe --model RUN --data CORPUS --modality image --label COL --out DIR`.

## Data

Paired corpus: `{data.get('source', '?')}` ({card_value(data.get('n_spots', '?'))} spots,
{card_value(data.get('n_slides', '?'))} slides).{generated} Data licenses:
{', '.join(licenses) if licenses else 'see the corpus card'}.{_corpus_revision(data)}

## Training

{training_tables(info.get('train', {}), info.get('final_metrics', {}))}

## Terms

The base encoder's terms apply to this derivative (`{base.get('license')}`): read them on its model page before
any use or redistribution.
"""
    return "\n".join(header) + "\n" + body.lstrip("\n")


def write_finetuned_card(model_dir, info: dict) -> Path:
    """Write ``model_dir/README.md`` of a fine-tuned image encoder (atomically)."""
    return write_model_card(model_dir, info, render=finetuned_model_card)


def converted_model_card(entry: Any, report: Any = None, *, has_means: bool = False,
                         load_name: str | None = None) -> str:
    """README.md of a converted release: HF metadata, provenance, training, usage that runs as written."""
    load_name = load_name or entry.name
    full = entry.component == "full"
    tags = ["stamp", "spatial-transcriptomics", "visium", "gene-encoder"] + (
        ["pathology", "image-gene-alignment", "vision"] if full else [])
    header = ["---", "library_name: stamp", f"license: {entry.license}"]
    if entry.license_name:
        header.append(f"license_name: {entry.license_name}")
        header.append(f"license_link: {entry.terms_url}")
    header += ["tags:"] + [f"- {t}" for t in tags]
    header += [f"base_model: {entry.hub_id}", "---", ""]
    cls = "StampModel" if full else "StampGeneEncoder"
    means_arg = "" if has_means else ', means="Visium_mean.npy"'
    usage_py = [
        "```python",
        "import torch",
        "import scipy.sparse as sp",
        f"from stamp import {cls}, load_tokenizer",
        "from stamp.tokenizer import to_model_input_ids",
        f'model = {cls}.from_pretrained("{load_name}").eval()',
        f'tokenizer = load_tokenizer("{load_name}"{means_arg})',
        "counts = sp.random(4, tokenizer.n_genes, density=0.05, format=\"csr\", random_state=0) * 10  # spots x genes",
        "ids = to_model_input_ids(tokenizer.encode_csr(counts), tokenizer.pad_value, "
        + ("model.config.gene.context_length)" if full else "model.config.context_length)"),
        "with torch.no_grad():",
    ]
    if full:
        usage_py += [
            "    gene = model.encode_gene(torch.from_numpy(ids).long())      # (4, 512), L2-normalised",
            "    pixels = model.pixels(torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8))",
            "    image = model.encode_image(pixels)                          # (2, 512), L2-normalised",
        ]
    else:
        usage_py += ["    emb = model.embed(torch.from_numpy(ids).long())  # (4, 512) pooled last layer"]
    usage_py.append("```")
    cli = (f"stamp embed --model {load_name} --data SHARDS --modality fused --means Visium_mean.npy --out emb.parquet"
           if full else f"stamp embed --model {load_name} --data SHARDS --means Visium_mean.npy --out emb.parquet")
    g = entry.gene_config
    means_note = "is included here" if has_means else "is not redistributable: download it yourself and pass it"
    mapped = len(report.mapped) if report else "?"
    unused = len(report.unused) if report else "?"
    n_src = report.n_source if report else "?"
    sha = report.source_sha256 if report and report.source_sha256 else "?"
    body = f"""# {entry.name}: {'STAMP (gene + pathology image encoders)' if full else 'STAMP gene encoder'}, converted

{entry.description}

This folder was **converted** by `stamp convert` from the authors' release
[`{entry.hub_id}`]({entry.terms_url}) (`{entry.file}`, sha256 `{sha}`): {n_src} released
tensors, {mapped} mapped into this project's layout, {unused} deliberately unused (listed with
their reasons in `conversion.json`). The conversion is tested to reproduce the authors' forward
pass (gene and image embeddings equal within 1e-5 in float32 on CPU).

## Terms and license

{entry.license_note} Terms page: {entry.terms_url}.
The code that converted and loads it (`stamp`) is BSD-3-Clause.

## Usage

The tokenizer follows the released rules (`mode="released"`: ranked gene ratios against the
released per-gene means, up to 4,096 tokens, the model reads 1,500). The released means file
(`Visium_mean.npy`, {entry.tokenizer.get('means', '')}) {means_note}.

{chr(10).join(usage_py)}

Command line: `{cli}`

## Architecture

- gene encoder: {g.get('num_layers')} post-LN Transformer layers, width {g.get('hidden_size')},
  {g.get('n_genes')} genes + {g.get('n_reserved')} reserved ids, context {g.get('context_length')};
  pooling `{g.get('pooling')}` (the released one: last layer, mean over positions 3..end, padding included)
""" + (f"""- image encoder: timm `{(entry.vision_config or {}).get('arch')}` (UNI architecture) with the pretext token
  inserted after CLS; pooled = CLS output; images 224 x 224, ImageNet mean/std
- projections to {entry.embed_dim} (spot, patch, region, positioning) and the logit scale
- channel order: the released inference cut patches with OpenCV and fed BGR-ordered pixels; this
  conversion keeps that (`channel_order: bgr`): RGB images given to `image_transform` / `pixels`
  are swapped as the authors did
""" if full else "") + f"""
## Training (by the authors)

{entry.training}

Data: {'; '.join(entry.datasets)}.

## Evaluation

No `stamp evaluate` results are recorded for this conversion; see the paper for the
authors' numbers ({entry.paper}).

## Intended use and limitations

Research use (spot / patch embeddings, retrieval, clustering, linear probing). Not for clinical
decisions. Trained on human Visium data; other technologies, species or gene panels need
re-tokenization and may transfer poorly.

## Citation

```bibtex
{entry.citation}
```
"""
    return "\n".join(header) + body



__all__ = ["CARD_NAME", "card_value", "card_rows", "model_card", "write_model_card", "stamp_model_card",
           "write_stamp_model_card", "converted_model_card"]
