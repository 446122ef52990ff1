"""Cross-rank agreement on a collective's arguments, so bad input raises on every rank.

protocol (signatures, the agreement exchange), inline (small calls whose payload rides on
the agreement exchange itself, so one collective does both), inline_ops (the ops done that
way), fast and fast_ops (the same calls in one C call; fast_call makes it, fast_plan plans
it), shm_table (the exchange of crowded groups, and its payload slots), into (checks of a
caller's `out=` buffer).
"""
