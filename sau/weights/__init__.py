"""Saved weights: one form (form), read from every layout (read) and written to every format (write); sau's
bundle folder (bundle), the key maps of other layouts (layouts/), the safe unpickler (safe_pickle)."""
