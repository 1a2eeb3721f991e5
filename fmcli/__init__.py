"""fm: a flow-matching image-generation toolkit."""

__version__ = "0.1.0"
