"""The benchmark runner and its workloads (needs the `[bench]` or `[demo]` extra).

It sits beside the core layers and imports them; nothing in the core imports it.
"""
