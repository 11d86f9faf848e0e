"""s2ft-serve: serve many S²FT fine-tunes of one base LLM, exactly, and train them."""

__version__ = "0.1.0"
