"""The tools around the pipeline, none of them on its path: the local broker and schema
registry, the synthetic load generator, the demos, the benchmarks and the soak test.
"""
