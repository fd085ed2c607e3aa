"""autocode4math: learn when to write and run code in math reasoning, and measure that choice."""

__version__ = "0.1.0"
