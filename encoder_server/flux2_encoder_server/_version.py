"""The package version, importable without the model stack (`flux2-encoder-server --version`)."""

__version__ = "0.1.0"
