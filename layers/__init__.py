"""Reusable flax.linen building blocks. No Fiddle, no global config: every knob is a field."""
