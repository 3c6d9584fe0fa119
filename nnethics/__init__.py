"""nnethics: where and how a language model decides an ethical dilemma."""

__version__ = "0.1.0"
