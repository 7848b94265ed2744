"""Bank insert: copy a block into its slot, mean keys, dedup and slot choice on the device."""

from .op import bank_insert

__all__ = ["bank_insert"]
