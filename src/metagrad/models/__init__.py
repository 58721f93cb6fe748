"""Models: small MLPs and linear chains, the CNN(k) conv backbones and the Wormhole MNIST net."""
from .basic import MLP, linear_chain
from .conv import CNN, MNISTNet

__all__ = ["MLP", "linear_chain", "CNN", "MNISTNet"]
