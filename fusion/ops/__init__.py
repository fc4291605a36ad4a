"""Low-level tensor operators shared by fusion strategies (pure PyTorch references first)."""

from fusion.ops.ms_deform_attn import multi_scale_deformable_attention

__all__ = ["multi_scale_deformable_attention"]
