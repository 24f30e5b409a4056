"""What users do with trained models: map queries (in memory or streamed), transfer labels, evaluate, report.

The top of the library below the command line: it uses the model classes of :mod:`atlasmap.models` and
nothing here is needed to train or load one.
"""
