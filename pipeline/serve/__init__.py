"""The serving process, one module per stage of an event's path.

consume.py → decode.py → features/ → score.py → encode.py → produce.py → commit.py

`runner.py` is the loop that drives them, `records.py` holds the records that cross them
and `kernel.py` says how their compiled kernels are built; `codec.py` and `events.py` are
decode's wire framing and validation rules, `histograms.py` the drift counts of what was
served, and `forget.py` the erasure requests applied between batches.
"""
