"""MobileViT v1 (Mehta & Rastegari, ICLR 2022): MobileNetV2 blocks plus MobileViT blocks that run a small
transformer over 2x2-patch-unfolded feature maps.

Written for clean export and FP16 engines:
- unfold/fold are reshape + permute only (no `F.unfold`, no interpolation), so the ONNX graph is static;
  the consequence is that the input side must be a multiple of 64 (32x downsampling, then 2x2 patches at
  the last stage) -- anything else raises `InputError` instead of silently resizing;
- attention is written out as MatMul -> Softmax -> MatMul and normalisation is `nn.LayerNorm`, which export to
  ONNX `Softmax` and opset-17 `LayerNormalization`: named ops an FP16 converter can keep in FP32
  (LayerNorm/Softmax overflow in FP16 is what breaks ViTs on TensorRT, NVIDIA/TensorRT#2709).
Layer configuration follows apple/ml-cvnets `config/mobilevit.py`. The forward pass is the same as ml-cvnets' and
timm's (`timm/models/mobilevit.py`): official checkpoints of both load by renaming alone and reproduce their logits
to ~1e-7 (`edgedeploy/models/official/{cvnets,timm}.py`), so no architecture option is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torchvision.ops import Conv2dNormActivation

from edgedeploy.errors import InputError
from edgedeploy.models.initialisation import init_weights
from edgedeploy.models.registry import register_model

PATCH = 2  # patch height and width of every MobileViT block
STRIDE = 32  # total downsampling of the network
SIZE_MULTIPLE = STRIDE * PATCH


@dataclass(frozen=True)
class MobileViTConfig:
    channels: tuple[int, int, int, int, int]  # outputs of layer1..layer5
    dims: tuple[int, int, int]  # transformer width in layer3..layer5
    depths: tuple[int, int, int] = (2, 4, 3)  # transformer layers in layer3..layer5
    expand: int = 4  # MobileNetV2 expansion ratio
    stem: int = 16
    heads: int = 4
    head_exp: int = 4  # final 1x1 conv expands the last layer by this factor


CONFIGS = {
    "xxs": MobileViTConfig(channels=(16, 24, 48, 64, 80), dims=(64, 80, 96), expand=2),
    "xs": MobileViTConfig(channels=(32, 48, 64, 80, 96), dims=(96, 120, 144)),
    "s": MobileViTConfig(channels=(32, 64, 96, 128, 160), dims=(144, 192, 240)),
}


def _conv(in_ch: int, out_ch: int, k: int = 1, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Module:
    return Conv2dNormActivation(
        in_ch, out_ch, k, stride=stride, groups=groups, activation_layer=nn.SiLU if act else None
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block with SiLU: 1x1 expand, 3x3 depthwise, 1x1 linear projection."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int):
        super().__init__()
        hidden = in_ch * expand
        self.block = nn.Sequential(
            _conv(in_ch, hidden), _conv(hidden, hidden, 3, stride, groups=hidden), _conv(hidden, out_ch, act=False)
        )
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class Attention(nn.Module):
    """Multi-head self-attention with the softmax written out, so ONNX shows MatMul/Softmax/MatMul."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, dim: int, ffn_dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.SiLU(), nn.Linear(ffn_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class MobileViTBlock(nn.Module):
    """Local 3x3 conv -> 1x1 to `dim` -> transformer over unfolded patches -> fold -> 1x1 back -> fuse with input."""

    def __init__(self, channels: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.local = nn.Sequential(_conv(channels, channels, 3), nn.Conv2d(channels, dim, 1, bias=False))
        self.transformer = nn.Sequential(*[TransformerLayer(dim, dim * 2, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.proj = _conv(dim, channels)
        self.fuse = _conv(2 * channels, channels, 3)

    @staticmethod
    def unfold(x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B * P, N, C): each of the P=4 pixel positions in a patch attends across the N patches."""
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH)
        x = x.permute(0, 3, 5, 2, 4, 1)  # B, ph, pw, H/ph, W/pw, C
        return x.reshape(b * PATCH * PATCH, (h // PATCH) * (w // PATCH), c)

    @staticmethod
    def fold(x: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
        c = x.shape[-1]
        x = x.reshape(b, PATCH, PATCH, h // PATCH, w // PATCH, c)
        x = x.permute(0, 5, 3, 1, 4, 2)  # B, C, H/ph, ph, W/pw, pw
        return x.reshape(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if not torch.jit.is_tracing() and (h % PATCH or w % PATCH):
            raise InputError(
                f"MobileViT block got a {h}x{w} feature map; it must be divisible by the {PATCH}x{PATCH} patch"
            )
        y = self.local(x)
        y = self.norm(self.transformer(self.unfold(y)))
        y = self.proj(self.fold(y, b, h, w))
        return self.fuse(torch.cat((x, y), dim=1))


class MobileViT(nn.Module):
    def __init__(self, config: MobileViTConfig, num_classes: int = 1000, dropout: float = 0.1):
        super().__init__()
        c1, c2, c3, c4, c5 = config.channels
        self.stem = _conv(3, config.stem, 3, stride=2)
        self.layer1 = InvertedResidual(config.stem, c1, 1, config.expand)
        self.layer2 = nn.Sequential(
            InvertedResidual(c1, c2, 2, config.expand),
            InvertedResidual(c2, c2, 1, config.expand),
            InvertedResidual(c2, c2, 1, config.expand),
        )
        vit_layers = []
        for in_ch, out_ch, dim, depth in zip((c2, c3, c4), (c3, c4, c5), config.dims, config.depths, strict=True):
            vit_layers.append(
                nn.Sequential(
                    InvertedResidual(in_ch, out_ch, 2, config.expand), MobileViTBlock(out_ch, dim, depth, config.heads)
                )
            )
        self.layer3, self.layer4, self.layer5 = vit_layers
        self.num_features = c5 * config.head_exp
        self.head_conv = _conv(c5, self.num_features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.num_features, num_classes))
        init_weights(self, linear="trunc_normal")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if not torch.jit.is_tracing() and (h % SIZE_MULTIPLE or w % SIZE_MULTIPLE):  # shapes are tensors when tracing
            raise InputError(
                f"MobileViT needs an input side that is a multiple of {SIZE_MULTIPLE} (32x downsampling, then "
                f"{PATCH}x{PATCH} patches), got {h}x{w}; use e.g. --imgsz 256"
            )
        x = self.layer2(self.layer1(self.stem(x)))
        x = self.layer5(self.layer4(self.layer3(x)))
        x = self.pool(self.head_conv(x)).flatten(1)
        return self.classifier(x)


# The paper gives 1.3M / 2.3M / 5.6M parameters; open-mmlab/mmpretrain's MobileViT README (weights converted
# from ml-cvnets) gives two decimals for both parameters and FLOPs. Those FLOPs come from fvcore, which also
# counts BatchNorm (2/element) and LayerNorm (5/element): fvcore on this implementation gives 0.418 / 1.052 /
# 2.033 G, matching them, while FlopCounterMode (conv/matmul only) gives 0.407 / 1.026 / 2.001 G.
_SOURCE = "params+MACs: open-mmlab/mmpretrain configs/mobilevit/README.md (fvcore count); paper arXiv:2110.02178"


def _register(variant: str, params: float, macs: float, aliases: tuple[str, ...] = ()) -> None:
    name = f"mobilevit_{variant}"

    def build(num_classes: int = 1000, **kwargs) -> nn.Module:
        return MobileViT(CONFIGS[variant], num_classes=num_classes, **kwargs)

    build.__name__ = name
    build.__doc__ = f"MobileViT-{variant.upper()} at 256x256 (input side must be a multiple of {SIZE_MULTIPLE})."
    register_model(
        name, task="classify", family="mobilevit", imgsz=256, aliases=aliases,
        published_params=params, published_macs=macs, source=_SOURCE,
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),  # ml-cvnets and timm: [0, 1], no normalisation
        imgsz_multiple=SIZE_MULTIPLE,
        extra={"macs_counter": "fvcore (adds BatchNorm/LayerNorm element ops)"},
    )(build)  # fmt: skip


_register("xxs", 1.27e6, 0.42e9)
_register("xs", 2.32e6, 1.05e9)
_register("s", 5.58e6, 2.03e9, aliases=("mobilevit",))
