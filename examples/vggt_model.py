"""A VGGT-architecture model (Visual Geometry Grounded Transformer, Wang et al., CVPR 2025), written
here with random weights: the structure autosparse recognises, without the ``vggt`` package.

The names follow facebookresearch/vggt (``VGGT.aggregator``, ``Aggregator.frame_blocks`` /
``global_blocks`` / ``camera_token`` / ``register_token`` / ``patch_start_idx``, ``Block.attn``,
``Attention.qkv``) so that what autosparse does with this model it does with the real one. Defaults
are VGGT-1B's sizes: 24 rounds of frame + global attention, 1024 wide, 16 heads of 64. Differences,
none of which changes the attention sequence: the patch embedding is one Conv2d (VGGT: a DINOv2
ViT-L/14 with registers), the heads are a small camera head and a per-patch depth head (VGGT: camera,
DPT depth/point and track heads), and ``depth``/``num_heads``/``init_values`` are exposed on
``VGGT`` for small test models.

Sequence: every frame is 1 camera token + 4 register tokens + its (H/14)x(W/14) patches; frame
attention runs over one frame, global attention over all frames at once (frame-major). At 518 px,
37x37 patches: 1374 tokens per frame, 137,400 for 100 frames.

    python examples/vggt_model.py          # a small forward on random images
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VGGT", "Aggregator", "Block", "Attention"]

_RESNET_MEAN = (0.485, 0.456, 0.406)
_RESNET_STD = (0.229, 0.224, 0.225)


class RotaryPositionEmbedding2D(nn.Module):
    """2-D RoPE: the first half of each head's channels rotates with the token's row, the second half
    with its column (1-D rotary embedding with base ``frequency`` on each half)."""

    def __init__(self, frequency: float = 100.0) -> None:
        super().__init__()
        self.frequency = frequency

    def _rotate(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """x ``[B, H, N, d]``, position ``[B, N]``."""
        half = x.shape[-1] // 2
        inverse = self.frequency ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
        angle = position[:, None, :, None].float() * inverse  # [B, 1, N, d/2]
        cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x ``[B, H, N, D]``, pos ``[B, N, 2]`` (row, column)."""
        half = x.shape[-1] // 2
        return torch.cat([self._rotate(x[..., :half], pos[..., 0]), self._rotate(x[..., half:], pos[..., 1])], dim=-1)


class PositionGetter:
    """``(batch, rows, cols) -> [batch, rows * cols, 2]``: (row, column) of each patch, raster order."""

    def __call__(self, batch: int, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        grid = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
        return torch.stack(grid, dim=-1).reshape(1, rows * cols, 2).expand(batch, -1, -1)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True,
                 qk_norm: bool = False, rope: RotaryPositionEmbedding2D | None = None, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.rope = rope

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        # Through the module attribute, as VGGT calls it: what autosparse's capture intercepts.
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, init_values: float = 0.01, qk_norm: bool = False,
                 rope: RotaryPositionEmbedding2D | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, qk_norm, rope)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), ffn_bias)
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), pos=pos))
        return x + self.ls2(self.mlp(self.norm2(x)))


class Aggregator(nn.Module):
    """Alternating-attention trunk: per round, frame attention (each frame alone) then global
    attention (all frames' tokens together)."""

    def __init__(self, img_size: int = 518, patch_size: int = 14, embed_dim: int = 1024, depth: int = 24,
                 num_heads: int = 16, mlp_ratio: float = 4.0, num_register_tokens: int = 4, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, aa_order: tuple[str, ...] = ("frame", "global"),
                 aa_block_size: int = 1, qk_norm: bool = True, rope_freq: float = 100, init_values: float = 0.01) -> None:
        super().__init__()
        if depth % aa_block_size:
            raise ValueError(f"depth ({depth}) must be divisible by aa_block_size ({aa_block_size})")
        self.img_size = img_size
        self.patch_embed = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.rope = RotaryPositionEmbedding2D(rope_freq) if rope_freq > 0 else None
        self.position_getter = PositionGetter() if self.rope is not None else None

        def blocks() -> nn.ModuleList:
            return nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_bias, ffn_bias, init_values,
                                        qk_norm, self.rope) for _ in range(depth)])

        self.frame_blocks, self.global_blocks = blocks(), blocks()
        self.depth = depth
        self.aa_order = list(aa_order)
        self.patch_size = patch_size
        self.aa_block_size = aa_block_size
        self.aa_block_num = depth // aa_block_size
        # Index 0: the first frame's tokens; index 1: every other frame's.
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, embed_dim))
        self.register_token = nn.Parameter(torch.randn(1, 2, num_register_tokens, embed_dim))
        self.patch_start_idx = 1 + num_register_tokens
        self.register_buffer("_resnet_mean", torch.tensor(_RESNET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("_resnet_std", torch.tensor(_RESNET_STD).view(1, 1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        """images ``[B, S, 3, H, W]`` in [0, 1] -> (per round ``[B, S, P, 2C]``: frame and global
        outputs side by side, ``patch_start_idx``), P = ``patch_start_idx + (H/p)(W/p)``."""
        B, S, _, H, W = images.shape
        images = ((images - self._resnet_mean) / self._resnet_std).view(B * S, 3, H, W)
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B*S, h*w, C]
        special = torch.cat([self.camera_token, self.register_token], dim=2)  # [1, 2, 5, C]
        special = torch.cat([special[:, :1], special[:, 1:].expand(1, S - 1, -1, -1)], dim=1)  # [1, S, 5, C]
        special = special.expand(B, -1, -1, -1).reshape(B * S, self.patch_start_idx, -1)
        tokens = torch.cat([special, patches], dim=1)
        _, P, C = tokens.shape
        pos = None
        if self.rope is not None:  # patches at (row + 1, col + 1), special tokens at (0, 0)
            pos = self.position_getter(B * S, H // self.patch_size, W // self.patch_size, images.device) + 1
            pos = torch.cat([pos.new_zeros(B * S, self.patch_start_idx, 2), pos], dim=1)

        outputs, frame_idx, global_idx = [], 0, 0
        for _ in range(self.aa_block_num):
            frame_out, global_out = [], []
            for kind in self.aa_order:
                if kind == "frame":
                    tokens = tokens.view(B * S, P, C)
                    frame_pos = None if pos is None else pos.view(B * S, P, 2)
                    for _ in range(self.aa_block_size):
                        tokens = self.frame_blocks[frame_idx](tokens, pos=frame_pos)
                        frame_idx += 1
                        frame_out.append(tokens.view(B, S, P, C))
                elif kind == "global":
                    tokens = tokens.view(B, S * P, C)
                    global_pos = None if pos is None else pos.reshape(B, S * P, 2)
                    for _ in range(self.aa_block_size):
                        tokens = self.global_blocks[global_idx](tokens, pos=global_pos)
                        global_idx += 1
                        global_out.append(tokens.view(B, S, P, C))
                else:
                    raise ValueError(f"aa_order entries must be 'frame' or 'global', got {kind!r}")
            outputs += [torch.cat([f, g], dim=-1) for f, g in zip(frame_out, global_out)]
        return outputs, self.patch_start_idx


class CameraHead(nn.Module):
    """Pose encoding (9 values per frame) from the last round's camera token."""

    def __init__(self, dim_in: int) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(dim_in), nn.Linear(dim_in, 9)

    def forward(self, aggregated_tokens_list: list[torch.Tensor]) -> torch.Tensor:
        return self.fc(self.norm(aggregated_tokens_list[-1][:, :, 0]))  # [B, S, 9]


class DepthHead(nn.Module):
    """Depth and confidence per pixel from the last round's patch tokens (a linear map per patch)."""

    def __init__(self, dim_in: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.norm, self.fc = nn.LayerNorm(dim_in), nn.Linear(dim_in, 2 * patch_size**2)

    def forward(self, aggregated_tokens_list: list[torch.Tensor], images: torch.Tensor,
                patch_start_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _, H, W = images.shape
        p, rows, cols = self.patch_size, H // self.patch_size, W // self.patch_size
        out = self.fc(self.norm(aggregated_tokens_list[-1][:, :, patch_start_idx:]))  # [B, S, h*w, 2*p*p]
        out = out.view(B, S, rows, cols, p, p, 2).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, S, rows * p, cols * p, 2)
        return F.softplus(out[..., :1]), 1 + F.softplus(out[..., 1])  # depth [B, S, H', W', 1], conf [B, S, H', W']


class VGGT(nn.Module):
    def __init__(self, img_size: int = 518, patch_size: int = 14, embed_dim: int = 1024, enable_camera: bool = True,
                 enable_depth: bool = True, **aggregator_options) -> None:
        super().__init__()
        self.aggregator = Aggregator(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, **aggregator_options)
        self.camera_head = CameraHead(2 * embed_dim) if enable_camera else None
        self.depth_head = DepthHead(2 * embed_dim, patch_size) if enable_depth else None

    def forward(self, images: torch.Tensor, query_points: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """images ``[S, 3, H, W]`` or ``[B, S, 3, H, W]`` in [0, 1] -> predictions (``pose_enc``
        ``[B, S, 9]``, ``depth`` ``[B, S, H, W, 1]``, ``depth_conf`` ``[B, S, H, W]``, ``images``)."""
        if images.dim() == 4:
            images = images.unsqueeze(0)
        aggregated_tokens_list, patch_start_idx = self.aggregator(images)
        predictions = {}
        if self.camera_head is not None:
            predictions["pose_enc"] = self.camera_head(aggregated_tokens_list)
        if self.depth_head is not None:
            predictions["depth"], predictions["depth_conf"] = self.depth_head(aggregated_tokens_list, images,
                                                                               patch_start_idx)
        predictions["images"] = images
        return predictions


def main() -> None:
    model = VGGT(embed_dim=128, depth=2, num_heads=2).eval()
    images = torch.rand(3, 3, 112, 84)
    with torch.no_grad():
        predictions = model(images)
    print({name: tuple(value.shape) for name, value in predictions.items()})


if __name__ == "__main__":
    main()
