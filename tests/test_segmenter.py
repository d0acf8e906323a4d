"""Segmenter: the exported baseline against an independent functional implementation, the official
checkpoint layout through `hgdeploy run`, and fewer clusters costing fewer FLOPs (the published figures:
tests/test_published_flops.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from hgdeploy.cli import main
from hgdeploy.core.contract import INPUT_NAME
from hgdeploy.core.recipe import load_recipe
from hgdeploy.families.catalogue import get_family
from hgdeploy.measure.flops import count_gflops_fast
from hgdeploy.patch.export import export_onnx
from hgdeploy.patch.models import build_models


def _ln(x, sd, prefix, eps=1e-5):  # noqa: ANN001, ANN202
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps)


def _block(x, sd, p, heads):  # noqa: ANN001, ANN202
    """Pre-norm ViT block written from the paper's equations with einsum, not from our modules."""
    B, N, C = x.shape
    h = _ln(x, sd, f"{p}.norm1")
    q, k, v = torch.einsum("bnc,oc->bno", h, sd[f"{p}.attn.qkv.weight"]).add(sd[f"{p}.attn.qkv.bias"]).split(C, -1)
    q, k, v = (t.reshape(B, N, heads, C // heads) for t in (q, k, v))
    a = torch.einsum("bqhd,bkhd->bhqk", q, k).mul((C // heads) ** -0.5).softmax(-1)
    o = torch.einsum("bhqk,bkhd->bqhd", a, v).reshape(B, N, C)
    x = x + torch.einsum("bnc,oc->bno", o, sd[f"{p}.attn.proj.weight"]) + sd[f"{p}.attn.proj.bias"]
    h = _ln(x, sd, f"{p}.norm2")
    h = F.gelu(torch.einsum("bnc,oc->bno", h, sd[f"{p}.mlp.fc1.weight"]) + sd[f"{p}.mlp.fc1.bias"])
    return x + torch.einsum("bnc,oc->bno", h, sd[f"{p}.mlp.fc2.weight"]) + sd[f"{p}.mlp.fc2.bias"]


def reference_segmenter(sd: dict, im: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Segmenter's forward from its state dict and variant.yml net_kwargs (mask-transformer decoder)."""
    P, C, n_cls = cfg["patch_size"], cfg["d_model"], cfg["n_cls"]
    B, _, H, W = im.shape
    x = F.conv2d(im, sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"], stride=P)
    gh, gw = H // P, W // P
    x = torch.cat([sd["encoder.cls_token"].expand(B, -1, -1), x.flatten(2).transpose(1, 2)], 1)
    pos = sd["encoder.pos_embed"]
    th, tw = cfg["image_size"][0] // P, cfg["image_size"][1] // P
    grid = pos[:, 1:].reshape(1, th, tw, C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(1, -1, C)
    x = x + torch.cat([pos[:, :1], grid], 1)
    for i in range(cfg["n_layers"]):
        x = _block(x, sd, f"encoder.blocks.{i}", cfg["n_heads"])
    x = _ln(x, sd, "encoder.norm")[:, 1:]
    x = torch.einsum("bnc,oc->bno", x, sd["decoder.proj_dec.weight"]) + sd["decoder.proj_dec.bias"]
    x = torch.cat([x, sd["decoder.cls_emb"].expand(B, -1, -1)], 1)
    for i in range(cfg["decoder"]["n_layers"]):
        x = _block(x, sd, f"decoder.blocks.{i}", C // 64)
    x = _ln(x, sd, "decoder.decoder_norm")
    patches, classes = x[:, :-n_cls] @ sd["decoder.proj_patch"], x[:, -n_cls:] @ sd["decoder.proj_classes"]
    patches, classes = F.normalize(patches, dim=-1, eps=0), F.normalize(classes, dim=-1, eps=0)
    masks = _ln(patches @ classes.transpose(1, 2), sd, "decoder.mask_norm")
    masks = masks.transpose(1, 2).reshape(B, n_cls, gh, gw)
    return F.interpolate(masks, size=(H, W), mode="bilinear", align_corners=False)


def test_baseline_onnx_computes_the_published_architecture(tmp_path: Path):
    """Our rebuilt modules, exported, against a functional implementation from the state dict alone."""
    import yaml

    from hgdeploy.families.segmenter import _VariantLoader

    family = get_family("segmenter")
    torch.manual_seed(3)
    model, size = family.tiny()  # trained at 64x64, run at 64x96: the positional embedding is resized
    ckpt = family.write_checkpoint(model, tmp_path / "ckpt")
    cfg = yaml.load((ckpt.parent / "variant.yml").read_text(), Loader=_VariantLoader)["net_kwargs"]
    sd = torch.load(str(ckpt), weights_only=True)["model"]
    loaded = family.load(str(ckpt), size, {})
    x = torch.randn(2, 3, *size)
    path = export_onnx(loaded, x[:1], tmp_path / "baseline.onnx", family.output_names)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for i in range(2):
        got = session.run(None, {INPUT_NAME: x[i:i + 1].numpy()})[0]
        with torch.no_grad():
            want = reference_segmenter(sd, x[i:i + 1], cfg).numpy()
        assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()


def test_fewer_clusters_cost_fewer_flops():
    """The 8x8 .. 28x28 sweep is monotone and stays below the baseline (on the ViT-Ti backbone: the count's shape
    does not depend on the width, and ViT-L's own figures are test_published_flops.py's)."""
    counts = []
    for side in (8, 16, 28):
        rec = load_recipe("segmenter_vit_l16_ade20k", [f"cluster.grid={side}x{side}", "model.input_size=640x640",
                                                       "model.arch=vit_tiny_patch16_384"])
        models = build_models(rec)
        counts.append(count_gflops_fast(models.patched, torch.zeros(1, 3, 640, 640)).total)
    baseline = count_gflops_fast(models.baseline, torch.zeros(1, 3, 640, 640)).total
    assert counts == sorted(counts) and len(set(counts)) == 3 and counts[-1] < baseline


@pytest.mark.slow
def test_run_on_an_official_layout_checkpoint(tmp_path: Path, capsys, two_photos: Path):
    """`hgdeploy run` with a checkpoint.pth + variant.yml written like the authors' training does."""
    family = get_family("segmenter")
    torch.manual_seed(5)
    # the official layout at ViT-Ti size: what is tested is reading checkpoint.pth + variant.yml
    rec = load_recipe("segmenter_vit_b16_ade20k", ["model.input_size=128x128", "model.arch=vit_tiny_patch16_384"])
    model = family.load(None, rec.input_size, rec.options)
    ckpt = family.write_checkpoint(model, tmp_path / "seg_base_mask")
    out = tmp_path / "out"
    quick = tmp_path / "quick.toml"
    quick.write_text('[engine]\nbackend = "onnxruntime"\n[bench]\nwarmup = 1\nruns = 2\n')
    code = main(["run", "segmenter_vit_b16_ade20k", "--set", f"model.checkpoint={ckpt}", "--set",
                 "model.input_size=128x128", "--set", "cluster.grid=6x6", "--images", str(two_photos), "--engine",
                 str(quick), "--out", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["parity"]["passed"]
    assert {"label_agreement", "cosine_mean"} <= set(report["fidelity"])
    assert (out / "baseline.onnx").is_file() and (out / "patched.opt.onnx").is_file()
