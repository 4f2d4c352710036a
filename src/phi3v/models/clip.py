"""The CLIP ViT vision tower of Phi-3(.5)-vision (`model.vision_embed_tokens.img_processor`).

Notation: N crops, T tokens per crop (1 CLS + P patches), C CLIP width, nh heads, hd head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn



@dataclass
class CLIPVisionConfig:
    """The keys of `img_processor.vision_config`; the defaults are openai/clip-vit-large-patch14-336."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_attention_heads: int = 16
    num_hidden_layers: int = 24
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @classmethod
    def from_dict(cls, d: dict) -> CLIPVisionConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


# CLIP ViT-L/14-336, the tower of Phi-3(.5)-vision: every HD crop and the global view are CROP_SIZE x CROP_SIZE
CROP_SIZE = CLIPVisionConfig.image_size
PATCH_SIZE = CLIPVisionConfig.patch_size  # 24 x 24 patches per crop


# --------------------------------------------------------------------------- CLIP vision tower

def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACT = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        C = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(C, C) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        hd = C // self.n_head
        q, k, v = (p(x).view(B, T, self.n_head, hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            # PyTorch's CPU flash attention runs 1.5x slower in bf16 than in float32 (5 crops of 577 tokens, 16
            # heads: 60 vs 40 ms, 2 threads); float32 is also the more accurate
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(x.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hd), no mask: every token sees every token
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACT[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        C, p = cfg.hidden_size, cfg.patch_size
        self.class_embedding = nn.Parameter(torch.empty(C))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, C, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Embedding(cfg.patches_per_side**2 + 1, C)  # the checkpoint has no position_ids

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        conv = self.patch_embedding
        if pixel_values.device.type == "cpu" and conv.weight.dtype == torch.bfloat16 and not torch.is_grad_enabled():
            # PyTorch's CPU bf16 convolution takes a slow path without native bf16 (5 crops of 336 px on Zen 3:
            # 1.1 s): float32 on the same values, rounded once at the end, takes a fraction of that
            x = F.conv2d(pixel_values.float(), conv.weight.float(), None, conv.stride).to(conv.weight.dtype)
        else:
            x = conv(pixel_values)
        x = x.flatten(2).transpose(1, 2)  # (N, P, C), patches row-major
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (N, 1, C)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (N, T, C)


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic, the checkpoint's spelling
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # stored, unused by Phi-3-vision

    def forward(self, pixel_values: torch.Tensor, num_layers: int) -> torch.Tensor:
        """hidden_states[num_layers] of the HF CLIP tower: (N, 3, S, S) -> (N, T, C); later layers are not run."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers[:num_layers]:
            x = layer(x)
        return x


class CLIPVisionModel(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(cfg)

    def forward(self, pixel_values: torch.Tensor, num_layers: int) -> torch.Tensor:
        return self.vision_model(pixel_values, num_layers)
