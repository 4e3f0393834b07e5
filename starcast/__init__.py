"""starcast: fast GPTBigCode (SantaCoder, StarCoder, tiny_starcoder, ...) inference outside PyTorch."""

__version__ = "0.1.0"
