"""``stamp.load``: the one place that turns a name, run folder, model folder or Hub id into an
:class:`stamp.encoder.Encoder` (resolve -> create -> load).

INTERIM: handles this project's own layouts (aligned StampModel folders, gene-encoder folders,
the ``stamp-v1`` registry entries). The zoo work extends it to the catalogue's timm /
transformers entries; callers never change.
"""
from __future__ import annotations

import os
from typing import Any

from stamp.encoder import Encoder, Provenance


def load(name_or_path: str | os.PathLike, *, device: Any = None, means: str | os.PathLike | None = None,
         kind: str | None = None) -> Encoder:
    """Load any encoder of the zoo in eval mode. ``means``: the released gene-means file for models
    that ship none; ``kind``: ``"image"`` / ``"gene"`` to take one side of an aligned model."""
    import torch

    from stamp.embed_multimodal import is_stamp_model
    from stamp.hub import resolve_model_source

    folder = resolve_model_source(name_or_path)
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prov = Provenance(name=str(name_or_path), source=str(name_or_path))
    if is_stamp_model(folder):
        from stamp.embed_multimodal import load_stamp_model

        net, tokenizer, _ = load_stamp_model(str(folder), str(dev), means,
                                             need_tokenizer=kind != "image")
        enc = Encoder(net, kind="aligned", embed_dim=net.config.embed_dim, provenance=prov,
                      transform=net.image_transform, tokenizer=tokenizer,
                      image_fn=lambda px: net.encode_image(px.to(net.device)),
                      gene_fn=lambda ids: net.encode_gene(ids.to(net.device)),
                      input_size=net.config.vision.img_size)
    else:
        from stamp.embed import load_model

        net, tokenizer = load_model(str(folder), dev, means)
        enc = Encoder(net, kind="gene", embed_dim=net.config.hidden_size, provenance=prov, tokenizer=tokenizer,
                      gene_fn=lambda ids: net.embed(ids.to(net.device)))
    return enc.eval()


__all__ = ["load"]
