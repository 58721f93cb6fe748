"""Models: small MLPs and linear chains (conv backbones come with the image-data layer)."""
from .basic import MLP, linear_chain

__all__ = ["MLP", "linear_chain"]
