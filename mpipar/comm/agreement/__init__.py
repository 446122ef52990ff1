"""Cross-rank agreement on a collective's arguments, so bad input raises on every rank.

protocol (signatures, the agreement exchange), inline (small calls whose payload rides on
the agreement exchange itself, so one collective does both), inline_ops (the ops done that
way), into (checks of a caller's `out=` buffer).
"""
