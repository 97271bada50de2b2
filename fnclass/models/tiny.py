"""``tiny``: the ``fast`` net at a CPU's size (32/64/128 channels, a 16-channel stem, two attention heads)."""

from fnclass.models.fast import build

DEFAULTS = dict(widths=(32, 64, 128), depths=(1, 1, 1), attn_after=(2,), attn_layers=1, attn_heads=2, stem_width=16)

__all__ = ["DEFAULTS", "build"]
