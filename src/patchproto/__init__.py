"""PatchProto: few-shot classification of industrial defects from their anomalous patches."""

__version__ = "0.2.0"
