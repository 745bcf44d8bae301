"""Training, offline evaluation and retraining from labels: the torch side, apart from the
serving engines. Features come from the serving kernel (`pipeline.serve.features.compute_features`),
so training and serving cannot skew.
"""
