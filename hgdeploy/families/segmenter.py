"""Adapter for Segmenter (Strudel et al.): ViT encoder + mask-transformer or linear decoder.

Checkpoints come in the layout of the authors' repository: a torch file holding the state dict
under "model", with a `variant.yml` beside it whose `net_kwargs` describe the network. Two ways to
place the reconstruction: "logits" (the official expedited Segmenter: the decoder runs on the
cluster tokens and its per-token class logits are rebuilt) or "features" (tokens rebuilt after
`reconstruct_after` encoder layers, the decoder sees all N tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from hgdeploy.core.errors import UserError
from hgdeploy.core.plan import ClusterPlan, ModelFacts
from hgdeploy.core.preprocess import Preprocess, check_patch_multiple
from hgdeploy.core.recipe import Section
from hgdeploy.families.registry import Family
from hgdeploy.models.checkpoints import existing, load_state_strict, read_torch_file, state_dict_from
from hgdeploy.models.segmenter import BACKBONE_RE, NORMALIZATION, NetConfig, Segmenter, config_for
from hgdeploy.spans.vit import ClusteredSpan, insert_span

CHECKPOINT_NAME = "checkpoint.pth"
VARIANT_NAME = "variant.yml"
DECODERS = ("mask_transformer", "linear")
NET_KEYS = ("backbone", "d_model", "n_heads", "n_layers", "patch_size", "image_size", "n_cls", "decoder")


class _VariantLoader(yaml.SafeLoader):
    """Safe YAML plus the one Python tag the authors' files use (`image_size: !!python/tuple`)."""


_VariantLoader.add_constructor("tag:yaml.org,2002:python/tuple",
                               lambda loader, node: tuple(loader.construct_sequence(node)))


def _pair(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (value[0], value[1])
    raise UserError(f"{what} must be an integer or a pair of integers, got {value!r}")


def read_variant(path: Path) -> NetConfig:
    """net_kwargs of a variant.yml -> NetConfig, naming the first missing or malformed entry."""
    try:
        data = yaml.load(path.read_text(), Loader=_VariantLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read {path}: {str(exc).splitlines()[0]}") from exc
    net = data.get("net_kwargs") if isinstance(data, dict) else None
    if not isinstance(net, dict):
        raise UserError(f"{path} has no net_kwargs table (the Segmenter variant.yml layout)")
    missing = [k for k in NET_KEYS if k not in net]
    if missing:
        raise UserError(f"{path}: net_kwargs lacks {missing[0]}")
    dec = net["decoder"]
    if not isinstance(dec, dict) or dec.get("name") not in DECODERS:
        raise UserError(f"{path}: net_kwargs.decoder.name must be one of {', '.join(DECODERS)}")
    norm = net.get("normalization", "vit")
    if norm not in NORMALIZATION:
        raise UserError(f"{path}: unknown normalization {norm!r} (known: {', '.join(NORMALIZATION)})")
    ints = {k: net[k] for k in ("d_model", "n_heads", "n_layers", "patch_size", "n_cls")}
    bad = [k for k, v in ints.items() if not isinstance(v, int) or v < 1]
    if bad:
        raise UserError(f"{path}: net_kwargs.{bad[0]} must be a positive integer, got {net[bad[0]]!r}")
    if ints["d_model"] % 64:
        raise UserError(f"{path}: d_model {ints['d_model']} is not a multiple of 64 (the decoder uses d_model/64 heads)")
    return NetConfig(backbone=str(net["backbone"]), image_size=_pair(net["image_size"], f"{path}: image_size"),
                     n_cls=ints["n_cls"], d_model=ints["d_model"], n_heads=ints["n_heads"], n_layers=ints["n_layers"],
                     patch_size=ints["patch_size"], decoder=dec["name"], decoder_layers=int(dec.get("n_layers", 2)),
                     distilled=bool(net.get("distilled", False)), normalization=norm)


def checkpoint_files(checkpoint: str) -> tuple[Path, Path]:
    """(weights file, variant.yml): a folder holding both, or the weights file with variant.yml beside it."""
    path = existing(checkpoint)
    weights = path / CHECKPOINT_NAME if path.is_dir() else path
    if not weights.is_file():
        raise UserError(f"{path} holds no {CHECKPOINT_NAME}; pass the Segmenter checkpoint file or its folder")
    variant = weights.parent / VARIANT_NAME
    if not variant.is_file():
        raise UserError(f"{variant} not found: a Segmenter checkpoint needs the variant.yml written beside it by "
                        f"training (its net_kwargs describe the network)")
    return weights, variant


def config_from_options(options: Section, input_size: tuple[int, int]) -> NetConfig:
    arch = options.get("arch")
    if not isinstance(arch, str) or not BACKBONE_RE.fullmatch(arch):
        raise UserError(f"model.arch={arch!r}: without a checkpoint the segmenter family needs an official backbone "
                        f"name such as 'vit_large_patch16_384' or 'vit_base_patch16_384'")
    decoder = options.get("decoder", "mask_transformer")
    if decoder not in DECODERS:
        raise UserError(f"model.decoder={decoder!r} must be one of {', '.join(DECODERS)}")
    return config_for(arch, options.get("num_classes", 150), input_size, decoder, options.get("decoder_layers", 2))


def segmenter_classes(checkpoint: str | None, options: Section) -> int:
    """n_cls of the checkpoint's variant.yml, else model.num_classes (default 150): no weights read."""
    if checkpoint:
        return read_variant(checkpoint_files(checkpoint)[1]).n_cls
    return int(options.get("num_classes", 150))


def load_segmenter(checkpoint: str | None, input_size: tuple[int, int], options: Section) -> Segmenter:
    """From an official checkpoint (variant.yml decides the architecture) or random weights for `model.arch`."""
    if checkpoint:
        weights, variant = checkpoint_files(checkpoint)
        config = read_variant(variant)
        state = state_dict_from(read_torch_file(weights), str(weights), keys=("model",))
    else:
        config, state = config_from_options(options, input_size), None
    check_patch_multiple(input_size, config.patch_size)
    torch.manual_seed(0)
    model = Segmenter(config)
    if state is not None:
        load_state_strict(model, state, str(weights))
    model.input_size = input_size
    return model.eval()


def write_checkpoint(model: Segmenter, folder: Path) -> Path:
    """checkpoint.pth ({"model": state dict, "n_cls": ...}) and variant.yml, as the authors' training writes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "n_cls": model.config.n_cls}, folder / CHECKPOINT_NAME)
    variant = {"net_kwargs": model.config.to_net_kwargs(),
               "dataset_kwargs": {"normalization": model.config.normalization}}
    (folder / VARIANT_NAME).write_text(yaml.dump(variant))
    return folder / CHECKPOINT_NAME


class ClusterLogits(nn.Module):
    """The head of a clustered Segmenter: final norm and decoder on the cluster tokens -> [B, M, n_cls]."""

    def __init__(self, model: Segmenter):
        super().__init__()
        self.norm = model.encoder.norm
        self.decoder = model.decoder
        self.num_prefix_tokens = model.encoder.num_extra_tokens

    def forward(self, h: Tensor) -> Tensor:
        return self.decoder.token_logits(self.norm(h)[:, self.num_prefix_tokens:])


class ClusteredSegmenter(nn.Module):
    """Segmenter whose decoder runs on the cluster tokens; its per-token logits are rebuilt (official)."""

    output_names = Segmenter.output_names

    def __init__(self, model: Segmenter, plan: ClusterPlan):
        super().__init__()
        self.model = model
        self.alpha = plan.alpha
        blocks = list(model.encoder.blocks[plan.alpha:])
        self.span = ClusteredSpan(blocks, plan, model.encoder.num_extra_tokens, head=ClusterLogits(model))

    def forward(self, im: Tensor) -> tuple[Tensor]:
        x = self.model.encoder.embed(im)
        for block in self.model.encoder.blocks[: self.alpha]:
            x = block(x)
        return (self.model.to_image(self.span(x), (im.shape[2], im.shape[3])),)


def patch_segmenter(model: Segmenter, plan: ClusterPlan) -> nn.Module:
    if plan.reconstruct_on == "logits":
        return ClusteredSegmenter(model, plan)
    model.encoder.blocks = insert_span(model.encoder.blocks, plan, model.encoder.num_extra_tokens)
    return model


def tiny_segmenter() -> tuple[Segmenter, tuple[int, int]]:
    """A 4-layer, 64-wide Segmenter (mask transformer, 5 classes) at 64x96, for tests."""
    config = NetConfig(backbone="vit_tiny_patch16_384", image_size=(64, 64), patch_size=16, d_model=64, n_heads=4,
                       n_layers=4, n_cls=5, decoder="mask_transformer", decoder_layers=2)
    model = Segmenter(config).eval()
    model.input_size = (64, 96)
    return model, (64, 96)


def segmenter_facts(model: Segmenter) -> ModelFacts:
    """The token grid of the input size; the variant's normalization (vit: 0.5/0.5, deit: ImageNet)."""
    mean, std = NORMALIZATION[model.config.normalization]
    p = model.config.patch_size
    return ModelFacts(token_grid=(model.input_size[0] // p, model.input_size[1] // p), depth=model.config.n_layers,
                      preprocess=Preprocess(model.input_size, "bilinear", mean, std))


FAMILY = Family(
    name="segmenter",
    summary="Segmenter: ViT encoder + mask-transformer or linear decoder (authors' checkpoint.pth + variant.yml)",
    outputs=(("logits", "segmentation"),),
    load=load_segmenter,
    patch=patch_segmenter,
    facts=segmenter_facts,
    inference="slide",
    tiny=tiny_segmenter,
    write_checkpoint=write_checkpoint,
    options=("arch", "num_classes", "decoder", "decoder_layers"),
    reconstruct_on=("logits", "features"),
    classes=segmenter_classes,
)
