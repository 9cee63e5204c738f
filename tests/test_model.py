"""StampGeneEncoder, configs and the IGR/CGR objectives."""
from __future__ import annotations

import json

import pytest
import torch

from stamp.models.gene_encoder import PAD_ID, ModelConfigError, StampConfig, StampGeneEncoder, create_model, load_config
from stamp.training.objectives import IGNORE, cgr_loss, mask_tokens, neighbour_context


def _model(**kw):
    torch.manual_seed(0)
    return create_model("tiny", n_genes=100, **kw).eval()


def test_base_config_is_table3():
    c = load_config("base")
    assert (c.n_genes + c.n_reserved, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads) == (
        20340, 512, 1024, 12, 16)
    assert (c.dropout, c.layer_norm_eps, c.context_length, c.activation) == (0.0, 1e-12, 1500, "relu")


def test_bad_config_names_the_problem(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"hidden_size": 30, "num_heads": 4}))
    with pytest.raises(ModelConfigError, match="divisible"):
        load_config(bad)
    with pytest.raises(ModelConfigError, match="preset"):
        load_config("nope")


def test_padding_is_ignored_and_all_pad_rows_are_finite():
    m = _model()
    ids = torch.randint(30, 130, (3, 40))
    ids[1, 25:] = PAD_ID
    ids[2] = PAD_ID
    e = m.embed(ids)
    longer = torch.cat([ids, torch.full((3, 17), PAD_ID)], 1)
    assert torch.allclose(m.embed(longer), e, atol=1e-5)
    assert torch.isfinite(m(ids)).all()
    assert e[2].abs().sum() == 0
    # changing a padded position's token id would change the result only if padding leaked
    assert not torch.allclose(e[0], e[1])


def test_truncates_to_context_and_rejects_foreign_ids():
    m = _model()
    ids = torch.randint(30, 130, (2, 200))
    assert m(ids).shape == (2, 128, 64)
    with pytest.raises(ModelConfigError, match="token ids"):
        m(torch.full((1, 5), 500))


def test_save_and_from_pretrained_roundtrip(tmp_path):
    m = _model()
    m.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    m2 = StampGeneEncoder.from_pretrained(str(tmp_path))
    assert isinstance(m2.config, StampConfig) and m2.config == m.config
    ids = torch.randint(30, 130, (4, 50))
    assert torch.equal(m2.embed(ids), m.embed(ids))


def test_stamp_v1_pooling_option():
    m = _model(pooling="stamp-v1")
    ids = torch.randint(30, 130, (2, 20))
    h = m(ids)
    assert torch.allclose(m.embed(ids), h[:, 3:].mean(1))


def test_masking_rates_and_labels():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(30, 1030, (200, 500))
    ids[:, 400:] = PAD_ID
    out = mask_tokens(ids, vocab_size=1030, generator=g)
    sel = out.labels != IGNORE
    assert not sel[:, 400:].any()
    assert abs(sel.float().mean().item() / 0.8 - 0.15) < 0.01
    assert torch.equal(out.labels[sel], ids[sel])
    assert torch.equal(out.input_ids[~sel], ids[~sel])
    masked = (out.input_ids[sel] == 0).float().mean().item()
    kept = (out.input_ids[sel] == ids[sel]).float().mean().item()
    assert abs(masked - 0.8) < 0.02 and 0.09 < kept < 0.12  # 10% kept (+ rare random hits)
    assert (out.input_ids[sel] >= 30).sum() + (out.input_ids[sel] == 0).sum() == sel.sum()


def test_neighbour_context_is_masked_mean_over_neighbours():
    h = torch.arange(2 * 9 * 3 * 2, dtype=torch.float32).view(18, 3, 2)
    valid = torch.ones(18, 3, dtype=torch.bool)
    valid[5, 2] = False
    c = neighbour_context(h, valid, 9)
    assert torch.allclose(c[0, 0], h[1:9, 0].mean(0))
    keep = [i for i in range(1, 9) if i != 5]
    assert torch.allclose(c[0, 2], h[keep, 2].mean(0))
    assert torch.allclose(c[1, 1], h[10:18, 1].mean(0))


def test_cgr_uses_only_neighbours():
    m = _model()
    ids = torch.randint(30, 130, (9, 20))
    labels = torch.full_like(ids, IGNORE)
    labels[0, :5] = ids[0, :5]
    h = m(ids)
    loss = cgr_loss(m, h, ids, labels)
    h2 = h.clone()
    h2[0] += 100.0  # the seed's own states must not matter
    assert torch.allclose(cgr_loss(m, h2, ids, labels), loss)
    with pytest.raises(ValueError):
        cgr_loss(m, h[:8], ids[:8], labels[:8])


def test_cgr_reads_the_batch_groups_not_row_order():
    """StampForPretraining takes groups from the typed batch: permuting rows (and groups with them)
    gives the same losses; the same rows read as consecutive groups give a different CGR loss."""
    from stamp.training.objectives import StampForPretraining

    m = _model()
    ids = torch.randint(30, 130, (18, 20))
    labels = torch.full_like(ids, IGNORE)
    labels[:, :6] = ids[:, :6]
    groups = torch.arange(18).view(2, 9)
    pre = StampForPretraining(m, spatial=True)
    out = pre(ids, ids, labels, groups)
    perm = torch.randperm(18, generator=torch.Generator().manual_seed(1))
    inv = torch.argsort(perm)
    out_perm = pre(ids[perm], ids[perm], labels[perm], inv[groups])
    assert torch.allclose(out.cgr_loss, out_perm.cgr_loss, atol=1e-5)
    assert torch.allclose(out.igr_loss, out_perm.igr_loss, atol=1e-5)
    assert not torch.allclose(pre(ids[perm], ids[perm], labels[perm], groups).cgr_loss, out.cgr_loss)
    with pytest.raises(ValueError, match="groups"):
        pre(ids, ids, labels, None)


def test_run_folder_written_with_the_old_stamp_v1_names_still_loads(tmp_path):
    """Issue 18: pooling / tokenizer mode "stamp-v1" are now "released"; folders written before read the same."""
    import json

    import numpy as np

    from stamp.tokenizer import GeneTokenizer

    m = _model(pooling="released")
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["pooling"] == "released"
    cfg["pooling"] = "stamp-v1"  # as written by the earlier version
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    old = StampGeneEncoder.from_pretrained(str(tmp_path))
    assert old.config.pooling == "released"
    ids = torch.randint(30, 130, (3, 20))
    assert torch.equal(old.embed(ids), m.embed(ids))
    genes = [f"ENSG{i:011d}" for i in range(100)]
    tok = GeneTokenizer(genes, np.full(100, 2.4), mode="stamp-v1")
    assert tok.mode == "released" and tok.pad_value == 0 and tok.max_length == 4096
    tok.save_pretrained(tmp_path / "tok")
    saved = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    saved["mode"] = "stamp-v1"
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(saved))
    assert GeneTokenizer.from_pretrained(tmp_path / "tok").mode == "released"
